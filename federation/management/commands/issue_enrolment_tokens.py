"""Issue one-time enrolment tokens and print them as a JSON list (shown only once)."""

import json

from django.core.management.base import BaseCommand, CommandError

from federation.models import Federation
from federation.services.enrolment import issue_enrolment_tokens


class Command(BaseCommand):
    help = "Issue one-time enrolment tokens for a federation; prints them as a JSON list. Only their hashes are stored."

    def add_arguments(self, parser):
        parser.add_argument("--federation", type=int, required=True, help="federation id")
        parser.add_argument("--count", type=int, default=1, help="number of tokens (default 1)")
        parser.add_argument("--ttl-seconds", type=int, default=86400, help="seconds until the tokens expire (default 86400)")

    def handle(self, *args, federation: int, count: int, ttl_seconds: int, **options):
        target = Federation.objects.filter(id=federation).first()
        if target is None:
            raise CommandError(f"Federation {federation} does not exist.")
        if count < 1 or ttl_seconds < 1:
            raise CommandError("--count and --ttl-seconds must be positive.")
        self.stdout.write(json.dumps(issue_enrolment_tokens(target, count=count, ttl_seconds=ttl_seconds)))
