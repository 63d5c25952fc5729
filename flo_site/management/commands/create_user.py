"""Create an operator account with one role."""

import getpass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from flo_site.env import read_str
from flo_site.roles import ROLES, ensure_groups

PASSWORD_VARIABLE = "FLO_NEW_USER_PASSWORD"


class Command(BaseCommand):
    help = (
        "Create a user with one role (admin, operator or compliance_officer). The password is read from the "
        f"environment variable {PASSWORD_VARIABLE} (or the file named by {PASSWORD_VARIABLE}_FILE) when set, "
        "otherwise it is prompted for twice."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=ROLES, help="the group the user joins")
        parser.add_argument("--email", default="", help="the user's e-mail address")

    def handle(self, *args, username: str, role: str, email: str, **options):
        user_model = get_user_model()
        if user_model.objects.filter(username=username).exists():
            raise CommandError(f"User {username!r} already exists; choose another username.")
        password = read_str(PASSWORD_VARIABLE) or self._prompt_password()
        user = user_model(username=username, email=email)
        try:
            validate_password(password, user)
        except ValidationError as error:
            raise CommandError("The password is too weak: " + " ".join(error.messages)) from error

        with transaction.atomic():
            ensure_groups()
            user.set_password(password)
            # Admins use the Django admin site with every permission (the role
            # groups carry none); other roles use the console and API only.
            user.is_staff = role == "admin"
            user.is_superuser = role == "admin"
            user.save()
            user.groups.add(Group.objects.get(name=role))
        self.stdout.write(f"Created user {username!r} with role {role}.")

    def _prompt_password(self) -> str:
        try:
            password = getpass.getpass("Password: ")
            repeated = getpass.getpass("Password (again): ")
        except (EOFError, OSError) as error:
            raise CommandError(f"Cannot prompt for a password here ({type(error).__name__}); set {PASSWORD_VARIABLE}.") from error
        if password != repeated:
            raise CommandError("The two passwords differ; run the command again.")
        return password
