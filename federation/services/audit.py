"""The audit log: one row per operator action or lifecycle event."""

from federation.models import AuditEntry


def record_audit(action: str, *, federation=None, actor=None, actor_label: str = "system", target: str = "", details: dict | None = None, remote_addr: str | None = None) -> AuditEntry:
    """Append an audit entry. Call it inside the transaction of the change it records."""
    if actor is not None:
        actor_label = actor.get_username()
    return AuditEntry.objects.create(
        action=action,
        federation=federation,
        actor=actor,
        actor_label=actor_label,
        target=target,
        details=details or {},
        remote_addr=remote_addr,
    )
