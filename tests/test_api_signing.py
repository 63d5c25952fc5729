"""Authentication of the signed device API: signatures, timestamps, nonces and node status.

Most tests send an update for round 1, because a wrongly authenticated update
is the request that could change stored state. Each rejection compares the
stored federation state before and after: model updates, model versions,
round states, the privacy ledger, privacy budgets and reputations.
Authentication bookkeeping (UsedNonce rows and Node.last_seen_at) may change
on a rejected request, for example when a revoked node signs correctly, so
the snapshot leaves it out.
"""

import ast
import hashlib
import inspect
import struct
import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from django.conf import settings

from federation.api import authentication
from federation.models import (
    ModelUpdate,
    Node,
    UsedNonce,
)
from federation.services import update_store
from flo_client import signing, wire
from tests.assertions import assert_error, assert_state_unchanged, snapshot_stored_state
from tests.conftest import zero_update

UPDATES_PATH = "/api/v1/updates"
TASK_PATH = "/api/v1/task"
WINDOW_SECONDS = settings.FLO_SIGNATURE_WINDOW_SECONDS
WIRE_PREFIX = struct.Struct("<4sBI")


# --- Helpers ------------------------------------------------------------------


def encode_update(round_number: int = 1) -> bytes:
    return wire.encode_tensors(zero_update(), {"round": round_number, "model_version": 0, "num_examples": 10})


def send_with_headers(signed_node, method: str, path: str, body: bytes, headers: dict):
    """Send a request with exactly these protocol headers. A None value leaves the header out."""
    extra = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items() if value is not None}
    if method == "GET":
        return signed_node.client.get(path, **extra)
    return signed_node.client.generic(method, path, data=body, content_type=wire.MEDIA_TYPE, **extra)


def sign(signed_node, method: str, path: str, body: bytes = b"", **kwargs) -> dict:
    return signing.sign_request(node_id=str(signed_node.node.id), secret=signed_node.secret, method=method, path=path, body=body, **kwargs)


@pytest.fixture
def nodes(running):
    _, signed_nodes = running
    # An unhandled exception comes back as a 500 response, so "never a 500"
    # fails on a status assert instead of erroring inside the test client.
    for signed_node in signed_nodes:
        signed_node.client.raise_request_exception = False
    return signed_nodes


# --- Signature ----------------------------------------------------------------


def replace_last_char(signature: str) -> str:
    return signature[:-1] + ("0" if signature[-1] != "0" else "1")


