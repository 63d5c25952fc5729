"""Update endpoint of the signed device API: accepted updates, aggregation and every rejection.

Each rejection test snapshots the stored federation state before the request
and compares it afterwards: model updates, model versions, round states, the
privacy ledger, privacy budgets and reputations. Authentication bookkeeping
(UsedNonce rows and Node.last_seen_at) may change on a rejected request,
because a correctly signed request is authenticated before its body is
checked, so the snapshot leaves it out.

Expected aggregates are computed by hand in each test, never with the
project's aggregation code.
"""

import hashlib
import json
import struct
import time
import uuid
from datetime import timedelta

import dp_accounting
import numpy as np
import pytest
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from federation.api.views import NodeRateThrottle
from federation.models import (
    Federation,
    ModelUpdate,
    ModelVersion,
    Node,
    TrainingRound,
)
from federation.services.federations import start_federation
from federation.services.nodes import revoke_node, rotate_node_secret
from flo_client import signing, wire
from privacy.models import PrivacyBudget, PrivacyLedgerEntry
from tests.assertions import assert_error, assert_state_unchanged, snapshot_stored_state
from tests.conftest import DP_PLAN, enrol, make_federation, zero_update

UPDATES_PATH = "/api/v1/updates"
# Wire prefix as documented in flo_client/wire.py: magic, version, header length (little-endian).
WIRE_PREFIX = struct.Struct("<4sBI")
# Model of conftest.TINY_MODEL: float32 "weight" (2, 2) and "bias" (2,).
TENSOR_ENTRIES = [{"name": "weight", "dtype": "float32", "shape": [2, 2]}, {"name": "bias", "dtype": "float32", "shape": [2]}]
# Raw float32 data bytes of TINY_MODEL: 4 + 2 values of 4 bytes.
TINY_MODEL_DATA_BYTES = 24


# --- Helpers ------------------------------------------------------------------


def encode_update(tensors: dict | None = None, *, round_number: int = 1) -> bytes:
    """Encode a valid round update from version 0 with 10 examples."""
    meta = {"round": round_number, "model_version": 0, "num_examples": 10}
    return wire.encode_tensors(tensors if tensors is not None else zero_update(), meta)


def make_delta(weight_fill: float, bias_fill: float) -> dict:
    return {"weight": np.full((2, 2), weight_fill, dtype=np.float32), "bias": np.full((2,), bias_fill, dtype=np.float32)}


def build_message(header: str | bytes, tensors: dict | None = None) -> bytes:
    """Build a wire message by hand from a literal JSON header and float32 data in TINY_MODEL order."""
    header_bytes = header.encode() if isinstance(header, str) else header
    tensors = tensors if tensors is not None else zero_update()
    data = b"".join(np.asarray(tensors[name], dtype="<f4").tobytes() for name in ("weight", "bias"))
    return WIRE_PREFIX.pack(b"FLOT", 1, len(header_bytes)) + header_bytes + data


def header_with_meta(meta_json: str) -> str:
    return '{"meta":' + meta_json + ',"tensors":' + json.dumps(TENSOR_ENTRIES) + "}"


def fetch_weights(signed_node, version: int) -> dict:
    response = signed_node.request("GET", f"/api/v1/models/{version}/weights")
    assert response.status_code == 200
    _, tensors = wire.decode_tensors(response.content)
    return tensors


def show_server_errors(nodes) -> None:
    # An unhandled exception then comes back as a 500 response, so a test
    # fails on its status assert instead of erroring inside the client.
    for node in nodes:
        node.client.raise_request_exception = False


@pytest.fixture
def three_nodes(running):
    federation, nodes = running
    show_server_errors(nodes)
    return federation, nodes


@pytest.fixture
def two_nodes(transactional_db):
    """A running federation with two enrolled nodes, both selected, so their two updates close a round."""
    federation = make_federation(name="two-nodes", round_size=2, min_updates=2)
    nodes = enrol(federation, 2)
    start_federation(federation)
    federation.refresh_from_db()
    show_server_errors(nodes)
    return federation, nodes


@pytest.fixture
def second_round(three_nodes):
    """Close round 1 with zero deltas, so version 1 equals version 0. Round 2 is then open with all three nodes."""
    federation, nodes = three_nodes
    for node in nodes:
        assert node.submit(round_number=1).status_code == 202
    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.CLOSED
    assert TrainingRound.objects.get(federation=federation, number=2).state == TrainingRound.State.OPEN
    return federation, nodes


