"""Operator actions on one node: quarantine and revoke. Reinstating lives with reputation."""

import logging

from django.db import transaction

from federation.exceptions import InvalidNodeState
from federation.models import Node
from federation.services.audit import record_audit
from monitoring.events import publish_on_commit

logger = logging.getLogger(__name__)


def quarantine_node(node: Node, *, actor=None, remote_addr: str | None = None, reason: str = "") -> Node:
    """Quarantine an active node by hand: it is no longer selected, and its updates not yet aggregated are left out.

    NOTE: a round already open that selected the node still counts it. A
    round that waits for every selected node (central DP, or target_updates
    equal to round_size) therefore closes only at its deadline.

    Raises:
        InvalidNodeState: when the node is not active.
    """
    status_reason = reason or "Quarantined by an operator; an operator can reinstate the node."
    return _change_status(node, from_status=Node.Status.ACTIVE, to_status=Node.Status.QUARANTINED, status_reason=status_reason, action="node.quarantined", actor=actor, remote_addr=remote_addr)


def revoke_node(node: Node, *, actor=None, remote_addr: str | None = None, reason: str = "") -> Node:
    """Revoke an active or quarantined node for good: every later request it signs is rejected with node_revoked.

    Raises:
        InvalidNodeState: when the node is already revoked.
    """
    status_reason = reason or "Revoked by an operator."
    return _change_status(node, from_status=None, to_status=Node.Status.REVOKED, status_reason=status_reason, action="node.revoked", actor=actor, remote_addr=remote_addr)


def _change_status(node: Node, *, from_status: str | None, to_status: str, status_reason: str, action: str, actor, remote_addr: str | None) -> Node:
    """Lock the node, check its status (any but `to_status` when from_status is None), write, audit and publish the change.

    The audit action doubles as the event kind (node.quarantined, node.revoked).
    """
    with transaction.atomic():
        node = Node.objects.select_for_update().get(id=node.id)
        allowed = node.status != to_status if from_status is None else node.status == from_status
        if not allowed:
            raise InvalidNodeState(f"Node {node.id} is {node.status}; it cannot become {to_status}.")
        previous = node.status
        node.status = to_status
        node.status_reason = status_reason
        node.save(update_fields=["status", "status_reason"])
        record_audit(action, federation=node.federation, actor=actor, target=f"node:{node.id}", details={"previous_status": previous, "reason": status_reason}, remote_addr=remote_addr)
        publish_on_commit(node.federation_id, action, {"node_id": str(node.id), "display_name": node.display_name, "reason": status_reason})
    logger.info("node status changed federation=%s node=%s status=%s actor=%s", node.federation_id, node.id, to_status, getattr(actor, "username", "system"))
    return node
