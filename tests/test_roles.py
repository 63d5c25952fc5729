"""Operator roles: the has_role rule and the create_user command."""

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError

from flo_site.roles import ADMIN, COMPLIANCE_OFFICER, OPERATOR, ROLES, ensure_groups, has_role

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def users(transactional_db, django_user_model):
    ensure_groups()
    users = {}
    for role in ROLES:
        user = django_user_model.objects.create_user(role, password=PASSWORD)
        user.groups.add(Group.objects.get(name=role))
        users[role] = user
    users["superuser"] = django_user_model.objects.create_superuser("root", password=PASSWORD)
    return users


def test_has_role_treats_superuser_as_admin(users):
    assert has_role(users["superuser"], ADMIN)
    assert not has_role(users["superuser"], OPERATOR)
    assert has_role(users[COMPLIANCE_OFFICER], ADMIN, COMPLIANCE_OFFICER)
    assert not has_role(users[OPERATOR], ADMIN, COMPLIANCE_OFFICER)
    assert not has_role(None, ADMIN)


def test_has_role_rejects_inactive_user(users):
    users[ADMIN].is_active = False

    assert not has_role(users[ADMIN], ADMIN)


def test_ensure_groups_is_idempotent(transactional_db):
    ensure_groups()
    ensure_groups()

    assert sorted(Group.objects.values_list("name", flat=True)) == sorted(ROLES)


def test_create_user_reads_password_from_environment(transactional_db, monkeypatch, django_user_model):
    monkeypatch.setenv("FLO_NEW_USER_PASSWORD", PASSWORD)

    call_command("create_user", "ines", role=COMPLIANCE_OFFICER)

    user = django_user_model.objects.get(username="ines")
    assert user.check_password(PASSWORD)
    assert list(user.groups.values_list("name", flat=True)) == [COMPLIANCE_OFFICER]
    assert not user.is_staff


def test_create_user_prompts_when_no_variable(transactional_db, monkeypatch, django_user_model):
    monkeypatch.delenv("FLO_NEW_USER_PASSWORD", raising=False)
    monkeypatch.setattr("getpass.getpass", lambda prompt: PASSWORD)

    call_command("create_user", "ada", role=ADMIN)

    user = django_user_model.objects.get(username="ada")
    assert user.check_password(PASSWORD)
    assert user.is_staff
    assert user.is_superuser


@pytest.mark.parametrize(
    ("password", "existing", "message"),
    [("short", False, "too weak"), (PASSWORD, True, "already exists")],
)
def test_create_user_rejects_weak_password_and_duplicate(transactional_db, monkeypatch, django_user_model, password, existing, message):
    monkeypatch.setenv("FLO_NEW_USER_PASSWORD", password)
    if existing:
        django_user_model.objects.create_user("ines", password=PASSWORD)

    with pytest.raises(CommandError, match=message):
        call_command("create_user", "ines", role=OPERATOR)
    assert django_user_model.objects.filter(username="ines").count() == int(existing)
