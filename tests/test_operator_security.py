"""Operator side: production settings, the deployment check, admin sign-in throttling and the audit log."""

import os
import stat
import subprocess
import sys

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.test import Client, RequestFactory

from federation import crypto
from federation.admin import FederationAdmin, NodeAdmin
from federation.models import AuditEntry, Federation, Node
from flo_site.server_process import BASE_DIR

PASSWORD = "correct-horse-battery-staple-42"
# 64 characters of varied text, as Django's deployment check requires of SECRET_KEY.
STRONG_SECRET_KEY = "k3J9x-Qw7_Lm2PzR8vTn4YbH6cFd1GsA0eUiOo5jWkXyZqBrCtDvEgMhNpSaLfK"
NODE_SECRET_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def production_environment(tmp_path, **overrides) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("FLO_", "DJANGO_", "DATABASE_URL", "REDIS_URL"))}
    environment.update(
        {
            "FLO_ENV": "production",
            "DJANGO_SECRET_KEY": STRONG_SECRET_KEY,
            "DJANGO_ALLOWED_HOSTS": "flo.example.org",
            "FLO_NODE_SECRET_KEY": NODE_SECRET_KEY,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'production.sqlite3'}",
            "FLO_DATA_DIR": str(tmp_path),
        }
    )
    for name, value in overrides.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


def run_manage(environment: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *arguments], cwd=BASE_DIR, env=environment, capture_output=True, text=True, timeout=120)


# --- Settings ---------------------------------------------------------------------


def test_deploy_check_clean_in_production(tmp_path):
    completed = run_manage(production_environment(tmp_path), "check", "--deploy", "--fail-level", "WARNING")

    assert completed.returncode == 0, completed.stderr + completed.stdout
    assert "System check identified no issues" in completed.stdout
    assert "WARNING" not in completed.stderr + completed.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"FLO_NODE_SECRET_KEY": None}, "FLO_NODE_SECRET_KEY", id="no-node-secret-key"),
        pytest.param({"DJANGO_SECRET_KEY": None}, "DJANGO_SECRET_KEY", id="no-django-secret-key"),
        pytest.param({"FLO_NONCE_TTL_SECONDS": "599"}, "FLO_NONCE_TTL_SECONDS", id="nonce-lifetime-below-twice-window"),
        pytest.param({"FLO_NONCE_STORE": "redis"}, "REDIS_URL", id="redis-store-without-redis"),
        pytest.param({"FLO_SECRET_GRACE_SECONDS": "604801"}, "FLO_SECRET_GRACE_SECONDS", id="grace-above-maximum"),
    ],
)
def test_production_start_fails_on_bad_configuration(tmp_path, overrides, message):
    completed = run_manage(production_environment(tmp_path, **overrides), "check")

    assert completed.returncode != 0
    assert message in completed.stderr


def test_production_cookies_are_secure(tmp_path):
    code = "from django.conf import settings as s; print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SESSION_COOKIE_HTTPONLY, s.CSRF_COOKIE_HTTPONLY, s.SESSION_COOKIE_SAMESITE, s.CSRF_COOKIE_SAMESITE)"

    completed = run_manage(production_environment(tmp_path), "shell", "-c", code)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1].split() == ["True", "True", "True", "True", "Lax", "Lax"]


def test_development_key_file_is_private(tmp_path):
    path = tmp_path / "keys" / crypto.DEV_KEY_FILENAME

    encoded = crypto._read_or_create_dev_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == encoded
    assert crypto._read_or_create_dev_key(path) == encoded


@pytest.mark.parametrize("password", ["short", "12345678901234", "password12345"])
def test_password_validators_reject_weak_passwords(password):
    with pytest.raises(ValidationError):
        validate_password(password)


# --- Admin sign-in -------------------------------------------------------------


@pytest.fixture
def operator(transactional_db):
    cache.clear()
    yield get_user_model().objects.create_superuser("alice", "alice@example.org", PASSWORD)
    cache.clear()


