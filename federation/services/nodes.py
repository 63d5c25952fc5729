"""Operator and device actions on a node: secret rotation, quarantine and revocation. Reinstating lives with reputation."""

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from federation.crypto import encrypt_node_secret
from federation.exceptions import InvalidNodeState, InvalidSecretRotation
from federation.models import Node
from federation.services.audit import record_audit
from federation.services.locks import lock_node
from flo_client.signing import SECRET_BYTES
from monitoring.events import publish_on_commit

logger = logging.getLogger(__name__)

# Longest time a replaced secret keeps verifying requests. A device that
# needs longer to pick up its new secret should be enrolled again instead.
MAX_SECRET_GRACE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class RotatedSecret:
    """A node's new HMAC secret in plain text, returned once, and when its old secret stops verifying."""

    node: Node
    secret: bytes
    previous_secret_valid_until: datetime | None


def rotate_node_secret(node: Node, *, grace_seconds: int, actor=None, actor_label: str = "system", remote_addr: str | None = None) -> RotatedSecret:
    """Give a node a new HMAC secret; its current secret keeps verifying for `grace_seconds`.

    Only the new and the current secret verify during the grace period: a
    secret replaced by an earlier rotation stops verifying at once. With
    `grace_seconds` 0 the current secret stops verifying at once.

    Raises:
        InvalidSecretRotation: `grace_seconds` is not an integer from 0 to MAX_SECRET_GRACE_SECONDS.
        InvalidNodeState: the node is revoked.
    """
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int) or not 0 <= grace_seconds <= MAX_SECRET_GRACE_SECONDS:
        raise InvalidSecretRotation(f"grace_seconds must be an integer from 0 to {MAX_SECRET_GRACE_SECONDS}, got {str(grace_seconds)[:40]!r}.")

    secret = secrets.token_bytes(SECRET_BYTES)
    with transaction.atomic():
        node = lock_node(node.id)
        if node.status == Node.Status.REVOKED:
            raise InvalidNodeState(f"Node {node.id} is revoked; a revoked node gets no new secret.")
        now = timezone.now()
        valid_until = now + timedelta(seconds=grace_seconds) if grace_seconds > 0 else None
        node.previous_secret_ciphertext = node.secret_ciphertext if valid_until else None
        node.previous_secret_expires_at = valid_until
        node.secret_ciphertext = encrypt_node_secret(secret, node_id=str(node.id))
        node.secret_rotated_at = now
        node.save(update_fields=["secret_ciphertext", "previous_secret_ciphertext", "previous_secret_expires_at", "secret_rotated_at"])
        record_audit(
            "node.secret_rotated",
            federation=node.federation,
            actor=actor,
            actor_label=actor_label,
            target=f"node:{node.id}",
            details={"grace_seconds": grace_seconds, "previous_secret_valid_until": valid_until.isoformat() if valid_until else None},
            remote_addr=remote_addr,
        )
    logger.info("node secret rotated federation=%s node=%s grace_seconds=%d", node.federation_id, node.id, grace_seconds)
    return RotatedSecret(node=node, secret=secret, previous_secret_valid_until=valid_until)


def revoke_node(node: Node, *, reason: str = "", actor=None, remote_addr: str | None = None) -> Node:
    """Revoke a node: every later request it signs is rejected with node_revoked, in every server process.

    The API reads the node's status from the database on every request, so
    no process can keep serving a revoked node from a cache. Updates the
    node already sent to an open round are left out of its aggregation,
    unless that aggregation has already started.

    Raises:
        InvalidNodeState: the node is already revoked.
    """
    with transaction.atomic():
        node = lock_node(node.id)
        if node.status == Node.Status.REVOKED:
            raise InvalidNodeState(f"Node {node.id} is already revoked.")
        _set_status(node, Node.Status.REVOKED, "node.revoked", reason=reason or "Revoked by an operator.", actor=actor, remote_addr=remote_addr)
    logger.warning("node revoked federation=%s node=%s", node.federation_id, node.id)
    return node


def quarantine_node(node: Node, *, actor=None, remote_addr: str | None = None, reason: str = "") -> Node:
    """Quarantine an active node by hand: it is no longer selected, and its updates not yet aggregated are left out.

    NOTE: a round already open that selected the node still counts it, and
    so does a round being opened or aggregated at the same moment. A round
    that waits for every selected node (central DP, or target_updates
    equal to round_size) therefore closes only at its deadline.

    Raises:
        InvalidNodeState: when the node is not active.
    """
    with transaction.atomic():
        node = lock_node(node.id)
        if node.status != Node.Status.ACTIVE:
            raise InvalidNodeState(f"Node {node.id} is {node.status}; only an active node can be quarantined.")
        reason = reason or "Quarantined by an operator; an operator can reinstate the node."
        _set_status(node, Node.Status.QUARANTINED, "node.quarantined", reason=reason, actor=actor, remote_addr=remote_addr)
    logger.info("node quarantined by an operator federation=%s node=%s actor=%s", node.federation_id, node.id, getattr(actor, "username", "system"))
    return node


def _set_status(node: Node, status: str, event: str, *, reason: str, actor, remote_addr: str | None) -> None:
    """Save the node's new status and reason, audit the change and publish `event` once the transaction commits.

    Call it inside transaction.atomic(), after locking the node's row with lock_node().
    """
    previous_status = node.status
    node.status = status
    node.status_reason = reason
    node.save(update_fields=["status", "status_reason"])
    record_audit(
        event,
        federation=node.federation,
        actor=actor,
        target=f"node:{node.id}",
        details={"previous_status": previous_status, "reason": reason},
        remote_addr=remote_addr,
    )
    publish_on_commit(node.federation_id, event, {"node_id": str(node.id), "display_name": node.display_name, "reason": reason})
