"""Start a draft or paused federation: it opens its next round at once."""

from django.core.management.base import BaseCommand, CommandError

from federation.exceptions import InvalidFederationConfig
from federation.models import Federation
from federation.services.federations import start_federation


class Command(BaseCommand):
    help = "Start a draft or paused federation; its next round opens at once among the eligible nodes."

    def add_arguments(self, parser):
        parser.add_argument("federation", type=int, help="federation id")

    def handle(self, *args, federation: int, **options):
        target = Federation.objects.filter(id=federation).first()
        if target is None:
            raise CommandError(f"Federation {federation} does not exist.")
        try:
            start_federation(target)
        except InvalidFederationConfig as error:
            raise CommandError(str(error)) from error
        target.refresh_from_db()
        self.stdout.write(f"Federation {target.id} is {target.status}.")
