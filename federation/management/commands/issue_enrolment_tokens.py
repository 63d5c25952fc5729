"""Issue one-time enrolment tokens and print them as a JSON list (shown only once)."""

import json

from django.core.management.base import BaseCommand, CommandError

from federation.exceptions import InvalidFederationConfig
from federation.models import Federation, Node
from federation.services.enrolment import issue_enrolment_tokens


class Command(BaseCommand):
    help = "Issue one-time enrolment tokens for a federation; prints them as a JSON list. Only their hashes are stored."

    def add_arguments(self, parser):
        parser.add_argument("--federation", type=int, required=True, help="federation id")
        parser.add_argument("--count", type=int, default=1, help="number of tokens (default 1)")
        parser.add_argument("--ttl-seconds", type=int, default=86400, help="seconds until the tokens expire (default 86400)")
        parser.add_argument(
            "--sensitivity-class",
            choices=Node.SensitivityClass.values,
            default=Node.SensitivityClass.PERSONAL,
            help="data-sensitivity class of the nodes these tokens enrol; sets their epsilon allocation (default personal)",
        )

    def handle(self, *args, federation: int, count: int, ttl_seconds: int, sensitivity_class: str, **options):
        target = Federation.objects.filter(id=federation).first()
        if target is None:
            raise CommandError(f"Federation {federation} does not exist.")
        try:
            tokens = issue_enrolment_tokens(target, count=count, ttl_seconds=ttl_seconds, sensitivity_class=sensitivity_class)
        except InvalidFederationConfig as error:
            raise CommandError(error.detail) from error
        self.stdout.write(json.dumps(tokens))
