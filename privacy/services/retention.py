"""Retention of device updates: clear payloads older than each federation's retention period."""

import logging
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from federation.models import ModelUpdate, TrainingRound
from federation.services import update_store
from federation.services.audit import record_audit
from privacy.models import ComplianceProfile
from privacy.services.report_sections import RETENTION_AUDIT_ACTION

logger = logging.getLogger(__name__)

# Only settled rounds lose payloads: an open or aggregating round still needs them.
SETTLED_ROUND_STATES = (TrainingRound.State.CLOSED, TrainingRound.State.FAILED)


def apply_update_retention(*, now: datetime | None = None) -> dict[int, int]:
    """Clear the payload of every update older than its federation's retention period, in settled rounds.

    Rows are kept, not deleted: the report counts accepted and rejected
    updates per round and node, and the row's SHA-256 still proves what was
    received. Model versions and the privacy ledger are never touched.
    Federations without a compliance profile have no retention period and
    are skipped. Safe to run twice: a cleared payload no longer matches.

    Returns:
        Federation id -> number of payloads this call cleared (only federations with at least one).
    """
    now = now or timezone.now()
    cleared_by_federation = {}
    for profile in ComplianceProfile.objects.select_related("federation").order_by("federation_id"):
        cleared = _clear_expired_payloads(profile, cutoff=now - timedelta(days=profile.update_retention_days))
        if cleared:
            cleared_by_federation[profile.federation_id] = cleared
    return cleared_by_federation


def _clear_expired_payloads(profile: ComplianceProfile, *, cutoff: datetime) -> int:
    federation = profile.federation
    with transaction.atomic():
        expired = ModelUpdate.objects.select_for_update(no_key=True, of=("self",)).filter(round__federation=federation, round__state__in=SETTLED_ROUND_STATES, received_at__lt=cutoff).exclude(payload_file="")
        # Locked rows, so a concurrent run waits and then finds them cleared.
        rows = list(expired.values_list("id", "payload_file"))
        if not rows:
            return 0
        ids = [row_id for row_id, _ in rows]
        payload_bytes = ModelUpdate.objects.filter(id__in=ids).aggregate(total=Sum("payload_bytes"))["total"] or 0
        rounds = sorted(set(ModelUpdate.objects.filter(id__in=ids).values_list("round__number", flat=True)))
        cleared = ModelUpdate.objects.filter(id__in=ids).update(payload_file="")
        # The files go only once the cleared rows are committed.
        names = [name for _, name in rows]
        transaction.on_commit(lambda: [update_store.delete_payload(name) for name in names])
        record_audit(
            RETENTION_AUDIT_ACTION,
            federation=federation,
            target=f"federation:{federation.id}",
            details={
                "updates_payload_cleared": cleared,
                "payload_bytes_cleared": payload_bytes,
                "rounds": rounds,
                "received_before": cutoff.isoformat(),
                "retention_days": profile.update_retention_days,
                "kept": "update rows (counts, status, SHA-256), model versions and the privacy ledger",
            },
        )
    logger.info("update payloads cleared federation=%s updates=%d bytes=%d cutoff=%s", federation.id, cleared, payload_bytes, cutoff.isoformat())
    return cleared
