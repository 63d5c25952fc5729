"""The Django admin lists every model of FLO's apps and keeps the audit log read-only."""

import pytest
from django.apps import apps
from django.contrib import admin
from django.test import Client

from federation.models import AuditEntry
from federation.services.audit import record_audit
from tests.console_personas import PASSWORD, make_user


def test_every_model_is_registered():
    models = [model for label in ("federation", "privacy") for model in apps.get_app_config(label).get_models()]

    for model in models:
        assert admin.site.is_registered(model), model.__name__


@pytest.mark.parametrize("model_name", [model.__name__.lower() for label in ("federation", "privacy") for model in apps.get_app_config(label).get_models()])
def test_changelist_renders(db, model_name):
    user = make_user("ada", None)
    user.is_staff = user.is_superuser = True
    user.save()
    client = Client()
    client.login(username="ada", password=PASSWORD)
    app_label = next(model._meta.app_label for model in apps.get_models() if model.__name__.lower() == model_name)

    assert client.get(f"/admin/{app_label}/{model_name}/").status_code == 200


def test_audit_entries_cannot_change(db):
    superuser = make_user("ada", None)
    superuser.is_staff = superuser.is_superuser = True
    superuser.save()
    entry = record_audit("federation.started", actor=superuser)
    client = Client()
    client.login(username="ada", password=PASSWORD)

    response = client.post(f"/admin/federation/auditentry/{entry.id}/delete/", {"post": "yes"})

    assert response.status_code == 403
    assert AuditEntry.objects.filter(id=entry.id).exists()