def replace_first_char(signature: str) -> str:
    return ("0" if signature[0] != "0" else "1") + signature[1:]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda signature: "0" * 64, id="wrong"),
        pytest.param(replace_last_char, id="last-char-wrong"),
        pytest.param(replace_first_char, id="first-char-wrong"),
        pytest.param(lambda signature: "", id="empty"),
        pytest.param(lambda signature: signature[:-1], id="odd-length"),
        pytest.param(lambda signature: signature + "00", id="too-long"),
        pytest.param(lambda signature: signature[:-1] + "g", id="non-hex"),
        pytest.param(lambda signature: signature.upper(), id="uppercase"),
        pytest.param(lambda signature: signature[:32], id="truncated-half"),
    ],
)
def test_invalid_signatures_share_one_response(nodes, mutate):
    node = nodes[0]
    body = encode_update()
    timestamp = int(time.time())
    nonce = signing.new_nonce()
    headers = sign(node, "POST", UPDATES_PATH, body, timestamp=timestamp, nonce=nonce)
    reference = send_with_headers(node, "POST", UPDATES_PATH, body, {**headers, signing.HEADER_SIGNATURE: "f" * 64})
    before = snapshot_stored_state()

    response = send_with_headers(node, "POST", UPDATES_PATH, body, {**headers, signing.HEADER_SIGNATURE: mutate(headers[signing.HEADER_SIGNATURE])})

    assert_error(response, status=401, code="invalid_signature")
    assert response.json() == reference.json()
    assert response["WWW-Authenticate"] == signing.SCHEME
    assert_state_unchanged(before)
    # A forged request does not use up the nonce, so the correctly signed request still goes through.
    assert send_with_headers(node, "POST", UPDATES_PATH, body, headers).status_code == 202


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda request, node, other: {**request, "body": request["body"][:-1] + b"\x01"}, id="body-last-byte"),
        pytest.param(lambda request, node, other: {**request, "path": UPDATES_PATH + "?round=1"}, id="query-string-added"),
        pytest.param(lambda request, node, other: {**request, "headers": sign(node, "PUT", UPDATES_PATH, request["body"])}, id="signed-as-put"),
        pytest.param(lambda request, node, other: {**request, "headers": {**request["headers"], signing.HEADER_NONCE: signing.new_nonce()}}, id="nonce"),
        pytest.param(
            lambda request, node, other: {**request, "headers": {**request["headers"], signing.HEADER_TIMESTAMP: str(int(request["headers"][signing.HEADER_TIMESTAMP]) - 1)}},
            id="timestamp-one-second",
        ),
        pytest.param(lambda request, node, other: {**request, "headers": {**request["headers"], signing.HEADER_NODE: str(other.node.id)}}, id="other-node-id"),
    ],
)
def test_rejects_request_changed_after_signing(nodes, tamper):
    node, other = nodes[0], nodes[1]
    body = encode_update()
    signed = {"method": "POST", "path": UPDATES_PATH, "body": body, "headers": sign(node, "POST", UPDATES_PATH, body)}
    sent = tamper(signed, node, other)
    before = snapshot_stored_state()

    response = send_with_headers(node, sent["method"], sent["path"], sent["body"], sent["headers"])

    assert_error(response, status=401, code="invalid_signature")
    assert_state_unchanged(before)


def comparison_operand_names(tree: ast.AST) -> list[str]:
    """Return the names, attributes and string keys that appear in `==` and `!=` comparisons."""
    names = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(operator, ast.Eq | ast.NotEq) for operator in node.ops):
            continue
        for operand in [node.left, *node.comparators]:
            for part in ast.walk(operand):
                if isinstance(part, ast.Name):
                    names.append(part.id)
                elif isinstance(part, ast.Attribute):
                    names.append(part.attr)
                elif isinstance(part, ast.Constant) and isinstance(part.value, str):
                    names.append(part.value)
    return names


def called_functions(tree: ast.AST) -> set[str]:
    """Return dotted names of calls such as "hmac.compare_digest"."""
    calls = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            calls.add(f"{node.func.value.id}.{node.func.attr}")
    return calls


@pytest.mark.parametrize("module", [authentication, signing], ids=["authentication", "signing"])
def test_signature_never_compared_with_equality(module):
    tree = ast.parse(inspect.getsource(module))

    names = comparison_operand_names(tree)

    suspicious = [name for name in names if "signature" in name.lower() or "digest" in name.lower()]
    assert suspicious == []


def test_signature_uses_compare_digest_on_bytes(nodes, monkeypatch):
    signing_calls = called_functions(ast.parse(inspect.getsource(signing)))
    authentication_calls = called_functions(ast.parse(inspect.getsource(authentication)))
    compared = []
    real_compare_digest = signing.hmac.compare_digest

    def recording_compare_digest(left, right):
        compared.append((type(left), type(right)))
        return real_compare_digest(left, right)

    monkeypatch.setattr(signing.hmac, "compare_digest", recording_compare_digest)

    response = nodes[0].request("GET", TASK_PATH)

    assert "hmac.compare_digest" in signing_calls
    assert "signing.is_valid_signature" in authentication_calls
    assert response.status_code == 200
    assert compared == [(bytes, bytes)]


# --- Timestamp ----------------------------------------------------------------


