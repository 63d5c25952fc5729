"""Node credentials: secret rotation with a grace period, revocation, and the operator commands."""

import base64
import io
import json
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from federation.exceptions import InvalidNodeState, InvalidSecretRotation
from federation.models import AuditEntry, Node
from federation.services.nodes import MAX_SECRET_GRACE_SECONDS, revoke_node, rotate_node_secret
from tests.assertions import assert_error, assert_state_unchanged, snapshot_stored_state
from tests.conftest import SignedNode

SECRET_PATH = "/api/v1/nodes/me/secret"
TASK_PATH = "/api/v1/task"


@pytest.fixture
def nodes(running):
    _, signed_nodes = running
    for signed_node in signed_nodes:
        signed_node.client.raise_request_exception = False
    return signed_nodes


def rotate_over_api(signed_node: SignedNode, payload: dict | None = None):
    body = json.dumps(payload if payload is not None else {}).encode()
    return signed_node.request("POST", SECRET_PATH, body, content_type="application/json")


def with_secret(signed_node: SignedNode, secret: bytes) -> SignedNode:
    return SignedNode(signed_node.node, secret)


def end_grace_period(signed_node: SignedNode) -> None:
    Node.objects.filter(id=signed_node.node.id).update(previous_secret_expires_at=timezone.now() - timedelta(seconds=1))


# --- Rotation over the device API --------------------------------------------


def test_device_rotates_own_secret(nodes):
    node = nodes[0]

    response = rotate_over_api(node, {"grace_seconds": 120})

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    new_secret = base64.urlsafe_b64decode(body["secret"])
    assert body["node_id"] == str(node.node.id)
    assert len(new_secret) == 32
    assert new_secret != node.secret
    assert body["previous_secret_valid_until"] is not None
    assert with_secret(node, new_secret).request("GET", TASK_PATH).status_code == 200
    entry = AuditEntry.objects.get(action="node.secret_rotated")
    assert entry.actor_label == f"node:{node.node.id}"
    assert entry.remote_addr == "127.0.0.1"
    assert entry.details["grace_seconds"] == 120


def test_old_secret_verifies_during_grace(nodes):
    node = nodes[0]
    assert rotate_over_api(node, {"grace_seconds": 120}).status_code == 200

    response = node.submit(round_number=1)

    assert response.status_code == 202


def test_old_secret_rejected_after_grace(nodes):
    node = nodes[0]
    new_secret = base64.urlsafe_b64decode(rotate_over_api(node, {"grace_seconds": 120}).json()["secret"])
    end_grace_period(node)
    before = snapshot_stored_state()

    old = node.submit(round_number=1)

    assert_error(old, status=401, code="invalid_signature")
    assert_state_unchanged(before)
    assert with_secret(node, new_secret).submit(round_number=1).status_code == 202


def test_zero_grace_drops_old_secret_at_once(nodes):
    node = nodes[0]

    response = rotate_over_api(node, {"grace_seconds": 0})

    assert response.json()["previous_secret_valid_until"] is None
    assert_error(node.request("GET", TASK_PATH), status=401, code="invalid_signature")
    assert Node.objects.get(id=node.node.id).previous_secret_ciphertext is None


def test_default_grace_comes_from_settings(nodes, settings):
    settings.FLO_SECRET_GRACE_SECONDS = 90
    started = timezone.now()

    response = rotate_over_api(nodes[0])

    assert response.status_code == 200
    expires_at = Node.objects.get(id=nodes[0].node.id).previous_secret_expires_at
    assert timedelta(seconds=89) <= expires_at - started <= timedelta(seconds=92)


def test_rotation_signed_with_previous_secret_rejected(nodes):
    node = nodes[0]
    assert rotate_over_api(node, {"grace_seconds": 120}).status_code == 200
    stored_before = Node.objects.get(id=node.node.id).secret_ciphertext

    response = rotate_over_api(node, {"grace_seconds": 120})

    assert_error(response, status=403, code="previous_secret_used")
    assert bytes(Node.objects.get(id=node.node.id).secret_ciphertext) == bytes(stored_before)


def test_second_rotation_drops_oldest_secret(nodes):
    node = nodes[0]
    second = base64.urlsafe_b64decode(rotate_over_api(node, {"grace_seconds": 120}).json()["secret"])
    third = base64.urlsafe_b64decode(rotate_over_api(with_secret(node, second), {"grace_seconds": 120}).json()["secret"])

    oldest = node.request("GET", TASK_PATH)

    assert_error(oldest, status=401, code="invalid_signature")
    assert with_secret(node, second).request("GET", TASK_PATH).status_code == 200
    assert with_secret(node, third).request("GET", TASK_PATH).status_code == 200


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"grace_seconds": -1}, id="negative"),
        pytest.param({"grace_seconds": MAX_SECRET_GRACE_SECONDS + 1}, id="above-maximum"),
        pytest.param({"grace_seconds": "soon"}, id="string"),
        pytest.param({"grace_seconds": 1.5}, id="fraction"),
        pytest.param({"grace_seconds": 60, "secret": "chosen-by-device"}, id="unknown-field"),
        pytest.param([60], id="not-an-object"),
    ],
)
def test_rejects_invalid_rotation_request(nodes, payload):
    node = nodes[0]
    stored_before = bytes(Node.objects.get(id=node.node.id).secret_ciphertext)

    response = rotate_over_api(node, payload)

    assert_error(response, status=400, code="invalid_request")
    assert bytes(Node.objects.get(id=node.node.id).secret_ciphertext) == stored_before
    assert not AuditEntry.objects.filter(action="node.secret_rotated").exists()


