"""Slow and reconnecting devices, stalled aggregations, and memory of large rounds."""

import tracemalloc
from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from federation.models import ModelUpdate, Node, TrainingRound
from federation.services import update_store
from federation.services.aggregation import aggregate_round
from federation.services.enrolment import enrol_node, issue_enrolment_tokens
from federation.services.federations import create_federation, start_federation
from federation.services.rounds import list_eligible_nodes, resend_stalled_aggregations
from federation.services.weights import load_weights
from flo_client import wire
from flo_client.models import tensor_specs
from tests.conftest import PLAIN_PLAN, SignedNode, enrol, make_federation

# --- Slow devices and reconnects: a node is never declared dead while its round is open ---


@pytest.fixture
def slow_round(transactional_db):
    """Two nodes selected for round 1 of a federation whose liveness timeout is 60 s."""
    federation = make_federation(round_size=2, min_updates=2, node_liveness_seconds=60, round_deadline_seconds=3600)
    nodes = enrol(federation, 2)
    start_federation(federation)
    return federation, nodes


def test_slow_node_update_accepted_after_liveness_timeout(slow_round):
    federation, nodes = slow_round
    # Ten minutes of local training without a request.
    Node.objects.filter(id=nodes[0].node.id).update(last_seen_at=timezone.now() - timedelta(minutes=10))

    responses = [node.submit(round_number=1) for node in nodes]

    assert [response.status_code for response in responses] == [202, 202]
    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.CLOSED


def test_heartbeat_makes_silent_node_eligible_again(slow_round):
    federation, nodes = slow_round
    Node.objects.filter(id=nodes[0].node.id).update(last_seen_at=timezone.now() - timedelta(minutes=10))
    silent_eligible = nodes[0].node.id in {node.id for node in list_eligible_nodes(federation)}

    response = nodes[0].request("GET", "/api/v1/nodes/me")

    assert silent_eligible is False
    assert response.status_code == 200
    assert nodes[0].node.id in {node.id for node in list_eligible_nodes(federation)}


def test_reconnected_device_is_same_node(slow_round):
    federation, nodes = slow_round
    reconnected = SignedNode(nodes[0].node, nodes[0].secret)  # a new client, as after a dropped connection

    first = reconnected.submit(round_number=1)
    second = nodes[0].submit(round_number=1)

    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["code"] == "duplicate_update"
    assert Node.objects.filter(federation=federation).count() == 2
    assert ModelUpdate.objects.filter(node=nodes[0].node).count() == 1


# --- Stalled aggregation -------------------------------------------------------------------


def test_stalled_aggregation_is_sent_again(running_round_claimed, settings):
    federation, training_round = running_round_claimed
    settings.FLO_AGGREGATION_STALL_SECONDS = 60
    TrainingRound.objects.filter(id=training_round.id).update(aggregation_started_at=timezone.now() - timedelta(seconds=61))

    sent = resend_stalled_aggregations()

    training_round.refresh_from_db()
    assert sent == 1
    assert training_round.state == TrainingRound.State.CLOSED
    assert federation.model_versions.count() == 2


def test_recent_aggregation_is_not_sent_again(running_round_claimed, settings):
    _, training_round = running_round_claimed
    settings.FLO_AGGREGATION_STALL_SECONDS = 60

    sent = resend_stalled_aggregations()

    training_round.refresh_from_db()
    assert sent == 0
    assert training_round.state == TrainingRound.State.AGGREGATING


@pytest.fixture
def running_round_claimed(transactional_db):
    """A round whose updates arrived and that was claimed for aggregation, but whose task message was lost."""
    from flo_site.celery import app

    federation = make_federation(round_size=2, min_updates=2, target_updates=2, max_rounds=1)
    nodes = enrol(federation, 2)
    start_federation(federation)
    # Without eager mode the task goes to the in-memory broker, where no worker takes it.
    app.conf.task_always_eager = False
    try:
        for node in nodes:
            assert node.submit(round_number=1).status_code == 202
    finally:
        app.conf.task_always_eager = True
    return federation, TrainingRound.objects.get(federation=federation, number=1)


# --- Memory: FedAvg streams updates instead of loading every one ------------------------------

LARGE_MODEL = {"kind": "softmax_regression", "num_features": 999, "num_classes": 250}


def aggregation_peak_bytes(num_updates: int) -> int:
    """Store num_updates random updates of LARGE_MODEL, aggregate them with the service, check the result and return the traced peak."""
    federation = create_federation(name=f"large-{num_updates}", model_spec=LARGE_MODEL, training_plan=PLAIN_PLAN, round_size=num_updates, min_updates=num_updates)
    tokens = issue_enrolment_tokens(federation, count=num_updates, ttl_seconds=600)
    nodes = [enrol_node(token=token, display_name=f"device-{index}")[0] for index, token in enumerate(tokens)]
    start_federation(federation)
    training_round = TrainingRound.objects.get(federation=federation, number=1)
    rng = np.random.default_rng(num_updates)
    specs = tensor_specs(LARGE_MODEL)
    expected = {spec.name: np.zeros(spec.shape) for spec in specs}
    # Stored directly, as the API would store them.
    for index, node in enumerate(nodes):
        tensors = {spec.name: rng.normal(size=spec.shape).astype(np.float32) for spec in specs}
        for spec in specs:
            expected[spec.name] += (index + 1) * tensors[spec.name].astype(np.float64)
        payload = wire.encode_tensors(tensors, {"round": 1, "model_version": 0, "num_examples": index + 1})
        name = update_store.new_payload_name(federation_id=federation.id, round_number=1, node_id=str(node.id))
        update_store.write_payload(name, payload)
        ModelUpdate.objects.create(round=training_round, node=node, num_examples=index + 1, payload_file=name, payload_bytes=len(payload), payload_sha256="0" * 64, l2_norm=1.0)
    TrainingRound.objects.filter(id=training_round.id).update(state=TrainingRound.State.AGGREGATING)

    tracemalloc.start()
    version = aggregate_round(training_round.id)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    total = sum(range(1, num_updates + 1))
    weights = load_weights(version)
    base = load_weights(training_round.base_version)
    for spec in specs:
        np.testing.assert_allclose(weights[spec.name] - base[spec.name], expected[spec.name] / total, rtol=1e-5, atol=1e-6)
    return peak_bytes


def test_fedavg_round_memory_does_not_grow_with_updates(transactional_db):
    model_bytes = sum(4 * int(np.prod(spec.shape)) for spec in tensor_specs(LARGE_MODEL))

    few = aggregation_peak_bytes(10)
    many = aggregation_peak_bytes(40)

    # FedAvg streams one update at a time, so 4 times the updates cost no more
    # memory, and far less than holding all 40 updates (40 model copies).
    assert many < 1.25 * few
    assert many < 20 * model_bytes
