"""Node secrets at rest: no table contains a node secret in plain text, in any common encoding.

Runs on the database of the current test pass, SQLite or PostgreSQL.
"""

import base64
import json

from django.db import connection

from federation.services.nodes import rotate_node_secret
from tests.conftest import SignedNode


def encodings_of(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.urlsafe_b64encode(secret),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
    ]


def stored_values() -> list[tuple[str, bytes]]:
    """Return every non-null value of every table as bytes, with its table name."""
    values = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            for row in cursor.fetchall():
                for value in row:
                    if value is None:
                        continue
                    if isinstance(value, memoryview | bytes | bytearray):
                        values.append((table, bytes(value)))
                    elif isinstance(value, dict | list):
                        values.append((table, json.dumps(value).encode()))
                    else:
                        values.append((table, str(value).encode()))
    return values


def find_plain_secrets(secrets: list[bytes]) -> list[str]:
    found = []
    for table, value in stored_values():
        for secret in secrets:
            if any(encoding in value for encoding in encodings_of(secret)):
                found.append(table)
    return found


def test_secrets_never_stored_in_plain_text(running):
    _, nodes = running
    enrolled_secrets = [node.secret for node in nodes]
    rotated = rotate_node_secret(nodes[0].node, grace_seconds=600)
    rotated_over_api = nodes[1].request("POST", "/api/v1/nodes/me/secret", b'{"grace_seconds": 600}', content_type="application/json")
    assert rotated_over_api.status_code == 200
    api_secret = base64.urlsafe_b64decode(rotated_over_api.json()["secret"])
    assert SignedNode(nodes[1].node, api_secret).request("GET", "/api/v1/task").status_code == 200

    found = find_plain_secrets([*enrolled_secrets, rotated.secret, api_secret])

    assert found == []
    assert len(stored_values()) > 50


def test_scan_finds_a_planted_secret(running):
    # The scan itself must be able to fail: store one secret's hex in a text column.
    _, nodes = running
    node = nodes[0].node
    node.status_reason = nodes[0].secret.hex()
    node.save(update_fields=["status_reason"])

    found = find_plain_secrets([nodes[0].secret])

    assert found == ["federation_node"]
