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


def record_admin_action(request, action: str, obj, message="") -> AuditEntry:
    """Append an audit entry for a change an operator made in the admin site, with the operator and their address."""
    federation = obj if obj.__class__.__name__ == "Federation" else getattr(obj, "federation", None)
    return record_audit(
        action,
        federation=federation,
        actor=request.user,
        target=f"{obj._meta.label_lower}:{obj.pk}",
        details={"object": str(obj)[:200], "message": str(message)[:1000]},
        remote_addr=request.META.get("REMOTE_ADDR"),
    )