# --- Accepted updates ---------------------------------------------------------


def test_accepts_updates_and_aggregates_weighted_mean(three_nodes):
    federation, nodes = three_nodes
    base = fetch_weights(nodes[0], 0)
    deltas = [(make_delta(1.0, -1.0), 10), (make_delta(3.0, -3.0), 30), (make_delta(5.0, -5.0), 60)]

    responses = [node.submit(round_number=1, tensors=tensors, num_examples=count) for node, (tensors, count) in zip(nodes, deltas, strict=True)]

    assert [response.status_code for response in responses] == [202, 202, 202]
    assert responses[0].json()["status"] == "accepted"
    assert responses[0].json()["round"] == 1
    assert responses[0].json()["num_examples"] == 10
    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.CLOSED
    # (10 * 1 + 30 * 3 + 60 * 5) / 100 = 4.0, where a plain mean would give 3.0.
    new_weights = fetch_weights(nodes[0], 1)
    np.testing.assert_allclose(new_weights["weight"], base["weight"] + 4.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(new_weights["bias"], base["bias"] - 4.0, rtol=0, atol=1e-6)
    version = ModelVersion.objects.get(federation=federation, version=1)
    assert version.num_updates == 3
    assert version.total_examples == 100


def test_task_status_train_then_wait(three_nodes):
    federation, nodes = three_nodes

    before = nodes[0].request("GET", "/api/v1/task")
    assert nodes[0].submit(round_number=1).status_code == 202
    after = nodes[0].request("GET", "/api/v1/task")

    assert before.status_code == 200
    assert before.json()["status"] == "train"
    assert before.json()["round"]["number"] == 1
    assert before.json()["round"]["model_version"] == 0
    assert before.json()["weights_path"] == "/api/v1/models/0/weights"
    assert after.status_code == 200
    assert after.json()["status"] == "wait"
    assert after.json()["round"]["submitted"] is True
    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.OPEN


def test_weights_download_matches_sha256_header(three_nodes):
    federation, nodes = three_nodes

    response = nodes[0].request("GET", "/api/v1/models/0/weights")

    assert response.status_code == 200
    assert response["Content-Type"] == wire.MEDIA_TYPE
    assert response["X-FLO-Weights-SHA256"] == hashlib.sha256(response.content).hexdigest()
    assert response["X-FLO-Weights-SHA256"] == ModelVersion.objects.get(federation=federation, version=0).weights_sha256
    _, tensors = wire.decode_tensors(response.content)
    assert list(tensors) == ["weight", "bias"]
    assert tensors["weight"].shape == (2, 2)
    assert tensors["weight"].dtype == np.float32
    assert tensors["bias"].shape == (2,)


def test_weights_unknown_version_not_found(three_nodes):
    _, nodes = three_nodes

    response = nodes[0].request("GET", "/api/v1/models/7/weights")

    assert_error(response, status=404, code="model_version_not_found")


def test_node_status_describes_own_node(three_nodes):
    federation, nodes = three_nodes
    assert nodes[0].submit(round_number=1).status_code == 202

    response = nodes[0].request("GET", "/api/v1/nodes/me")

    assert response.status_code == 200
    body = response.json()
    assert body["node_id"] == str(nodes[0].node.id)
    assert body["display_name"] == nodes[0].node.display_name
    assert body["federation_id"] == federation.id
    assert body["status"] == "active"
    assert body["updates_submitted"] == 1
    assert body["last_update"] == {"round": 1, "status": "accepted", "rejection_reason": ""}
    assert body["last_seen_at"] is not None
    assert body["privacy_budget"] is None


def test_accepts_max_examples_exactly(three_nodes, settings):
    _, nodes = three_nodes

    response = nodes[0].submit(round_number=1, num_examples=settings.FLO_MAX_EXAMPLES)

    assert response.status_code == 202
    assert ModelUpdate.objects.get(node=nodes[0].node).num_examples == 10**9


def test_int32_max_count_weighs_exactly(two_nodes, settings):
    # The default cap of 10**9 rejects 2**31 - 1, so the operator limit is
    # raised to let the count reach the aggregation code.
    settings.FLO_MAX_EXAMPLES = 2**31 - 1
    federation, (node_a, node_b) = two_nodes
    base = fetch_weights(node_a, 0)
    large_count, small_count = 2**31 - 1, 1
    # Node B's delta of 2**31 (exact in float32) with weight 1 / 2**31 adds
    # exactly 1.0. An int32 total would wrap to -2**31 and flip the sign.
    small_delta = float(2**31)

    response_a = node_a.submit(round_number=1, tensors=make_delta(0.0, 0.0), num_examples=large_count)
    response_b = node_b.submit(round_number=1, tensors=make_delta(small_delta, -small_delta), num_examples=small_count)

    assert response_a.status_code == 202
    assert response_b.status_code == 202
    total = large_count + small_count
    weight_a = large_count / total
    weight_b = small_count / total
    assert weight_a + weight_b == 1.0
    expected_weight = weight_a * 0.0 + weight_b * small_delta
    new_weights = fetch_weights(node_a, 1)
    np.testing.assert_allclose(new_weights["weight"], base["weight"] + expected_weight, rtol=0, atol=1e-6)
    np.testing.assert_allclose(new_weights["bias"], base["bias"] - expected_weight, rtol=0, atol=1e-6)
    assert ModelVersion.objects.get(federation=federation, version=1).total_examples == 2**31


def test_counts_above_int32_total_average(three_nodes, settings):
    settings.FLO_MAX_EXAMPLES = 2**31 - 1
    federation, nodes = three_nodes
    base = fetch_weights(nodes[0], 0)
    count = 1_500_000_000
    fills = [1.0, 2.0, 6.0]

    responses = [node.submit(round_number=1, tensors=make_delta(fill, -fill), num_examples=count) for node, fill in zip(nodes, fills, strict=True)]

    assert [response.status_code for response in responses] == [202, 202, 202]
    # Equal counts: the weighted mean is the plain mean (1 + 2 + 6) / 3 = 3.0.
    new_weights = fetch_weights(nodes[0], 1)
    np.testing.assert_allclose(new_weights["weight"], base["weight"] + 3.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(new_weights["bias"], base["bias"] - 3.0, rtol=0, atol=1e-6)
    assert ModelVersion.objects.get(federation=federation, version=1).total_examples == 4_500_000_000


# --- Selection, round binding and duplicates ----------------------------------


def test_rejects_update_from_node_not_selected(transactional_db):
    federation = make_federation(name="partial-selection", round_size=2, min_updates=2)
    nodes = enrol(federation, 3)
    start_federation(federation)
    show_server_errors(nodes)
    selected_ids = set(TrainingRound.objects.get(federation=federation, number=1).selected_nodes.values_list("id", flat=True))
    outsider = next(node for node in nodes if node.node.id not in selected_ids)
    member = next(node for node in nodes if node.node.id in selected_ids)
    before = snapshot_stored_state()

    response = outsider.submit(round_number=1)
    task = outsider.request("GET", "/api/v1/task")

    assert_error(response, status=403, code="node_not_selected")
    assert_state_unchanged(before)
    assert task.json()["status"] == "wait"
    assert task.json()["round"]["selected"] is False
    # The same update from a selected node is accepted.
    assert member.submit(round_number=1).status_code == 202


@pytest.mark.parametrize(
    ("meta", "status", "code"),
    [
        pytest.param({"round": 1, "model_version": 1, "num_examples": 10}, 409, "round_not_open", id="closed-round"),
        pytest.param({"round": 3, "model_version": 1, "num_examples": 10}, 409, "round_not_open", id="future-round"),
        pytest.param({"model_version": 1, "num_examples": 10}, 400, "invalid_update_field", id="missing-round"),
        pytest.param({"round": 0, "model_version": 1, "num_examples": 10}, 400, "invalid_update_field", id="round-zero"),
        pytest.param({"round": "2", "model_version": 1, "num_examples": 10}, 400, "invalid_update_field", id="round-string"),
        pytest.param({"round": 2.0, "model_version": 1, "num_examples": 10}, 400, "invalid_update_field", id="round-float"),
        pytest.param({"round": 2, "model_version": 0, "num_examples": 10}, 409, "stale_model_version", id="stale-model-version"),
        pytest.param({"round": 2, "model_version": 2, "num_examples": 10}, 409, "stale_model_version", id="future-model-version"),
        pytest.param({"round": 2, "num_examples": 10}, 400, "invalid_update_field", id="missing-model-version"),
        pytest.param({"round": 2, "model_version": 1}, 400, "invalid_update_field", id="missing-num-examples"),
    ],
)
def test_rejects_update_bound_to_wrong_round(second_round, meta, status, code):
    _, nodes = second_round
    before = snapshot_stored_state()

    response = nodes[0].request("POST", UPDATES_PATH, wire.encode_tensors(zero_update(), meta))

    body = assert_error(response, status=status, code=code)
    assert_state_unchanged(before)
    if code == "round_not_open":
        assert body["open_round"] == 2
    if code == "stale_model_version":
        assert body["model_version"] == 1


def test_rejects_update_after_round_deadline(three_nodes):
    federation, nodes = three_nodes
    TrainingRound.objects.filter(federation=federation, number=1).update(deadline_at="2000-01-01T00:00:00Z")
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1)

    assert_error(response, status=409, code="round_not_open")
    assert_state_unchanged(before)


def test_late_update_left_out_of_aggregate(second_round):
    federation, nodes = second_round
    base = fetch_weights(nodes[0], 1)

    late = nodes[0].submit(round_number=1, model_version=1, tensors=make_delta(100.0, 100.0))
    current = [node.submit(round_number=2, model_version=1, tensors=make_delta(1.0, -1.0)) for node in nodes]

    assert late.status_code == 409
    assert [response.status_code for response in current] == [202, 202, 202]
    assert ModelUpdate.objects.filter(round__federation=federation, round__number=2).count() == 3
    # Only the three round-2 deltas of 1.0 count. The late 100.0 would move the mean.
    new_weights = fetch_weights(nodes[0], 2)
    np.testing.assert_allclose(new_weights["weight"], base["weight"] + 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(new_weights["bias"], base["bias"] - 1.0, rtol=0, atol=1e-6)


def test_duplicate_update_rejected_first_wins(two_nodes):
    federation, (node_a, node_b) = two_nodes
    base = fetch_weights(node_a, 0)
    assert node_a.submit(round_number=1, tensors=make_delta(1.0, 1.0), num_examples=10).status_code == 202
    before = snapshot_stored_state()

    duplicate = node_a.submit(round_number=1, tensors=make_delta(9.0, 9.0), num_examples=10)

    assert_error(duplicate, status=409, code="duplicate_update")
    assert_state_unchanged(before)
    assert node_b.submit(round_number=1, tensors=make_delta(3.0, 3.0), num_examples=10).status_code == 202
    assert ModelUpdate.objects.filter(node=node_a.node).count() == 1
    # First wins: (10 * 1 + 10 * 3) / 20 = 2.0. Counting the 9.0 instead would give 5.0.
    new_weights = fetch_weights(node_a, 1)
    np.testing.assert_allclose(new_weights["weight"], base["weight"] + 2.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(new_weights["bias"], base["bias"] + 2.0, rtol=0, atol=1e-6)


def test_rejects_update_when_federation_paused(three_nodes):
    federation, nodes = three_nodes
    Federation.objects.filter(id=federation.id).update(status=Federation.Status.PAUSED)
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1)

    assert_error(response, status=409, code="federation_not_running")
    assert_state_unchanged(before)


# --- Tensors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "fragments"),
    [
        pytest.param(
            {"weights": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)},
            ["'weight'", "float32", "[2, 2]"],
            id="wrong-name",
        ),
        pytest.param({"weight": np.zeros((2, 2), np.float32)}, ["'bias'", "float32", "[2]"], id="missing-tensor"),
        pytest.param({}, ["'bias'", "float32", "[2]"], id="no-tensors"),
        pytest.param({**zero_update(), "extra": np.zeros(2, np.float32)}, ["'extra'"], id="extra-tensor"),
        pytest.param({"weight": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}, ["'weight'", "float32", "[2, 2]"], id="wrong-shape"),
        pytest.param({"weight": np.zeros(4, np.float32), "bias": np.zeros(2, np.float32)}, ["'weight'", "float32", "[2, 2]"], id="flattened-shape"),
        pytest.param({"weight": np.zeros((2, 2), np.float32), "bias": np.zeros((), np.float32)}, ["'bias'", "float32", "[2]"], id="scalar-shape"),
        pytest.param({"weight": np.zeros((2, 2), np.int64), "bias": np.zeros(2, np.float32)}, ["'weight'", "float32", "[2, 2]"], id="int64-dtype"),
        pytest.param({"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float64)}, ["'bias'", "float32", "[2]"], id="float64-dtype"),
        pytest.param({"weight": np.zeros((2, 2), np.int32), "bias": np.zeros(2, np.float32)}, ["'weight'", "float32", "[2, 2]"], id="int32-dtype"),
    ],
)
def test_rejects_tensors_that_differ_from_model(three_nodes, tensors, fragments):
    _, nodes = three_nodes
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, tensors=tensors)

    body = assert_error(response, status=400, code="tensor_mismatch")
    assert_state_unchanged(before)
    for fragment in fragments:
        assert fragment in body["detail"], f"detail lacks {fragment}: {body['detail']!r}"


def with_value(name: str, index: tuple, value: float) -> dict:
    tensors = zero_update()
    tensors[name][index] = value
    return tensors


def with_last_value_bits(bits: int) -> bytes:
    """Encode a zero update, then overwrite its last float32 (bias[1]) with a raw bit pattern."""
    body = bytearray(encode_update())
    body[-4:] = struct.pack("<I", bits)
    return bytes(body)


@pytest.mark.parametrize(
    ("body_factory", "tensor_name"),
    [
        pytest.param(lambda: encode_update(with_value("weight", (0, 1), np.nan)), "weight", id="nan"),
        pytest.param(lambda: encode_update(with_value("bias", (1,), np.inf)), "bias", id="positive-inf"),
        pytest.param(lambda: encode_update(with_value("weight", (1, 1), -np.inf)), "weight", id="negative-inf"),
        pytest.param(lambda: with_last_value_bits(0x7FC00001), "bias", id="quiet-nan-bits"),
        pytest.param(lambda: with_last_value_bits(0x7F800001), "bias", id="signalling-nan-bits"),
        pytest.param(lambda: with_last_value_bits(0xFFFFFFFF), "bias", id="negative-nan-bits"),
    ],
)
def test_rejects_non_finite_tensor_values(three_nodes, body_factory, tensor_name):
    _, nodes = three_nodes
    before = snapshot_stored_state()

    response = nodes[0].request("POST", UPDATES_PATH, body_factory())

    body = assert_error(response, status=400, code="non_finite_values")
    assert_state_unchanged(before)
    assert f"'{tensor_name}'" in body["detail"]


# --- Metadata -----------------------------------------------------------------


@pytest.mark.parametrize(
    "num_examples",
    [
        pytest.param(0, id="zero"),
        pytest.param(-5, id="negative"),
        pytest.param("12", id="string"),
        pytest.param(1.5, id="fraction"),
        pytest.param(10.0, id="float-integral"),
        pytest.param(True, id="boolean"),
        pytest.param(None, id="null"),
        pytest.param(2**63, id="above-int64"),
        pytest.param(10**9 + 1, id="above-max-examples"),
    ],
)
def test_rejects_invalid_num_examples(three_nodes, num_examples):
    _, nodes = three_nodes
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, num_examples=num_examples)

    assert_error(response, status=400, code="invalid_num_examples")
    assert_state_unchanged(before)


