"""System checks that refuse unsafe deployments."""

from federation.checks import find_sqlite_writer_errors

SQLITE = "django.db.backends.sqlite3"


def test_sqlite_with_concurrent_workers_is_refused():
    errors = find_sqlite_writer_errors(engine=SQLITE, is_eager=False, worker_concurrency=4)

    assert [error.id for error in errors] == ["flo.E001"]


def test_sqlite_with_eager_tasks_is_allowed():
    assert find_sqlite_writer_errors(engine=SQLITE, is_eager=True, worker_concurrency=4) == []


def test_sqlite_with_one_worker_process_is_allowed():
    assert find_sqlite_writer_errors(engine=SQLITE, is_eager=False, worker_concurrency=1) == []


def test_postgresql_with_concurrent_workers_is_allowed():
    assert find_sqlite_writer_errors(engine="django.db.backends.postgresql", is_eager=False, worker_concurrency=4) == []
