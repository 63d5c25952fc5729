"""Print a federation's rounds, updates and node budgets as JSON."""

import json

from django.core.management.base import BaseCommand, CommandError

from federation.models import Federation
from federation.queries import describe_federation


class Command(BaseCommand):
    help = "Print a federation's status, rounds (with update counts) and nodes (with privacy budgets) as JSON."

    def add_arguments(self, parser):
        parser.add_argument("federation", type=int, help="federation id")

    def handle(self, *args, federation: int, **options):
        target = Federation.objects.filter(id=federation).first()
        if target is None:
            raise CommandError(f"Federation {federation} does not exist.")
        self.stdout.write(json.dumps(describe_federation(target), indent=2))