@pytest.mark.parametrize(
    "meta_extra",
    [
        pytest.param({"learning_rate": 0.1}, id="unknown-field"),
        pytest.param({"metrics": {"bad name": 1.0}}, id="metric-name-with-space"),
        pytest.param({"metrics": {"loss": "low"}}, id="metric-string-value"),
        pytest.param({"metrics": {"loss": True}}, id="metric-boolean-value"),
        pytest.param({"metrics": [1.0]}, id="metrics-not-object"),
        pytest.param({"metrics": {f"m{i}": 1.0 for i in range(33)}}, id="too-many-metrics"),
    ],
)
def test_rejects_invalid_update_fields(three_nodes, meta_extra):
    _, nodes = three_nodes
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1, meta_extra=meta_extra)

    assert_error(response, status=400, code="invalid_update_field")
    assert_state_unchanged(before)


def test_rejects_metric_above_magnitude_limit(three_nodes):
    _, nodes = three_nodes
    before = snapshot_stored_state()
    digits = "9" * wire.MAX_INTEGER_DIGITS
    body = build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":' + digits + "}}"))

    response = nodes[0].request("POST", UPDATES_PATH, body)

    assert_error(response, status=400, code="invalid_update_field")
    assert_state_unchanged(before)


def test_accepts_metric_at_magnitude_limit(three_nodes):
    _, nodes = three_nodes
    body = build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":-1e12,"count":1000000000000}}'))

    response = nodes[0].request("POST", UPDATES_PATH, body)

    assert response.status_code == 202
    assert ModelUpdate.objects.get(node=nodes[0].node).metrics == {"loss": -1e12, "count": 1e12}


