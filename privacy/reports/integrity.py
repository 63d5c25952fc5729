"""Canonical JSON form of a report and its SHA-256 digest."""

import hashlib
import json
from typing import Any

INTEGRITY_KEY = "integrity"


def canonical_json(document: dict[str, Any]) -> bytes:
    """Serialise a document as UTF-8 JSON with sorted keys and no whitespace.

    Raises:
        ValueError: if the document holds NaN or an infinity, which JSON cannot represent.
    """
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def report_digest(document: dict[str, Any]) -> str:
    """Return the lowercase hex SHA-256 of the canonical JSON of `document` without its integrity member."""
    unsigned = {key: value for key, value in document.items() if key != INTEGRITY_KEY}
    return hashlib.sha256(canonical_json(unsigned)).hexdigest()


def seal(document: dict[str, Any]) -> dict[str, Any]:
    """Return the document with an integrity member holding its digest."""
    unsigned = {key: value for key, value in document.items() if key != INTEGRITY_KEY}
    return {
        **unsigned,
        INTEGRITY_KEY: {
            "algorithm": "sha256",
            "json_sha256": report_digest(unsigned),
            "covers": "the canonical JSON (UTF-8, keys sorted, no whitespace) of this document without its integrity member",
        },
    }


def render_json(document: dict[str, Any]) -> bytes:
    """Render a sealed document as indented UTF-8 JSON for people and machines."""
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
