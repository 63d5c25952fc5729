"""Settle expired rounds and re-send stalled aggregations once, as Celery beat does periodically."""

import json

from django.core.management.base import BaseCommand

from federation.services.rounds import close_expired_rounds


class Command(BaseCommand):
    help = "Settle every open round past its deadline and send stalled aggregations again; prints how many rounds changed."

    def handle(self, *args, **options):
        self.stdout.write(json.dumps({"rounds_changed": close_expired_rounds()}))