def test_rejects_rewritten_timestamp_header(nodes, monkeypatch):
    node = nodes[0]
    body = encode_update()
    captured_at = int(time.time())
    captured = sign(node, "POST", UPDATES_PATH, body, timestamp=captured_at)
    rewritten = {**captured, signing.HEADER_TIMESTAMP: str(captured_at + 600)}
    # The server clock reads T + 600, so the rewritten header is fresh and
    # only the signature over the timestamp can reject the request.
    monkeypatch.setattr(authentication, "time", SimpleNamespace(time=lambda: captured_at + 600, monotonic=time.monotonic))
    before = snapshot_stored_state()

    replayed = send_with_headers(node, "POST", UPDATES_PATH, body, rewritten)
    unchanged = send_with_headers(node, "POST", UPDATES_PATH, body, captured)

    assert_error(replayed, status=401, code="invalid_signature")
    stale = assert_error(unchanged, status=401, code="stale_timestamp")
    assert stale["server_time"] == captured_at + 600
    assert_state_unchanged(before)
    # The captured request itself was valid when it was signed.
    monkeypatch.undo()
    assert send_with_headers(node, "POST", UPDATES_PATH, body, captured).status_code == 202


@pytest.mark.parametrize("offset_seconds", [900, -900, WINDOW_SECONDS + 10, -(WINDOW_SECONDS + 10)], ids=["plus-900", "minus-900", "plus-310", "minus-310"])
def test_rejects_timestamp_outside_window(nodes, offset_seconds):
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, timestamp=int(time.time()) + offset_seconds)

    body = assert_error(response, status=401, code="stale_timestamp")
    assert isinstance(body["server_time"], int)
    assert abs(body["server_time"] - time.time()) < 5
    assert_state_unchanged(before)


@pytest.mark.parametrize("offset_seconds", [-240, 240, 0], ids=["minus-240", "plus-240", "now"])
def test_accepts_timestamp_inside_window(nodes, offset_seconds):
    response = nodes[0].submit(round_number=1, timestamp=int(time.time()) + offset_seconds)

    assert response.status_code == 202
    assert ModelUpdate.objects.filter(node=nodes[0].node).count() == 1


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        pytest.param({signing.HEADER_TIMESTAMP: "yesterday"}, "invalid_timestamp", id="word"),
        pytest.param({"timestamp": int(time.time() * 1000)}, "invalid_timestamp", id="milliseconds-signed"),
        pytest.param({signing.HEADER_TIMESTAMP: "-1"}, "invalid_timestamp", id="negative"),
        pytest.param({signing.HEADER_TIMESTAMP: "1.7e9"}, "invalid_timestamp", id="exponent"),
        pytest.param({signing.HEADER_TIMESTAMP: " 1700000000"}, "invalid_timestamp", id="leading-space"),
        pytest.param({signing.HEADER_TIMESTAMP: None}, "missing_signature_headers", id="missing"),
        pytest.param({signing.HEADER_TIMESTAMP: ""}, "invalid_timestamp", id="empty"),
    ],
)
def test_rejects_malformed_or_missing_timestamp(nodes, overrides, code):
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, **overrides)

    body = assert_error(response, status=401, code=code)
    assert_state_unchanged(before)
    if code == "invalid_timestamp":
        assert isinstance(body["server_time"], int)
    else:
        assert signing.HEADER_TIMESTAMP in body["detail"]


def test_rejects_millisecond_timestamp_header(nodes):
    # Signed over seconds, header rewritten to milliseconds of the same instant.
    now = int(time.time())
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, timestamp=now, **{signing.HEADER_TIMESTAMP: str(now * 1000)})

    assert_error(response, status=401, code="invalid_timestamp")
    assert_state_unchanged(before)


# --- Other headers ------------------------------------------------------------


@pytest.mark.parametrize("header", [signing.HEADER_NODE, signing.HEADER_NONCE, signing.HEADER_SIGNATURE])
def test_rejects_request_missing_header(nodes, header):
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, **{header: None})

    body = assert_error(response, status=401, code="missing_signature_headers")
    assert header in body["detail"]
    assert_state_unchanged(before)


@pytest.mark.parametrize(
    ("header", "code"),
    [(signing.HEADER_NODE, "unknown_node"), (signing.HEADER_NONCE, "invalid_nonce")],
    ids=["node", "nonce"],
)
def test_rejects_request_with_empty_header(nodes, header, code):
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, **{header: ""})

    assert_error(response, status=401, code=code)
    assert_state_unchanged(before)


