"""Role groups, has_role and the create_user command."""

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser, Group
from django.core.management import CommandError, call_command

from flo_site.roles import ADMIN, ALL_ROLES, COMPLIANCE_OFFICER, OPERATOR, has_role
from tests.console_personas import make_user


def test_migrate_creates_role_groups(db):
    assert set(Group.objects.filter(name__in=ALL_ROLES).values_list("name", flat=True)) == set(ALL_ROLES)


def test_has_role_checks_groups(db):
    operator = make_user("olivia", OPERATOR)
    nobody = make_user("nobody", None)
    superuser = get_user_model().objects.create_superuser("root", password="x" * 16)

    assert has_role(operator, OPERATOR)
    assert not has_role(operator, ADMIN, COMPLIANCE_OFFICER)
    assert not has_role(nobody, *ALL_ROLES)
    assert has_role(superuser, ADMIN)
    assert not has_role(superuser, COMPLIANCE_OFFICER)
    assert not has_role(AnonymousUser(), *ALL_ROLES)
    assert not has_role(None, *ALL_ROLES)


def test_inactive_user_has_no_role(db):
    operator = make_user("olivia", OPERATOR)
    operator.is_active = False
    operator.save()

    assert not has_role(operator, OPERATOR)


def test_create_user_reads_password_from_settings(db, settings):
    settings.FLO_NEW_USER_PASSWORD = "a-long-unusual-passphrase"

    call_command("create_user", "carl", "--role", COMPLIANCE_OFFICER)

    user = get_user_model().objects.get(username="carl")
    assert user.check_password("a-long-unusual-passphrase")
    assert list(user.groups.values_list("name", flat=True)) == [COMPLIANCE_OFFICER]
    assert not user.is_staff


def test_create_user_admin_is_superuser(db, settings):
    settings.FLO_NEW_USER_PASSWORD = "a-long-unusual-passphrase"

    call_command("create_user", "ada", "--role", ADMIN)

    user = get_user_model().objects.get(username="ada")
    assert user.is_staff
    assert user.is_superuser


def test_create_user_rejects_duplicate_and_weak_password(db, settings):
    settings.FLO_NEW_USER_PASSWORD = "a-long-unusual-passphrase"
    call_command("create_user", "olivia", "--role", OPERATOR)

    with pytest.raises(CommandError, match="already exists"):
        call_command("create_user", "olivia", "--role", OPERATOR)

    settings.FLO_NEW_USER_PASSWORD = "short"
    with pytest.raises(CommandError, match="password was rejected"):
        call_command("create_user", "oscar", "--role", OPERATOR)
    assert not get_user_model().objects.filter(username="oscar").exists()


def test_create_user_rejects_unknown_role(db):
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("create_user", "olivia", "--role", "root")


def test_create_user_prompts_when_password_unset(db, settings, monkeypatch):
    settings.FLO_NEW_USER_PASSWORD = None
    answers = iter(["a-long-unusual-passphrase", "a-different-passphrase"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))

    with pytest.raises(CommandError, match="passwords differ"):
        call_command("create_user", "olivia", "--role", OPERATOR)
