"""Enrolment tokens and device enrolment."""

import hashlib
import logging
import secrets
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from federation.crypto import encrypt_node_secret
from federation.exceptions import (
    EnrolmentTokenExpired,
    EnrolmentTokenUsed,
    FederationFull,
    InvalidEnrolmentToken,
    InvalidFederationConfig,
)
from federation.models import EnrolmentToken, Federation, Node, Reputation
from federation.services.audit import record_audit
from federation.services.locks import lock_federation
from flo_client.signing import SECRET_BYTES
from monitoring.events import publish_on_commit
from privacy.services.budgets import create_budget, epsilon_allocation, has_local_dp

logger = logging.getLogger(__name__)

TOKEN_BYTES = 24


# Tokens one call may issue; more would hold one transaction for minutes.
MAX_TOKENS_PER_CALL = 100_000


def issue_enrolment_tokens(
    federation: Federation,
    *,
    count: int,
    ttl_seconds: int,
    sensitivity_class: str = Node.SensitivityClass.PERSONAL,
    actor=None,
    remote_addr: str | None = None,
) -> list[str]:
    """Create one-time tokens and return them in plain text; only their hashes are stored.

    Each node enrolled with one of these tokens gets `sensitivity_class`,
    which sets its epsilon allocation under record-level DP.

    Raises:
        InvalidFederationConfig: on a non-positive count or lifetime, an
            unknown class, or a class the federation gives no allocation.
    """
    if count < 1 or ttl_seconds < 1:
        raise InvalidFederationConfig(f"count and ttl_seconds must be positive, got {count} and {ttl_seconds}.")
    if count > MAX_TOKENS_PER_CALL:
        raise InvalidFederationConfig(f"count must be at most {MAX_TOKENS_PER_CALL} per call, got {count}; issue tokens in batches.")
    if sensitivity_class not in Node.SensitivityClass.values:
        raise InvalidFederationConfig(f"Unknown sensitivity class {sensitivity_class!r}; use {', '.join(Node.SensitivityClass.values)}.")
    if has_local_dp(federation) and epsilon_allocation(federation, sensitivity_class) is None:
        raise InvalidFederationConfig(f"Federation {federation.id} sets no epsilon allocation for class {sensitivity_class!r}; add it to sensitivity_budgets.")
    expires_at = timezone.now() + timedelta(seconds=ttl_seconds)
    tokens = [secrets.token_urlsafe(TOKEN_BYTES) for _ in range(count)]
    with transaction.atomic():
        EnrolmentToken.objects.bulk_create(
            [
                EnrolmentToken(federation=federation, token_sha256=_hash_token(token), expires_at=expires_at, sensitivity_class=sensitivity_class, created_by=actor)
                for token in tokens
            ]
        )
        record_audit(
            "enrolment_tokens.issued",
            federation=federation,
            actor=actor,
            target=f"federation:{federation.id}",
            details={"count": count, "expires_at": expires_at.isoformat(), "sensitivity_class": sensitivity_class},
            remote_addr=remote_addr,
        )
    logger.info("enrolment tokens issued federation=%s count=%d ttl_seconds=%d", federation.id, count, ttl_seconds)
    return tokens


def enrol_node(*, token: str, display_name: str) -> tuple[Node, bytes]:
    """Spend a token and enrol a device.

    Returns:
        The node and its HMAC secret in plain text, which is shown only here.

    Raises:
        InvalidEnrolmentToken, EnrolmentTokenExpired, EnrolmentTokenUsed.
        FederationFull: the federation has max_nodes nodes that are not
            revoked; the token stays unused.
    """
    with transaction.atomic():
        enrolment_token = EnrolmentToken.objects.select_for_update(no_key=True, of=("self",)).select_related("federation").filter(token_sha256=_hash_token(token)).first()
        if enrolment_token is None:
            raise InvalidEnrolmentToken("The enrolment token is not valid; ask the operator for a new one.")
        if enrolment_token.used_at is not None:
            raise EnrolmentTokenUsed("The enrolment token was already used; each token enrols one device.")
        if enrolment_token.expires_at <= timezone.now():
            raise EnrolmentTokenExpired(f"The enrolment token expired at {enrolment_token.expires_at.isoformat()}; ask the operator for a new one.")

        _check_capacity(enrolment_token.federation_id)

        # Conditional update: of two concurrent enrolments with one token, only one changes a row.
        claimed = EnrolmentToken.objects.filter(id=enrolment_token.id, used_at__isnull=True).update(used_at=timezone.now())
        if not claimed:
            raise EnrolmentTokenUsed("The enrolment token was already used; each token enrols one device.")

        secret = secrets.token_bytes(SECRET_BYTES)
        node = Node(federation=enrolment_token.federation, display_name=display_name, sensitivity_class=enrolment_token.sensitivity_class)
        node.secret_ciphertext = encrypt_node_secret(secret, node_id=str(node.id))
        node.save()
        Reputation.objects.create(node=node)
        create_budget(node)
        EnrolmentToken.objects.filter(id=enrolment_token.id).update(node=node)
        record_audit("node.enrolled", federation=node.federation, actor_label=f"node:{node.id}", target=f"node:{node.id}", details={"display_name": display_name})
        publish_on_commit(node.federation_id, "node.enrolled", {"node_id": str(node.id), "display_name": display_name})
    logger.info("node enrolled federation=%s node=%s", node.federation_id, node.id)
    return node, secret


def _check_capacity(federation_id: int) -> None:
    # The federation row lock serialises enrolments into one federation, so
    # two devices cannot both take the last free place.
    federation = lock_federation(federation_id)
    if federation.max_nodes is None:
        return
    enrolled = Node.objects.filter(federation=federation).exclude(status=Node.Status.REVOKED).count()
    if enrolled >= federation.max_nodes:
        raise FederationFull(f"Federation {federation.id} already has its maximum of {federation.max_nodes} nodes; ask the operator to revoke a node or raise max_nodes.")


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
