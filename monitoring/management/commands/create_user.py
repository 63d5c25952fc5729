"""Create a console user in one of the role groups."""

import getpass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from flo_site.roles import ALL_ROLES, ensure_groups


class Command(BaseCommand):
    help = (
        "Create a console user with one role. The password comes from FLO_NEW_USER_PASSWORD "
        "or, when that is unset, from a prompt; it must pass the password validators."
    )

    def add_arguments(self, parser):
        parser.add_argument("username", help="login name of the new user")
        parser.add_argument("--role", required=True, choices=ALL_ROLES, help="role group the user joins")

    def handle(self, *args, username: str, role: str, **options):
        user_model = get_user_model()
        if user_model.objects.filter(username=username).exists():
            raise CommandError(f"User {username!r} already exists; choose another username.")
        password = settings.FLO_NEW_USER_PASSWORD or self._prompt_password()
        candidate = user_model(username=username)
        try:
            validate_password(password, user=candidate)
        except ValidationError as error:
            raise CommandError(f"The password was rejected: {' '.join(error.messages)}") from error

        ensure_groups()
        with transaction.atomic():
            # Admins manage users and every model in the Django admin, so they are superusers.
            is_admin = role == "admin"
            user = user_model.objects.create_user(username=username, password=password, is_staff=is_admin, is_superuser=is_admin)
            user.groups.add(Group.objects.get(name=role))
        self.stdout.write(f"Created user {username!r} with role {role}.")

    def _prompt_password(self) -> str:
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Password (again): "):
            raise CommandError("The two passwords differ; run the command again.")
        return password