@pytest.mark.parametrize("nonce", ["short", "x" * 65, "contains/slash-and-more", "with space and more chars"], ids=["too-short", "too-long", "slash", "space"])
def test_rejects_malformed_nonce(nodes, nonce):
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, nonce=nonce)

    assert_error(response, status=401, code="invalid_nonce")
    assert_state_unchanged(before)


def test_rejects_replayed_nonce_and_stores_once(nodes):
    node = nodes[0]
    timestamp = int(time.time())
    nonce = signing.new_nonce()
    first = node.submit(round_number=1, timestamp=timestamp, nonce=nonce)
    before = snapshot_stored_state()

    replay = node.submit(round_number=1, timestamp=timestamp, nonce=nonce)

    assert first.status_code == 202
    assert_error(replay, status=401, code="replayed_nonce")
    assert_state_unchanged(before)
    assert ModelUpdate.objects.filter(node=node.node).count() == 1
    assert UsedNonce.objects.filter(node=node.node, nonce=nonce).count() == 1


def test_rejects_replayed_nonce_on_read_endpoint(nodes):
    node = nodes[0]
    timestamp = int(time.time())
    nonce = signing.new_nonce()

    first = node.request("GET", TASK_PATH, timestamp=timestamp, nonce=nonce)
    replay = node.request("GET", TASK_PATH, timestamp=timestamp, nonce=nonce)

    assert first.status_code == 200
    assert_error(replay, status=401, code="replayed_nonce")


def test_rejects_replay_at_far_window_edge(nodes, monkeypatch):
    # Signed at the future edge (T + window) and replayed at the past edge
    # (T + 2 * window), both timestamps pass the window check, so only the
    # stored nonce can reject the replay. Nonces must outlive that span.
    node = nodes[0]
    server_start = int(time.time())
    headers = sign(node, "GET", TASK_PATH, timestamp=server_start + WINDOW_SECONDS)

    def set_server_clock(unix_seconds: int) -> None:
        monkeypatch.setattr(authentication, "time", SimpleNamespace(time=lambda: unix_seconds, monotonic=time.monotonic))
        moment = datetime.fromtimestamp(unix_seconds, tz=UTC)
        monkeypatch.setattr(authentication, "timezone", SimpleNamespace(now=lambda: moment))

    set_server_clock(server_start)
    first = send_with_headers(node, "GET", TASK_PATH, b"", headers)
    set_server_clock(server_start + 2 * WINDOW_SECONDS)
    replay = send_with_headers(node, "GET", TASK_PATH, b"", headers)

    assert first.status_code == 200
    assert_error(replay, status=401, code="replayed_nonce")


def test_rejects_request_without_any_headers(nodes):
    response = nodes[0].client.get(TASK_PATH)

    body = assert_error(response, status=401, code="missing_signature_headers")
    for header in (signing.HEADER_NODE, signing.HEADER_TIMESTAMP, signing.HEADER_NONCE, signing.HEADER_SIGNATURE):
        assert header in body["detail"]
    assert response["WWW-Authenticate"] == signing.SCHEME


def test_accepts_same_nonce_from_two_nodes(nodes):
    nonce = signing.new_nonce()

    first = nodes[0].submit(round_number=1, nonce=nonce)
    second = nodes[1].submit(round_number=1, nonce=nonce)

    assert first.status_code == 202
    assert second.status_code == 202


# --- Node identity and status -------------------------------------------------


@pytest.mark.parametrize(
    "node_header",
    [
        pytest.param(lambda: str(uuid.uuid4()), id="random-uuid"),
        pytest.param(lambda: "not-a-node-id", id="malformed"),
        pytest.param(lambda: "1", id="integer"),
        pytest.param(lambda: "x" * 300, id="long-garbage"),
    ],
)
def test_rejects_unknown_node(nodes, node_header):
    nonces_before = UsedNonce.objects.count()
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, **{signing.HEADER_NODE: node_header()})

    assert_error(response, status=401, code="unknown_node")
    assert_state_unchanged(before)
    assert UsedNonce.objects.count() == nonces_before


