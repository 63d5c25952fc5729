"""System checks for deployments FLO cannot run safely."""

from django.conf import settings
from django.core.checks import Error, register


@register()
def check_sqlite_writers(app_configs, **kwargs):
    """Refuse SQLite with real Celery workers running concurrently.

    SQLite allows one writer at a time; several worker processes writing
    rounds while the API stores updates end in "database is locked" errors.
    Eager tasks (the embedded default) share the API process and its
    serialised writes.
    """
    engine = settings.DATABASES["default"]["ENGINE"]
    if engine != "django.db.backends.sqlite3" or settings.CELERY_TASK_ALWAYS_EAGER:
        return []
    if settings.CELERY_WORKER_CONCURRENCY > 1:
        return [
            Error(
                f"SQLite cannot serve {settings.CELERY_WORKER_CONCURRENCY} concurrent Celery worker processes.",
                hint="Set DATABASE_URL to PostgreSQL, or FLO_CELERY_CONCURRENCY=1.",
                id="flo.E001",
            )
        ]
    return []
