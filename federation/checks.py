"""System checks for deployments FLO cannot run safely."""

from django.conf import settings
from django.core.checks import Error, register


@register()
def check_sqlite_writers(app_configs, **kwargs):
    return find_sqlite_writer_errors(
        engine=settings.DATABASES["default"]["ENGINE"],
        is_eager=settings.CELERY_TASK_ALWAYS_EAGER,
        worker_concurrency=settings.CELERY_WORKER_CONCURRENCY,
    )


def find_sqlite_writer_errors(*, engine: str, is_eager: bool, worker_concurrency: int) -> list[Error]:
    """Refuse SQLite with several Celery worker processes writing at once.

    SQLite allows one writer at a time; several worker processes writing
    rounds while the API stores updates end in "database is locked" errors.
    Eager tasks (the embedded default) run inside the API process instead.
    """
    if engine != "django.db.backends.sqlite3" or is_eager or worker_concurrency <= 1:
        return []
    return [
        Error(
            f"SQLite cannot serve {worker_concurrency} concurrent Celery worker processes.",
            hint="Set DATABASE_URL to PostgreSQL, or FLO_CELERY_CONCURRENCY=1.",
            id="flo.E001",
        )
    ]