@pytest.mark.parametrize(
    ("status", "code"),
    [(Node.Status.REVOKED, "node_revoked"), (Node.Status.QUARANTINED, "node_quarantined")],
    ids=["revoked", "quarantined"],
)
def test_rejects_node_that_is_not_active(nodes, status, code):
    node = nodes[0]
    Node.objects.filter(id=node.node.id).update(status=status, status_reason="Its updates failed validation three times")
    before = snapshot_stored_state()

    update = node.submit(round_number=1)
    task = node.request("GET", TASK_PATH)

    body = assert_error(update, status=403, code=code)
    assert_error(task, status=403, code=code)
    assert_state_unchanged(before)
    if status == Node.Status.QUARANTINED:
        assert "failed validation" in body["detail"]


# --- Raw body bytes -----------------------------------------------------------

# Headers of the same logical update written with different bytes. Each is
# signed over its own bytes, so the server must hash the body as received.
SPACED_HEADER = (
    r'{"meta": {"round": 1, "model_version": 0, "num_examples": 10, "metrics": {"loss": 1.0}}, '
    r'"tensors": [{"name": "w\u0065ight", "dtype": "float32", "shape": [2, 2]}, {"name": "bias", "dtype": "float32", "shape": [2]}]}'
)
REORDERED_HEADER = (
    '{"tensors":[{"shape":[2,2],"dtype":"float32","name":"weight"},{"shape":[2],"name":"bias","dtype":"float32"}],'
    '"meta":{"metrics":{"loss":1},"num_examples":10,"model_version":0,"round":1}}'
)
PRETTY_HEADER = (
    '{\n  "meta": {\n    "round": 1,\n    "model_version": 0,\n    "num_examples": 10,\n    "metrics": {"loss": 1.00}\n  },\n'
    '  "tensors": [\n    {"name": "weight", "dtype": "float32", "shape": [2, 2]},\n    {"name": "bias", "dtype": "float32", "shape": [2]}\n  ]\n}\n'
)


def build_message(header: str) -> bytes:
    """Build a wire message by hand: prefix, the literal JSON header, zero float32 data for TINY_MODEL."""
    header_bytes = header.encode("utf-8")
    data = b"\x00" * (4 * 4 + 2 * 4)
    return WIRE_PREFIX.pack(b"FLOT", 1, len(header_bytes)) + header_bytes + data


@pytest.mark.parametrize("header", [SPACED_HEADER, REORDERED_HEADER, PRETTY_HEADER], ids=["spaces-and-unicode-escape", "reordered-keys", "pretty-printed"])
def test_accepts_body_signed_as_sent(nodes, header):
    body = build_message(header)

    response = nodes[0].request("POST", UPDATES_PATH, body)

    assert response.status_code == 202
    update = ModelUpdate.objects.get(node=nodes[0].node)
    assert (update_store.store_dir() / update.payload_file).read_bytes() == body
    assert update.payload_sha256 == hashlib.sha256(body).hexdigest()
    assert update.metrics == {"loss": 1.0}


def test_rejects_whitespace_changed_after_signing(nodes):
    node = nodes[0]
    signed_body = build_message(SPACED_HEADER)
    # A tab keeps the JSON valid and the length the same, so only the signature differs.
    tampered_body = signed_body.replace(b", ", b",\t", 1)
    headers = sign(node, "POST", UPDATES_PATH, signed_body)
    before = snapshot_stored_state()

    response = send_with_headers(node, "POST", UPDATES_PATH, tampered_body, headers)

    assert tampered_body != signed_body
    assert len(tampered_body) == len(signed_body)
    assert_error(response, status=401, code="invalid_signature")
    assert_state_unchanged(before)
    # Signed over its own bytes, the tampered body is a valid update.
    assert node.request("POST", UPDATES_PATH, tampered_body).status_code == 202
