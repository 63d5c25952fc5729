"""Pausing, resuming and stopping a federation on an operator's request."""

import logging

from django.db import transaction

from federation.exceptions import InvalidFederationConfig
from federation.models import Federation, TrainingRound
from federation.services.audit import record_audit
from federation.services.rounds import fail_round, open_next_round
from monitoring.events import publish_on_commit

logger = logging.getLogger(__name__)

STOPPED_ROUND_REASON = "The federation was stopped by an operator."


def pause_federation(federation: Federation, *, actor=None, remote_addr: str | None = None, reason: str = "") -> Federation:
    """Move a running federation to paused.

    A round already open stays open: devices get no new task and the API
    rejects updates with federation_not_running, and the round settles at its
    deadline with what arrived before the pause. No new round opens until
    the federation resumes.

    Raises:
        InvalidFederationConfig: when the federation is not running.
    """
    return _transition(
        federation,
        from_statuses=[Federation.Status.RUNNING],
        to_status=Federation.Status.PAUSED,
        action="federation.paused",
        actor=actor,
        remote_addr=remote_addr,
        reason=reason,
    )


def resume_federation(federation: Federation, *, actor=None, remote_addr: str | None = None) -> Federation:
    """Move a paused federation back to running and open its next round if none is in flight.

    Raises:
        InvalidFederationConfig: when the federation is not paused.
    """
    federation = _transition(
        federation,
        from_statuses=[Federation.Status.PAUSED],
        to_status=Federation.Status.RUNNING,
        action="federation.resumed",
        actor=actor,
        remote_addr=remote_addr,
        reason="",
        then=lambda federation_id: transaction.on_commit(lambda: open_next_round(federation_id)),
    )
    return federation


def stop_federation(federation: Federation, *, actor=None, remote_addr: str | None = None, reason: str = "") -> Federation:
    """Stop a draft, running or paused federation for good; its open round fails with a reason.

    A round already aggregating finishes and writes its model version, but
    no further round opens, because only a running federation opens rounds.

    Raises:
        InvalidFederationConfig: when the federation is already completed or stopped.
    """

    def fail_open_round(federation_id: int) -> None:
        open_round_id = TrainingRound.objects.filter(federation_id=federation_id, state=TrainingRound.State.OPEN).values_list("id", flat=True).first()
        if open_round_id is not None:
            transaction.on_commit(lambda: fail_round(open_round_id, STOPPED_ROUND_REASON, from_state=TrainingRound.State.OPEN))

    return _transition(
        federation,
        from_statuses=[Federation.Status.DRAFT, Federation.Status.RUNNING, Federation.Status.PAUSED],
        to_status=Federation.Status.STOPPED,
        action="federation.stopped",
        actor=actor,
        remote_addr=remote_addr,
        reason=reason or "Stopped by an operator.",
        then=fail_open_round,
    )


def _transition(federation: Federation, *, from_statuses: list[str], to_status: str, action: str, actor, remote_addr: str | None, reason: str, then=None) -> Federation:
    """Change the status with a conditional UPDATE, so of two concurrent requests only one succeeds, and audit it."""
    with transaction.atomic():
        changed = Federation.objects.filter(id=federation.id, status__in=from_statuses).update(status=to_status, status_reason=reason)
        federation.refresh_from_db()
        if not changed:
            allowed = " or ".join(from_statuses)
            raise InvalidFederationConfig(f"Federation {federation.id} is {federation.status}; only a {allowed} federation can become {to_status}.")
        record_audit(action, federation=federation, actor=actor, target=f"federation:{federation.id}", details={"reason": reason}, remote_addr=remote_addr)
        publish_on_commit(federation.id, "federation.status", {"status": to_status, "reason": reason})
        if then is not None:
            then(federation.id)
    logger.info("federation status changed federation=%s status=%s actor=%s", federation.id, to_status, getattr(actor, "username", "system"))
    return federation