def sign_in(password: str, *, address: str = "10.0.0.1", client: Client | None = None):
    client = client or Client()
    response = client.post("/admin/login/?next=/admin/", {"username": "alice", "password": password}, REMOTE_ADDR=address)
    return client, response


def test_admin_sign_in_audited(operator):
    _, response = sign_in(PASSWORD)

    assert response.status_code == 302
    entry = AuditEntry.objects.get(action="operator.login")
    assert entry.actor == operator
    assert entry.remote_addr == "10.0.0.1"


def test_failed_sign_in_audited_without_password(operator):
    _, response = sign_in("wrong-password")

    assert response.status_code == 200
    entry = AuditEntry.objects.get(action="operator.login_failed")
    assert entry.actor_label == "alice"
    assert entry.remote_addr == "10.0.0.1"
    assert "wrong-password" not in str(entry.details)


def test_sign_in_locked_after_repeated_failures(operator, settings):
    settings.FLO_LOGIN_MAX_FAILURES = 3
    for _ in range(3):
        sign_in("wrong-password")

    _, locked = sign_in(PASSWORD)
    _, other_address = sign_in(PASSWORD, address="10.0.0.2")

    assert locked.status_code == 200
    assert "Too many failed sign-ins" in locked.content.decode()
    assert AuditEntry.objects.filter(action="operator.login_locked", remote_addr="10.0.0.1").count() == 1
    assert other_address.status_code == 302


def test_successful_sign_in_resets_failures(operator, settings):
    settings.FLO_LOGIN_MAX_FAILURES = 3
    sign_in("wrong-password")
    sign_in("wrong-password")
    sign_in(PASSWORD)

    sign_in("wrong-password")
    sign_in("wrong-password")
    _, response = sign_in(PASSWORD)

    assert response.status_code == 302


# --- Admin actions ---------------------------------------------------------------


def test_admin_revocation_audited_with_address(operator, running):
    _, nodes = running
    client, _ = sign_in(PASSWORD)
    node = nodes[0].node

    response = client.post(
        "/admin/federation/node/", {"action": "revoke_selected", "_selected_action": [str(node.id)]}, REMOTE_ADDR="10.0.0.1"
    )

    assert response.status_code == 302
    assert Node.objects.get(id=node.id).status == Node.Status.REVOKED
    entry = AuditEntry.objects.get(action="node.revoked")
    assert entry.actor == operator
    assert entry.remote_addr == "10.0.0.1"


@pytest.mark.parametrize("log_method", ["log_addition", "log_change"])
def test_admin_change_audited_with_address(operator, running, log_method):
    _, nodes = running
    node = nodes[0].node
    request = RequestFactory().post("/admin/federation/node/", REMOTE_ADDR="10.0.0.3")
    request.user = operator

    getattr(NodeAdmin(Node, admin.site), log_method)(request, node, [{"changed": {"fields": ["Display name"]}}])

    entry = AuditEntry.objects.get(action={"log_addition": "admin.added", "log_change": "admin.changed"}[log_method])
    assert entry.actor == operator
    assert entry.remote_addr == "10.0.0.3"
    assert entry.target == f"federation.node:{node.id}"
    assert entry.federation_id == node.federation_id
    assert "Display name" in entry.details["message"]


def test_admin_deletion_audited_with_address(operator, federation):
    request = RequestFactory().post("/admin/federation/federation/", REMOTE_ADDR="10.0.0.4")
    request.user = operator

    FederationAdmin(Federation, admin.site).log_deletions(request, Federation.objects.filter(id=federation.id))

    entry = AuditEntry.objects.get(action="admin.deleted")
    assert entry.remote_addr == "10.0.0.4"
    assert entry.target == f"federation.federation:{federation.id}"


def test_audit_log_is_read_only_in_admin(operator):
    client, _ = sign_in(PASSWORD)

    add = client.get("/admin/federation/auditentry/add/")

    assert add.status_code == 403
