"""Signal receivers, connected in FederationConfig.ready(): audit entries for operator sign-ins, and payload files of deleted updates."""

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from federation.models import ModelUpdate
from federation.services import update_store
from federation.services.audit import record_audit


@receiver(user_logged_in, dispatch_uid="federation.audit_login")
def audit_login(sender, request, user, **kwargs):
    record_audit("operator.login", actor=user, remote_addr=_remote_addr(request))


@receiver(user_logged_out, dispatch_uid="federation.audit_logout")
def audit_logout(sender, request, user, **kwargs):
    if user is not None:
        record_audit("operator.logout", actor=user, remote_addr=_remote_addr(request))


@receiver(user_login_failed, dispatch_uid="federation.audit_login_failed")
def audit_login_failed(sender, credentials, request=None, **kwargs):
    # Django passes the credentials with the password already masked.
    username = str(credentials.get("username", ""))[:200]
    record_audit("operator.login_failed", actor_label=username, remote_addr=_remote_addr(request))


def _remote_addr(request) -> str | None:
    # NOTE: behind a reverse proxy this is the proxy's address unless the proxy sets REMOTE_ADDR.
    return request.META.get("REMOTE_ADDR") if request is not None else None


@receiver(post_delete, sender=ModelUpdate, dispatch_uid="federation.delete_update_payload")
def delete_update_payload(sender, instance, **kwargs):
    # After the commit, so a rolled-back delete keeps its file.
    name = instance.payload_file
    transaction.on_commit(lambda: update_store.delete_payload(name))
