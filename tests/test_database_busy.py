"""Lock conflicts: recognised as a busy database, rejected with 503 and Retry-After, and nothing of the request is kept.

The PostgreSQL tests make real conflicts: a second connection holds a row
lock, and the test's connection waits at most LOCK_TIMEOUT for it.
"""

import json
import logging
import sqlite3
import threading
from types import SimpleNamespace

import numpy as np
import psycopg
import pytest
from django.contrib.sessions.backends.base import UpdateError
from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore
from django.contrib.sessions.exceptions import SessionInterrupted
from django.contrib.sessions.models import Session
from django.db import IntegrityError, OperationalError, connection, connections, transaction
from django.db.utils import DatabaseErrorWrapper
from django.test import Client, RequestFactory, override_settings

from federation.api import views as api_views
from federation.models import AuditEntry, Federation, ModelUpdate, Node, TrainingRound
from federation.services import update_store
from federation.services.federations import start_federation
from federation.services.locks import lock_federation
from federation.services.rounds import close_expired_rounds
from flo_site import database_busy
from flo_site.database_busy import CONSOLE_MESSAGE, RETRY_AFTER_SECONDS, DatabaseBusyMiddleware, bad_request, is_database_busy, server_error
from flo_site.roles import OPERATOR
from monitoring import actions
from tests.conftest import enrol, make_federation
from tests.console_personas import make_user

LOCK_TIMEOUT = "200ms"
STEP_SECONDS = 30


