"""Keyed pseudonyms for node ids in exported reports."""

import hashlib
import hmac
import re
import secrets
from typing import Any

KEY_BYTES = 32
# 16 hex digits (64 bits) keep pseudonyms short; two nodes of one federation
# collide with probability about n^2 / 2^65, negligible for any fleet size.
PSEUDONYM_HEX_DIGITS = 16
UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Keys whose values name a device in free text; a report drops them.
IDENTIFYING_KEYS = frozenset({"display_name"})


class Pseudonymizer:
    """Replace node ids with HMAC-SHA256 pseudonyms under one key.

    Each report gets a fresh random key that is never stored or returned, so
    pseudonyms are stable within a report but cannot be linked across
    reports or reversed without the key.
    """

    def __init__(self, key: bytes | None = None):
        if key is not None and len(key) < KEY_BYTES:
            raise ValueError(f"The pseudonym key must have at least {KEY_BYTES} bytes, got {len(key)}.")
        self._key = key if key is not None else secrets.token_bytes(KEY_BYTES)

    def pseudonym(self, node_id: str) -> str:
        """Return the pseudonym of a node id given as its canonical UUID string."""
        digest = hmac.new(self._key, str(node_id).lower().encode("ascii"), hashlib.sha256).hexdigest()
        return "node-" + digest[:PSEUDONYM_HEX_DIGITS]

    def scrub(self, value: Any) -> Any:
        """Return a copy of a JSON-like value with every UUID in strings and keys replaced by its pseudonym.

        Dict entries under IDENTIFYING_KEYS are dropped. Other UUIDs (not
        node ids) are replaced as well, which loses nothing a report needs.
        """
        if isinstance(value, str):
            return UUID_PATTERN.sub(lambda match: self.pseudonym(match.group(0)), value)
        if isinstance(value, dict):
            return {self.scrub(key): self.scrub(item) for key, item in value.items() if key not in IDENTIFYING_KEYS}
        if isinstance(value, list | tuple):
            return [self.scrub(item) for item in value]
        return value
