"""Celery tasks: thin wrappers that pass ids to the round services."""

import logging

from celery import shared_task
from django.db import OperationalError

from federation.services import aggregation, rounds, update_store

logger = logging.getLogger(__name__)

# A payload file this old with no update row is not a submission in progress:
# a request that slow would have timed out long before.
ORPHAN_MIN_AGE_SECONDS = 3600


@shared_task(
    name="federation.aggregate_round",
    acks_late=True,
    time_limit=600,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def aggregate_round_task(round_id: int) -> int | None:
    """Aggregate one round; safe to run twice (see aggregation.aggregate_round)."""
    version = aggregation.aggregate_round(round_id)
    return version.version if version else None


@shared_task(name="federation.close_expired_rounds", acks_late=True, time_limit=300)
def close_expired_rounds_task() -> int:
    """Settle rounds past their deadline; scheduled periodically by Celery beat."""
    return rounds.close_expired_rounds()


@shared_task(name="federation.delete_orphaned_payloads", acks_late=True, time_limit=1800)
def delete_orphaned_payloads_task() -> int:
    """Delete payload files of submissions that never committed; scheduled hourly by Celery beat."""
    return update_store.delete_orphaned_payloads(older_than_seconds=ORPHAN_MIN_AGE_SECONDS)