def wrapped_sqlite_error(tmp_path) -> OperationalError:
    """Return the Django error that Django's SQLite backend raises for a real "database is locked"."""
    path = tmp_path / "locked.sqlite3"
    holder = sqlite3.connect(path)
    waiter = sqlite3.connect(path, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with DatabaseErrorWrapper(SimpleNamespace(Database=sqlite3, errors_occurred=False)):
            waiter.execute("BEGIN IMMEDIATE")
    except OperationalError as error:
        return error
    finally:
        holder.close()
        waiter.close()
    raise AssertionError("SQLite granted a second write lock")


def test_is_database_busy_for_sqlite_locked(tmp_path):
    assert is_database_busy(wrapped_sqlite_error(tmp_path))


OTHER_ERRORS = [
    OperationalError("no such table: federation_node"),
    IntegrityError("database is locked"),
    ValueError("database is locked"),
]


@pytest.mark.parametrize("error", OTHER_ERRORS)
def test_is_database_busy_false_for_other_errors(error):
    assert not is_database_busy(error)


def postgres_url() -> str:
    assert connection.vendor == "postgresql", "run this test with DATABASE_URL pointing to PostgreSQL (make test-postgres)"
    database = connection.settings_dict
    return f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"


def hold_row_lock(table: str, row_id, *, key_column: str = "id") -> psycopg.Connection:
    """Open a second connection that locks one row, found by its key, until it is closed."""
    holder = psycopg.connect(postgres_url())
    holder.execute(f'SELECT 1 FROM "{table}" WHERE "{key_column}" = %s FOR UPDATE', [row_id])
    return holder


def set_lock_timeout() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")


@pytest.mark.integration
@pytest.mark.postgresql
def test_is_database_busy_for_postgresql_lock_timeout(transactional_db):
    federation = make_federation()
    holder = hold_row_lock(Federation._meta.db_table, federation.id)
    set_lock_timeout()
    try:
        with pytest.raises(OperationalError) as raised, transaction.atomic():
            lock_federation(federation.id)
    finally:
        holder.close()

    assert is_database_busy(raised.value)


@pytest.mark.integration
@pytest.mark.postgresql
def test_is_database_busy_for_postgresql_deadlock(transactional_db):
    postgres_url()
    federations = [make_federation(name="first"), make_federation(name="second")]
    both_locked = threading.Barrier(2, timeout=STEP_SECONDS)
    errors: list = []

    def lock_both(first: Federation, second: Federation) -> None:
        try:
            with transaction.atomic():
                lock_federation(first.id)
                both_locked.wait()
                lock_federation(second.id)
        except OperationalError as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=lock_both, args=order, daemon=True) for order in (federations, federations[::-1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STEP_SECONDS)

    assert len(errors) == 1
    assert is_database_busy(errors[0])


@pytest.mark.integration
@pytest.mark.postgresql
def test_update_during_lock_conflict_gets_503(transactional_db):
    federation = make_federation(round_size=2, min_updates=2)
    signed = enrol(federation, 2)[0]
    start_federation(federation)
    training_round = TrainingRound.objects.get(federation=federation, number=1)
    files_before = set(update_store.store_dir().rglob("*"))
    holder = hold_row_lock(TrainingRound._meta.db_table, training_round.id)
    set_lock_timeout()
    try:
        busy = signed.submit(round_number=1)
    finally:
        holder.close()

    assert busy.status_code == 503
    assert busy.json()["code"] == "database_busy"
    assert busy["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert ModelUpdate.objects.filter(round=training_round).count() == 0
    assert set(update_store.store_dir().rglob("*")) == files_before
    # The same update, sent again with a fresh nonce once the lock is gone, is accepted.
    assert signed.submit(round_number=1, tensors={"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}).status_code == 202


@pytest.mark.integration
@pytest.mark.postgresql
def test_console_action_during_lock_conflict_gets_503(transactional_db):
    federation = make_federation()
    node = enrol(federation, 1)[0].node
    client = Client()
    client.force_login(make_user("olivia", OPERATOR))
    path = f"/console/federations/{federation.id}/nodes/{node.id}/quarantine/"
    holder = hold_row_lock(Node._meta.db_table, node.id)
    set_lock_timeout()
    try:
        busy = client.post(path, {"reason": "noisy updates"})
    finally:
        holder.close()

    assert busy.status_code == 503
    assert busy["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert CONSOLE_MESSAGE in busy.content.decode()
    assert Node.objects.get(id=node.id).status == Node.Status.ACTIVE
    assert not AuditEntry.objects.filter(action="node.quarantined").exists()
    # Sent again once the lock is gone, the action applies.
    assert client.post(path, {"reason": "noisy updates"}).status_code == 302
    assert Node.objects.get(id=node.id).status == Node.Status.QUARANTINED


@pytest.mark.integration
@pytest.mark.postgresql
def test_console_start_during_lock_conflict_recovers(transactional_db):
    federation = make_federation()
    nodes = enrol(federation, 3)
    client = Client()
    client.force_login(make_user("olivia", OPERATOR))
    # The start commits the status change. The first round opens after that commit and must add this node to its selection.
    holder = hold_row_lock(Node._meta.db_table, nodes[0].node.id)
    set_lock_timeout()
    try:
        busy = client.post(f"/console/federations/{federation.id}/actions/start/")
    finally:
        holder.close()

    assert busy.status_code == 503
    assert CONSOLE_MESSAGE in busy.content.decode()
    assert Federation.objects.get(id=federation.id).status == Federation.Status.RUNNING
    assert not TrainingRound.objects.filter(federation=federation).exists()
    # The next deadline check, from Celery beat or a device's poll, opens the missing round.
    assert close_expired_rounds(federation_id=federation.id) == 1
    assert TrainingRound.objects.get(federation=federation).state == TrainingRound.State.OPEN


@pytest.mark.integration
@pytest.mark.postgresql
@override_settings(SESSION_SAVE_EVERY_REQUEST=True)
def test_session_save_during_lock_conflict_gets_503(transactional_db):
    # SessionMiddleware saves the session after the view has returned, outside the view's exception handling, and reports the failed update as SessionInterrupted.
    client = Client(raise_request_exception=False)
    client.force_login(make_user("olivia", OPERATOR))
    holder = hold_row_lock(Session._meta.db_table, client.session.session_key, key_column="session_key")
    set_lock_timeout()
    try:
        busy = client.get("/console/")
    finally:
        holder.close()

    assert busy.status_code == 503
    assert busy["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert CONSOLE_MESSAGE in busy.content.decode()
    assert client.get("/console/").status_code == 200


@pytest.fixture
def busy_session_client(transactional_db, tmp_path, monkeypatch, settings):
    """A signed-in console client whose session update, saved on every request, fails as a lock conflict."""
    # SQLite locks the whole database, so a second connection cannot hold back only the session row.
    # The patched save raises as Django's does when its update fails: UpdateError, with the database error as its context.
    settings.SESSION_SAVE_EVERY_REQUEST = True
    busy = wrapped_sqlite_error(tmp_path)
    client = Client(raise_request_exception=False)
    client.force_login(make_user("olivia", OPERATOR))

    def busy_save(self, must_create=False):
        try:
            raise busy
        except OperationalError:
            raise UpdateError  # noqa: B904

    monkeypatch.setattr(DatabaseSessionStore, "save", busy_save)
    return client


def test_busy_session_update_gets_503_on_sqlite(busy_session_client):
    response = busy_session_client.get("/console/")

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert CONSOLE_MESSAGE in response.content.decode()


def logged_levels(caplog) -> list[tuple[str, str]]:
    """Return (logger, level) of the records at WARNING and above."""
    return [(record.name, record.levelname) for record in caplog.records if record.levelno >= logging.WARNING]


def test_busy_session_update_logged_once(busy_session_client, caplog):
    # Django logs an error response at ERROR, with its traceback, unless the handler marked it as logged.
    with caplog.at_level("WARNING"):
        busy_session_client.get("/console/")

    assert logged_levels(caplog) == [("flo_site.database_busy", "WARNING")]


class RaiseAfterView:
    """Middleware that raises `error` after the view has returned, outside the view's exception handling."""

    error: Exception | None = None

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if self.error is not None:
            raise self.error
        return response


@pytest.fixture
def raise_after_view(settings, monkeypatch):
    settings.MIDDLEWARE = [*settings.MIDDLEWARE, f"{__name__}.RaiseAfterView"]
    return lambda error: monkeypatch.setattr(RaiseAfterView, "error", error)


def test_busy_conflict_after_view_logged_once(transactional_db, tmp_path, raise_after_view, caplog):
    raise_after_view(wrapped_sqlite_error(tmp_path))
    client = Client(raise_request_exception=False)

    with caplog.at_level("WARNING"):
        response = client.get("/login/")

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert logged_levels(caplog) == [("flo_site.database_busy", "WARNING")]


def test_other_error_after_view_logged_as_error(transactional_db, raise_after_view, caplog):
    raise_after_view(OperationalError("no such table: federation_node"))
    client = Client(raise_request_exception=False)

    with caplog.at_level("WARNING"):
        response = client.get("/login/")

    assert response.status_code == 500
    assert logged_levels(caplog) == [("django.request", "ERROR")]


def test_busy_console_action_logged_once(transactional_db, tmp_path, monkeypatch, caplog):
    federation = make_federation()
    node = enrol(federation, 1)[0].node
    busy = wrapped_sqlite_error(tmp_path)

    def busy_quarantine(*args, **kwargs):
        raise busy

    monkeypatch.setitem(actions.NODE_ACTIONS, "quarantine", busy_quarantine)
    client = Client()
    client.force_login(make_user("olivia", OPERATOR))
    with caplog.at_level("WARNING"):
        response = client.post(f"/console/federations/{federation.id}/nodes/{node.id}/quarantine/", {"reason": "noisy updates"})

    assert response.status_code == 503
    assert logged_levels(caplog) == [("flo_site.database_busy", "WARNING")]


def test_busy_api_request_logged_once(transactional_db, tmp_path, monkeypatch, caplog):
    federation = make_federation(round_size=1, min_updates=1)
    signed = enrol(federation, 1)[0]
    start_federation(federation)
    busy = wrapped_sqlite_error(tmp_path)

    def busy_accept(*args, **kwargs):
        raise busy

    monkeypatch.setattr(api_views, "accept_update", busy_accept)
    with caplog.at_level("WARNING"):
        response = signed.submit(round_number=1)

    assert response.status_code == 503
    assert response.json()["code"] == "database_busy"
    assert logged_levels(caplog) == [("federation.api.errors", "WARNING")]


def test_busy_page_falls_back_to_plain_text(tmp_path, monkeypatch):
    request = RequestFactory().get("/console/")

    def broken_render(*args, **kwargs):
        raise RuntimeError("template error")

    monkeypatch.setattr(database_busy, "render_to_string", broken_render)
    try:
        raise wrapped_sqlite_error(tmp_path)
    except OperationalError:
        response = server_error(request)

    assert response.status_code == 503
    assert response.content.decode() == CONSOLE_MESSAGE


def test_server_error_handler_ignores_suppressed_context(tmp_path):
    request = RequestFactory().get("/console/")
    busy = wrapped_sqlite_error(tmp_path)
    try:
        try:
            raise busy
        except OperationalError:
            raise ValueError("unrelated") from None
    except ValueError:
        response = server_error(request)

    assert response.status_code == 500


def test_server_error_handler_busy_database_gets_503(tmp_path):
    request = RequestFactory().get("/console/", HTTP_ACCEPT="application/json")
    try:
        raise wrapped_sqlite_error(tmp_path)
    except OperationalError:
        response = server_error(request)

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert json.loads(response.content) == {"code": "database_busy", "detail": CONSOLE_MESSAGE}


def test_bad_request_handler_busy_session_update_gets_503(tmp_path):
    request = RequestFactory().get("/console/")
    try:
        try:
            raise wrapped_sqlite_error(tmp_path)
        except OperationalError as error:
            raise UpdateError from error
    except UpdateError:
        try:
            raise SessionInterrupted("The request's session was deleted before the request completed.")
        except SessionInterrupted as interrupted:
            response = bad_request(request, interrupted)

    assert response.status_code == 503
    assert CONSOLE_MESSAGE in response.content.decode()


def test_bad_request_handler_other_error_gets_400():
    request = RequestFactory().get("/console/")

    assert bad_request(request, SessionInterrupted("The request's session was deleted before the request completed.")).status_code == 400


def test_server_error_handler_other_error_gets_500():
    request = RequestFactory().get("/console/")
    try:
        raise OperationalError("no such table: federation_node")
    except OperationalError:
        response = server_error(request)

    assert response.status_code == 500


def test_middleware_returns_json_when_json_is_accepted(transactional_db, tmp_path):
    request = RequestFactory().get("/console/federations/1/snapshot", HTTP_ACCEPT="application/json")

    response = DatabaseBusyMiddleware(lambda request: None).process_exception(request, wrapped_sqlite_error(tmp_path))

    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert json.loads(response.content) == {"code": "database_busy", "detail": CONSOLE_MESSAGE}


def test_middleware_ignores_other_errors(transactional_db):
    request = RequestFactory().post("/console/")

    assert DatabaseBusyMiddleware(lambda request: None).process_exception(request, OperationalError("no such table: federation_node")) is None