def test_rejects_rotation_with_malformed_json(nodes):
    node = nodes[0]

    response = node.request("POST", SECRET_PATH, b'{"grace_seconds": ', content_type="application/json")

    assert_error(response, status=400, code="parse_error")
    assert node.request("GET", TASK_PATH).status_code == 200


def test_rejects_rotation_by_revoked_node(nodes):
    node = nodes[0]
    revoke_node(node.node, reason="Device reported stolen.")

    response = rotate_over_api(node, {"grace_seconds": 60})

    assert_error(response, status=403, code="node_revoked")


# --- Services -------------------------------------------------------------------


@pytest.mark.parametrize("grace_seconds", [-1, MAX_SECRET_GRACE_SECONDS + 1, True, 1.0])
def test_service_rejects_invalid_grace(nodes, grace_seconds):
    with pytest.raises(InvalidSecretRotation):
        rotate_node_secret(nodes[0].node, grace_seconds=grace_seconds)


def test_service_refuses_to_rotate_revoked_node(nodes):
    revoke_node(nodes[0].node, reason="Device reported stolen.")

    with pytest.raises(InvalidNodeState):
        rotate_node_secret(nodes[0].node, grace_seconds=0)


def test_revocation_rejects_next_request(nodes):
    node = nodes[0]
    assert node.request("GET", TASK_PATH).status_code == 200

    revoke_node(node.node, reason="Device reported stolen.")
    response = node.request("GET", TASK_PATH)

    body = assert_error(response, status=403, code="node_revoked")
    assert "revoked" in body["detail"]
    entry = AuditEntry.objects.get(action="node.revoked")
    assert entry.details == {"previous_status": "active", "reason": "Device reported stolen."}


def test_revoking_twice_is_an_error(nodes):
    revoke_node(nodes[0].node, reason="Device reported stolen.")

    with pytest.raises(InvalidNodeState):
        revoke_node(nodes[0].node, reason="Again.")


# --- Operator commands --------------------------------------------------------


def run_command(*arguments) -> str:
    output = io.StringIO()
    call_command(*arguments, stdout=output)
    return output.getvalue()


def test_rotate_command_prints_new_secret_once(nodes):
    node = nodes[0]
    operator = get_user_model().objects.create_user("alice", password="a-long-operator-password")

    printed = json.loads(run_command("rotate_node_secret", str(node.node.id), "--grace-seconds", "60", "--operator", "alice"))

    new_secret = base64.urlsafe_b64decode(printed["secret"])
    assert printed["node_id"] == str(node.node.id)
    assert printed["previous_secret_valid_until"] is not None
    assert with_secret(node, new_secret).request("GET", TASK_PATH).status_code == 200
    assert node.request("GET", TASK_PATH).status_code == 200
    entry = AuditEntry.objects.get(action="node.secret_rotated")
    assert entry.actor == operator
    assert entry.actor_label == "alice"


def test_rotate_command_defaults_to_no_grace(nodes):
    node = nodes[0]

    printed = json.loads(run_command("rotate_node_secret", str(node.node.id)))

    assert printed["previous_secret_valid_until"] is None
    assert_error(node.request("GET", TASK_PATH), status=401, code="invalid_signature")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(["not-a-uuid"], "not a node id", id="malformed-id"),
        pytest.param(["00000000-0000-0000-0000-000000000000"], "does not exist", id="unknown-node"),
        pytest.param(["NODE", "--grace-seconds", "-5"], "grace_seconds", id="negative-grace"),
        pytest.param(["NODE", "--operator", "nobody"], "'nobody' does not exist", id="unknown-operator"),
    ],
)
def test_rotate_command_rejects_bad_arguments(nodes, arguments, message):
    arguments = [str(nodes[0].node.id) if argument == "NODE" else argument for argument in arguments]

    with pytest.raises(CommandError, match=message):
        run_command("rotate_node_secret", *arguments)


def test_revoke_command_revokes_and_audits(nodes):
    node = nodes[0]
    operator = get_user_model().objects.create_user("bob", password="a-long-operator-password")

    printed = json.loads(run_command("revoke_node", str(node.node.id), "--reason", "Lost in transit.", "--operator", "bob"))

    assert printed == {"node_id": str(node.node.id), "status": "revoked"}
    assert_error(node.request("GET", TASK_PATH), status=403, code="node_revoked")
    entry = AuditEntry.objects.get(action="node.revoked")
    assert entry.actor == operator
    with pytest.raises(CommandError, match="already revoked"):
        run_command("revoke_node", str(node.node.id))
