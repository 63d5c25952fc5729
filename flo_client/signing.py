"""Request signing for the device protocol, shared by the server and devices.

A request is signed with HMAC-SHA256 under the node's secret over the
canonical string

    FLO-HMAC-SHA256 \\n METHOD \\n PATH \\n TIMESTAMP \\n NONCE \\n SHA256_HEX(BODY)

where PATH includes the query string, TIMESTAMP is whole Unix seconds and
BODY is the exact byte string sent; nothing is re-serialised before hashing.
Because the timestamp and nonce are inside the MAC, rewriting either header
invalidates the signature.
"""

import hashlib
import hmac
import re
import secrets
import time

SCHEME = "FLO-HMAC-SHA256"
HEADER_NODE = "X-FLO-Node"
HEADER_TIMESTAMP = "X-FLO-Timestamp"
HEADER_NONCE = "X-FLO-Nonce"
HEADER_SIGNATURE = "X-FLO-Signature"

# Lowercase hex only: a signature has exactly one accepted spelling.
SIGNATURE_PATTERN = re.compile(r"[0-9a-f]{64}")
# Whole seconds, at most 10 digits (valid until the year 2286).
TIMESTAMP_PATTERN = re.compile(r"[0-9]{1,10}")
NONCE_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")
SECRET_BYTES = 32


def canonical_request(*, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """Build the byte string that a signature covers."""
    body_digest = hashlib.sha256(body).hexdigest()
    return "\n".join([SCHEME, method.upper(), path, timestamp, nonce, body_digest]).encode("utf-8")


def compute_signature(secret: bytes, canonical: bytes) -> str:
    """Return the lowercase hex HMAC-SHA256 of a canonical request."""
    return hmac.new(secret, canonical, hashlib.sha256).hexdigest()


def is_valid_signature(secret: bytes, canonical: bytes, signature: str) -> bool:
    """Check a signature in constant time; a malformed signature is simply invalid."""
    if not SIGNATURE_PATTERN.fullmatch(signature):
        return False
    expected = hmac.new(secret, canonical, hashlib.sha256).digest()
    return hmac.compare_digest(expected, bytes.fromhex(signature))


def new_nonce() -> str:
    """Return a fresh random nonce (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


def sign_request(
    *,
    node_id: str,
    secret: bytes,
    method: str,
    path: str,
    body: bytes = b"",
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Return the protocol headers for one request.

    Args:
        timestamp: Unix seconds; defaults to now. Tests pass other values.
        nonce: defaults to a fresh random nonce.
    """
    timestamp_text = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or new_nonce()
    canonical = canonical_request(method=method, path=path, timestamp=timestamp_text, nonce=nonce, body=body)
    return {
        HEADER_NODE: node_id,
        HEADER_TIMESTAMP: timestamp_text,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: compute_signature(secret, canonical),
    }
