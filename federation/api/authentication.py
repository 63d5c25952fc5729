"""DRF authentication for devices: HMAC-signed requests (see flo_client.signing)."""

import logging
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication

from federation import exceptions
from federation.crypto import decrypt_node_secret
from federation.models import Node
from federation.services.nonces import record_nonce
from flo_client import signing

logger = logging.getLogger(__name__)

LAST_SEEN_RESOLUTION_SECONDS = 15

_HEADER_KEYS = {
    "node": "HTTP_" + signing.HEADER_NODE.upper().replace("-", "_"),
    "timestamp": "HTTP_" + signing.HEADER_TIMESTAMP.upper().replace("-", "_"),
    "nonce": "HTTP_" + signing.HEADER_NONCE.upper().replace("-", "_"),
    "signature": "HTTP_" + signing.HEADER_SIGNATURE.upper().replace("-", "_"),
}


@dataclass(frozen=True)
class SignedBy:
    """request.auth of a signed request: whether the node's current secret signed it, or the previous one in its grace period."""

    is_current_secret: bool


class NodeSignatureAuthentication(BaseAuthentication):
    """Authenticate a node from the four protocol headers.

    Order of checks: header presence and format, node lookup, signature over
    the exact body bytes (constant time), timestamp window, nonce first use,
    node status. The nonce is recorded only for correctly signed requests, so
    forged requests cannot burn a device's nonces.
    """

    def authenticate(self, request):
        headers = {key: request.META.get(meta_key) for key, meta_key in _HEADER_KEYS.items()}
        # Absent headers are "missing"; present but empty ones fail their own format check below.
        missing = [getattr(signing, f"HEADER_{key.upper()}") for key, value in headers.items() if value is None]
        if missing:
            raise exceptions.MissingSignatureHeaders(f"Signed requests need the headers {', '.join(missing)}.")
        if not signing.TIMESTAMP_PATTERN.fullmatch(headers["timestamp"]):
            raise exceptions.InvalidTimestamp(
                f"{signing.HEADER_TIMESTAMP} must be whole Unix seconds, got {headers['timestamp'][:40]!r}.",
                extra={"server_time": int(time.time())},
            )
        if not signing.NONCE_PATTERN.fullmatch(headers["nonce"]):
            raise exceptions.InvalidNonce(f"{signing.HEADER_NONCE} must be 16 to 64 characters from A-Z, a-z, 0-9, '-' and '_'.")

        node = _find_node(headers["node"])
        # request.body is the raw bytes as received; the signature never
        # covers a re-serialised form of the parsed payload.
        canonical = signing.canonical_request(
            method=request.method,
            path=request.get_full_path(),
            timestamp=headers["timestamp"],
            nonce=headers["nonce"],
            body=request.body,
        )
        credential = _verify_signature(node, canonical, headers["signature"])

        now = time.time()
        window = settings.FLO_SIGNATURE_WINDOW_SECONDS
        if abs(now - int(headers["timestamp"])) > window:
            raise exceptions.StaleTimestamp(
                f"The request timestamp is more than {window} seconds away from the server time; correct the device clock.",
                extra={"server_time": int(now)},
            )
        record_nonce(str(node.id), headers["nonce"])
        _check_status(node)
        _touch_last_seen(node)
        return node, credential

    def authenticate_header(self, request):
        return signing.SCHEME


def _verify_signature(node: Node, canonical: bytes, signature: str) -> SignedBy:
    """Check the signature under the node's secret, then under its previous secret while that is in its grace period."""
    if signing.is_valid_signature(decrypt_node_secret(node.secret_ciphertext, node_id=str(node.id)), canonical, signature):
        return SignedBy(is_current_secret=True)
    in_grace = node.previous_secret_ciphertext is not None and node.previous_secret_expires_at is not None and node.previous_secret_expires_at > timezone.now()
    if in_grace and signing.is_valid_signature(decrypt_node_secret(node.previous_secret_ciphertext, node_id=str(node.id)), canonical, signature):
        return SignedBy(is_current_secret=False)
    raise exceptions.InvalidSignature("The request signature does not match; sign method, path, timestamp, nonce and body digest with the node secret.")


def _find_node(raw_node_id: str) -> Node:
    try:
        node_id = uuid.UUID(raw_node_id)
    except ValueError:
        raise exceptions.UnknownNode(f"{signing.HEADER_NODE} must be the node id returned at enrolment.") from None
    try:
        return Node.objects.select_related("federation").defer("federation__server_optimizer_state").get(id=node_id)
    except Node.DoesNotExist:
        raise exceptions.UnknownNode(f"No node {node_id} is enrolled; enrol again with a new token.") from None


def _check_status(node: Node) -> None:
    if node.status == Node.Status.REVOKED:
        raise exceptions.NodeRevoked(f"Node {node.id} is revoked and may not call the API.")
    if node.status == Node.Status.QUARANTINED:
        raise exceptions.NodeQuarantined(f"Node {node.id} is quarantined: {(node.status_reason or 'ask the operator to reinstate it.').rstrip('.')}.")


def _touch_last_seen(node: Node) -> None:
    # Liveness is judged in minutes, so one write per LAST_SEEN_RESOLUTION_SECONDS
    # is enough and spares the database a write on every poll.
    now = timezone.now()
    if node.last_seen_at is not None and (now - node.last_seen_at).total_seconds() < LAST_SEEN_RESOLUTION_SECONDS:
        return
    node.last_seen_at = now
    Node.objects.filter(id=node.id).update(last_seen_at=now)
