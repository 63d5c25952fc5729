"""Encryption at rest for node secrets (AES-256-GCM from `cryptography`).

The node id is bound as associated data, so a ciphertext copied onto
another node's row fails to decrypt instead of granting that node's identity.
"""

import base64
import binascii
import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
DEV_KEY_FILENAME = "node-secret.key"


def encrypt_node_secret(secret: bytes, *, node_id: str) -> bytes:
    """Return nonce + ciphertext of a node secret."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(_load_key()).encrypt(nonce, secret, node_id.encode())


def decrypt_node_secret(stored: bytes, *, node_id: str) -> bytes:
    """Decrypt a stored node secret.

    Raises:
        ImproperlyConfigured: when the key does not match the stored data,
            which means FLO_NODE_SECRET_KEY changed since the node enrolled.
    """
    stored = bytes(stored)
    try:
        return AESGCM(_load_key()).decrypt(stored[:NONCE_BYTES], stored[NONCE_BYTES:], node_id.encode())
    except InvalidTag as error:
        raise ImproperlyConfigured(
            f"The secret of node {node_id} cannot be decrypted with the configured key; FLO_NODE_SECRET_KEY must be the key used at enrolment."
        ) from error


@lru_cache(maxsize=1)
def _load_key() -> bytes:
    encoded = settings.FLO_NODE_SECRET_KEY
    if encoded is None:
        encoded = _read_or_create_dev_key(Path(settings.FLO_DATA_DIR) / DEV_KEY_FILENAME)
    try:
        key = base64.urlsafe_b64decode(encoded.encode())
    except (binascii.Error, ValueError) as error:
        raise ImproperlyConfigured("FLO_NODE_SECRET_KEY is not URL-safe base64.") from error
    if len(key) != KEY_BYTES:
        raise ImproperlyConfigured(f"FLO_NODE_SECRET_KEY must decode to {KEY_BYTES} bytes, got {len(key)}.")
    return key


def _read_or_create_dev_key(path: Path) -> str:
    if path.exists():
        return path.read_text(encoding="ascii").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode()
    # O_EXCL: two processes starting at once cannot both write a key.
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(descriptor, "w", encoding="ascii") as key_file:
        key_file.write(encoded + "\n")
    logger.warning("generated a development key for node secrets path=%s; set FLO_NODE_SECRET_KEY in production", path)
    return encoded