@pytest.mark.parametrize(
    "body_factory",
    [
        pytest.param(lambda: b"", id="empty-body"),
        pytest.param(lambda: b"this is not a tensor message at all", id="garbage"),
        pytest.param(lambda: b"FLOT", id="prefix-only"),
        pytest.param(lambda: encode_update()[:-1], id="truncated"),
        pytest.param(lambda: encode_update() + b"\x00", id="trailing-byte"),
        pytest.param(lambda: b"FLOX" + encode_update()[4:], id="wrong-magic"),
        pytest.param(lambda: b"FLOT\x02" + encode_update()[5:], id="wrong-version"),
        pytest.param(lambda: WIRE_PREFIX.pack(b"FLOT", 1, 500) + b"{}", id="header-longer-than-body"),
        pytest.param(lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":NaN}}')), id="json-nan-token"),
        pytest.param(lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":Infinity}}')), id="json-infinity-token"),
        pytest.param(lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":-Infinity}}')), id="json-negative-infinity-token"),
        pytest.param(lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":1e400}}')), id="json-overflowing-float"),
        pytest.param(lambda: build_message(header_with_meta('{"round":1,"round":1,"model_version":0,"num_examples":10}')), id="json-duplicate-key"),
        pytest.param(lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10')), id="json-unterminated"),
        pytest.param(lambda: build_message(b'{"meta":{"round":1,"model_version":0,"num_examples":10},"tensors":[' + b'\xff' + b"]}"), id="json-not-utf8"),
        pytest.param(
            lambda: build_message('{"meta":{"round":1,"model_version":0,"num_examples":10},"tensors":[{"name":"weight","dtype":"float16","shape":[2,2]},{"name":"bias","dtype":"float32","shape":[2]}]}'),
            id="unsupported-dtype",
        ),
        pytest.param(
            lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":' + "9" * (wire.MAX_INTEGER_DIGITS + 1) + "}}")),
            id="json-integer-one-digit-too-long",
        ),
        # 10**400 has no float value, so it must not reach float conversion.
        pytest.param(
            lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":10,"metrics":{"loss":1' + "0" * 400 + "}}")),
            id="json-integer-overflowing-float",
        ),
        # Python's int() rejects more than 4300 digits with a plain ValueError.
        pytest.param(
            lambda: build_message(header_with_meta('{"round":1,"model_version":0,"num_examples":' + "9" * 5000 + "}")),
            id="json-integer-over-python-digit-limit",
        ),
    ],
)
def test_rejects_malformed_update_body(three_nodes, body_factory):
    _, nodes = three_nodes
    before = snapshot_stored_state()

    response = nodes[0].request("POST", UPDATES_PATH, body_factory())

    assert_error(response, status=400, code="malformed_update")
    assert_state_unchanged(before)


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream", "text/plain"])
def test_rejects_update_with_wrong_content_type(three_nodes, content_type):
    _, nodes = three_nodes
    before = snapshot_stored_state()

    response = nodes[0].request("POST", UPDATES_PATH, encode_update(), content_type=content_type)

    assert_error(response, status=415, code="unsupported_media_type")
    assert_state_unchanged(before)


@pytest.mark.parametrize(
    "content_type",
    [f"{wire.MEDIA_TYPE}; charset=binary", wire.MEDIA_TYPE.upper()],
    ids=["with-parameter", "uppercase"],
)
def test_accepts_equivalent_media_type(three_nodes, content_type):
    # Type and subtype names are case-insensitive (RFC 2616, section 3.7) and may carry parameters.
    _, nodes = three_nodes

    response = nodes[0].request("POST", UPDATES_PATH, encode_update(), content_type=content_type)

    assert response.status_code == 202


def test_rejects_update_above_model_size_limit(three_nodes, settings):
    _, nodes = three_nodes
    limit_bytes = settings.FLO_UPDATE_HEADER_ALLOWANCE_BYTES + TINY_MODEL_DATA_BYTES
    valid = encode_update()
    before = snapshot_stored_state()

    at_limit = nodes[0].request("POST", UPDATES_PATH, valid + b"\x00" * (limit_bytes - len(valid)))
    over_limit = nodes[0].request("POST", UPDATES_PATH, valid + b"\x00" * (limit_bytes + 1 - len(valid)))

    # At the limit the size passes and the padding is rejected as trailing bytes.
    assert_error(at_limit, status=400, code="malformed_update")
    body = assert_error(over_limit, status=413, code="payload_too_large")
    assert str(limit_bytes) in body["detail"]
    assert_state_unchanged(before)


def test_rejects_body_above_django_request_cap(three_nodes, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    _, nodes = three_nodes
    valid = encode_update()
    before = snapshot_stored_state()

    response = nodes[0].request("POST", UPDATES_PATH, valid + b"\x00" * 2048)

    assert_error(response, status=413, code="payload_too_large")
    assert_state_unchanged(before)


# --- Privacy budget -----------------------------------------------------------

# Orders listed independently of privacy/accounting.py, with the same values.
RDP_ORDERS = list(range(2, 129)) + [160, 192, 256, 384, 512, 768, 1024]


def epsilon_of_one_participation() -> float:
    """Epsilon at delta 1e-5 of DP_PLAN's local training: 5 steps of q=0.2, sigma=2.0."""
    accountant = dp_accounting.rdp.RdpAccountant(RDP_ORDERS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(2.0)), 5)
    return accountant.get_epsilon(1e-5)


@pytest.fixture
def one_participation_each(transactional_db):
    """A local-DP federation whose budget fits exactly one participation per node; round 1 open."""
    federation = make_federation(
        name="one-participation",
        plan=DP_PLAN,
        round_size=3,
        min_updates=1,
        node_epsilon_budget=epsilon_of_one_participation() * 1.01,
    )
    nodes = enrol(federation, 3)
    start_federation(federation)
    federation.refresh_from_db()
    show_server_errors(nodes)
    return federation, nodes


def test_spend_matches_independent_accountant(one_participation_each):
    federation, nodes = one_participation_each
    expected = epsilon_of_one_participation()

    response = nodes[0].submit(round_number=1)

    assert response.status_code == 202
    budget = PrivacyBudget.objects.get(node=nodes[0].node)
    assert budget.epsilon_spent == pytest.approx(expected, rel=1e-9)
    entry = PrivacyLedgerEntry.objects.get(node=nodes[0].node)
    assert entry.epsilon_after == pytest.approx(expected, rel=1e-9)
    assert entry.steps == 5
    status = nodes[0].request("GET", "/api/v1/nodes/me").json()
    assert status["privacy_budget"]["epsilon_spent"] == pytest.approx(expected, rel=1e-9)


def test_exhausted_node_not_selected_or_accepted(one_participation_each):
    federation, nodes = one_participation_each
    spender = nodes[0]
    # min_updates=1, so the first update closes round 1 and round 2 opens.
    assert spender.submit(round_number=1).status_code == 202
    round_two = TrainingRound.objects.get(federation=federation, number=2)
    selected_ids = set(round_two.selected_nodes.values_list("id", flat=True))

    assert spender.node.id not in selected_ids
    assert selected_ids == {nodes[1].node.id, nodes[2].node.id}
    assert spender.request("GET", "/api/v1/task").json()["status"] == "wait"
    not_selected = spender.submit(round_number=2, model_version=1)
    assert_error(not_selected, status=403, code="node_not_selected")

    # Selection already skips nodes without budget, so the spend check in
    # accept_update is a second line of defence. Adding the node to the
    # selection by hand reaches that check.
    round_two.selected_nodes.add(spender.node)
    before = snapshot_stored_state()

    response = spender.submit(round_number=2, model_version=1)

    body = assert_error(response, status=403, code="budget_exhausted")
    assert_state_unchanged(before)
    assert body["epsilon_spent"] == pytest.approx(epsilon_of_one_participation(), rel=1e-9)
    assert body["epsilon_allocated"] == pytest.approx(epsilon_of_one_participation() * 1.01, rel=1e-9)
    assert PrivacyLedgerEntry.objects.filter(node=spender.node).count() == 1


# --- The rejection table ----------------------------------------------------------
#
# One row per kind of bad request a device on a hostile network can send.
# Each row prepares the node (revoke it, rotate its secret, lower the
# throttle), sends one update for round 1 and expects an exact status and
# code with no stored row changed. The sections above test each kind in
# depth; this table keeps every kind side by side.


def send_with_wrong_signature(node):
    return node.submit(round_number=1, **{"X-FLO-Signature": "0" * 64})


def send_replayed(node):
    nonce = signing.new_nonce()
    timestamp = int(time.time())
    assert node.request("GET", "/api/v1/task", timestamp=timestamp, nonce=nonce).status_code == 200
    return node.submit(round_number=1, timestamp=timestamp, nonce=nonce)


def send_from_revoked(node):
    revoke_node(node.node, reason="Device reported stolen.")
    return node.submit(round_number=1)


def send_from_quarantined(node):
    Node.objects.filter(id=node.node.id).update(status=Node.Status.QUARANTINED, status_reason="Reputation fell below the threshold")
    return node.submit(round_number=1)


def send_with_rotated_out_secret(node):
    rotate_node_secret(node.node, grace_seconds=60)
    Node.objects.filter(id=node.node.id).update(previous_secret_expires_at=timezone.now() - timedelta(seconds=1))
    return node.submit(round_number=1)


def send_throttled(node):
    NodeRateThrottle.THROTTLE_RATES = {"node": "1/minute"}
    assert node.request("GET", "/api/v1/task").status_code == 200
    return node.submit(round_number=1)


def send_oversized(node):
    return node.request("POST", UPDATES_PATH, encode_update() + b"\x00" * (settings.FLO_UPDATE_HEADER_ALLOWANCE_BYTES + TINY_MODEL_DATA_BYTES))


def send_with_meta(**meta_extra):
    return lambda node: node.submit(round_number=1, meta_extra=meta_extra)


REJECTION_TABLE = [
    pytest.param(send_with_wrong_signature, 401, "invalid_signature", id="wrong-signature"),
    pytest.param(send_replayed, 401, "replayed_nonce", id="replayed-nonce"),
    pytest.param(lambda node: node.submit(round_number=1, timestamp=int(time.time()) + 3600), 401, "stale_timestamp", id="clock-ahead"),
    pytest.param(lambda node: node.submit(round_number=1, timestamp=int(time.time()) - 3600), 401, "stale_timestamp", id="clock-behind"),
    pytest.param(lambda node: node.submit(round_number=1, **{"X-FLO-Node": str(uuid.uuid4())}), 401, "unknown_node", id="unknown-node"),
    pytest.param(send_from_revoked, 403, "node_revoked", id="revoked-node"),
    pytest.param(send_from_quarantined, 403, "node_quarantined", id="quarantined-node"),
    pytest.param(send_with_rotated_out_secret, 401, "invalid_signature", id="rotated-out-secret-after-grace"),
    pytest.param(send_throttled, 429, "throttled", id="throttled"),
    pytest.param(send_oversized, 413, "payload_too_large", id="oversized-body"),
    pytest.param(lambda node: node.submit(round_number=1, tensors=with_value("weight", (0, 0), np.nan)), 400, "non_finite_values", id="nan"),
    pytest.param(lambda node: node.submit(round_number=1, tensors=with_value("bias", (0,), np.inf)), 400, "non_finite_values", id="inf"),
    pytest.param(
        lambda node: node.submit(round_number=1, tensors={"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)}),
        400,
        "tensor_mismatch",
        id="wrong-shape",
    ),
    pytest.param(
        lambda node: node.submit(round_number=1, tensors={"weight": np.zeros((2, 2), np.float64), "bias": np.zeros(2, np.float32)}),
        400,
        "tensor_mismatch",
        id="wrong-dtype",
    ),
    pytest.param(lambda node: node.submit(round_number=1, num_examples=-1), 400, "invalid_num_examples", id="negative-num-examples"),
    pytest.param(lambda node: node.submit(round_number=1, num_examples=10**18), 400, "invalid_num_examples", id="huge-num-examples"),
    pytest.param(send_with_meta(learning_rate=0.1), 400, "invalid_update_field", id="unknown-field"),
    pytest.param(send_with_meta(metrics={"loss": 1e13}), 400, "invalid_update_field", id="metric-out-of-range"),
    pytest.param(send_with_meta(metrics={"loss/train": 1.0}), 400, "invalid_update_field", id="metric-name"),
    pytest.param(lambda node: node.request("POST", UPDATES_PATH, b"FLOT\x01garbage"), 400, "malformed_update", id="malformed-encoding"),
    pytest.param(lambda node: node.request("POST", UPDATES_PATH, encode_update(), content_type="application/json"), 415, "unsupported_media_type", id="wrong-media-type"),
]


@pytest.fixture
def restore_node_throttle():
    rates = NodeRateThrottle.THROTTLE_RATES
    yield
    NodeRateThrottle.THROTTLE_RATES = rates


@pytest.mark.parametrize(("send", "status", "code"), REJECTION_TABLE)
def test_rejection_table(three_nodes, restore_node_throttle, send, status, code):
    _, nodes = three_nodes
    cache.clear()
    before = snapshot_stored_state()

    response = send(nodes[0])

    assert_error(response, status=status, code=code)
    assert_state_unchanged(before)
    assert not ModelUpdate.objects.exists()
