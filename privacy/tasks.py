"""Celery tasks of the privacy app."""

from celery import shared_task
from django.db import OperationalError

from privacy.services.retention import apply_update_retention


@shared_task(name="privacy.apply_update_retention", acks_late=True, time_limit=1800, autoretry_for=(OperationalError,), retry_backoff=True, max_retries=3)
def apply_update_retention_task() -> dict[str, int]:
    """Clear update payloads past their retention period; scheduled by Celery beat (CELERY_BEAT_SCHEDULE)."""
    # JSON results need string keys.
    return {str(federation_id): count for federation_id, count in apply_update_retention().items()}
