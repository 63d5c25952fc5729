"""Robust aggregation rules, server optimizers and reputation inside real rounds."""

import json
from datetime import timedelta
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from federation.exceptions import InvalidFederationConfig, InvalidNodeState
from federation.models import AuditEntry, Node, Reputation, TrainingRound
from federation.services.federations import start_federation
from federation.services.reputation import reinstate_node
from federation.services.rounds import close_expired_rounds
from federation.services.weights import load_weights
from tests.conftest import enrol, make_federation, zero_update


def submit_round(nodes, fills, *, round_number, model_version, num_examples=10):
    for node, fill in zip(nodes, fills, strict=True):
        response = node.submit(round_number=round_number, model_version=model_version, tensors=zero_update(fill=fill), num_examples=num_examples)
        assert response.status_code == 202, response.content


# --- Configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "params", "min_updates", "expected"),
    [
        ("krum", {"num_byzantine": 1}, 3, ["Krum", "got 3", "f=1"]),
        ("krum", {"num_byzantine": 1}, 4, ["Krum", "got 4", "f=1"]),
        ("multi_krum", {"num_byzantine": 2}, 6, ["got 6", "f=2"]),
        ("bulyan", {"num_byzantine": 1}, 6, ["Bulyan", "got 6", "f=1"]),
    ],
)
def test_rule_precondition_rejected_at_configuration(db, rule, params, min_updates, expected):
    with pytest.raises(InvalidFederationConfig) as raised:
        make_federation(round_size=10, min_updates=min_updates, aggregation_rule=rule, aggregation_params=params)

    for fragment in expected:
        assert fragment in raised.value.detail


def test_krum_accepted_when_min_updates_suffices(db):
    federation = make_federation(round_size=6, min_updates=5, aggregation_rule="krum", aggregation_params={"num_byzantine": 1})

    assert federation.aggregation_params["num_byzantine"] == 1


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"aggregation_rule": "mean_of_best"}, "mean_of_best"),
        ({"aggregation_rule": "trimmed_mean", "aggregation_params": {"trim_fraction": 0.5}}, "trim_fraction"),
        ({"aggregation_rule": "krum", "aggregation_params": {"num_byzantine": -1}}, "num_byzantine"),
        ({"aggregation_rule": "median", "aggregation_params": {"unknown_knob": 1}}, "unknown_knob"),
        ({"aggregation_rule": "median", "aggregation_params": [1]}, "aggregation_params"),
        ({"target_updates": 4}, "target_updates"),
        ({"target_updates": 1, "min_updates": 2}, "target_updates"),
        ({"quarantine_threshold": 1.5}, "quarantine_threshold"),
        ({"quarantine_threshold": True}, "quarantine_threshold"),
        ({"server_optimizer": "sgd_with_tricks"}, "sgd_with_tricks"),
        ({"server_optimizer": "fedadam", "server_optimizer_params": {"tau": -1.0}}, "tau"),
        ({"server_optimizer": "fedadam", "server_optimizer_params": {"learning_rate": 0.1}}, "learning_rate"),
    ],
)
def test_invalid_robust_settings_rejected(db, overrides, fragment):
    settings = {"round_size": 3, "min_updates": 3, **overrides}

    with pytest.raises(InvalidFederationConfig) as raised:
        make_federation(**settings)

    assert fragment in raised.value.detail


def test_central_dp_rejects_robust_rule(db):
    central = {"target_epsilon": 3.0, "participation_rate": 0.5, "clip_norm": 1.0}

    with pytest.raises(InvalidFederationConfig) as raised:
        make_federation(central_dp=central, aggregation_rule="median", max_rounds=5)

    assert "median" in raised.value.detail


# --- Rules in rounds -----------------------------------------------------------


def test_median_round_averages_two_middle_values(transactional_db):
    federation = make_federation(round_size=4, min_updates=4, aggregation_rule="median")
    nodes = enrol(federation, 4)
    start_federation(federation)

    submit_round(nodes, [1.0, 2.0, 4.0, 100.0], round_number=1, model_version=0)

    first = TrainingRound.objects.get(federation=federation, number=1)
    np.testing.assert_array_equal(load_weights(first.result_version)["bias"], [3.0, 3.0])
    assert first.aggregation_report["coordinate_wise"] is True
    assert first.aggregation_report["selected_node_ids"] is None


def test_median_round_credits_no_single_node(transactional_db):
    federation = make_federation(round_size=4, min_updates=4, aggregation_rule="median")
    nodes = enrol(federation, 4)
    start_federation(federation)

    submit_round(nodes, [1.0, 2.0, 4.0, 100.0], round_number=1, model_version=0)

    components = [Reputation.objects.get(node=node.node).last_components for node in nodes]
    assert all("kept_score" not in parts for parts in components)


def test_krum_round_keeps_the_central_update(transactional_db):
    federation = make_federation(round_size=5, min_updates=5, aggregation_rule="krum", aggregation_params={"num_byzantine": 1})
    nodes = enrol(federation, 5)
    start_federation(federation)

    submit_round(nodes, [1.0, 1.1, 0.9, 1.3, 100.0], round_number=1, model_version=0)

    first = TrainingRound.objects.get(federation=federation, number=1)
    np.testing.assert_array_equal(load_weights(first.result_version)["bias"], [1.0, 1.0])
    assert first.aggregation_report["selected_node_ids"] == [str(nodes[0].node.id)]


def test_krum_round_fails_below_minimum(transactional_db):
    federation = make_federation(round_size=5, min_updates=5, aggregation_rule="krum", aggregation_params={"num_byzantine": 1})
    nodes = enrol(federation, 5)
    start_federation(federation)
    submit_round(nodes[:4], [1.0, 1.1, 0.9, 1.3], round_number=1, model_version=0)
    # Revoked after submitting: aggregation leaves its update out, so 4 remain.
    Node.objects.filter(id=nodes[0].node.id).update(status=Node.Status.REVOKED)

    submit_round(nodes[4:], [1.2], round_number=1, model_version=0)

    first = TrainingRound.objects.get(federation=federation, number=1)
    assert first.state == TrainingRound.State.FAILED
    assert "Krum" in first.failure_reason
    assert "got 4" in first.failure_reason
    assert first.result_version is None


def test_trimmed_mean_round_cuts_extremes(transactional_db):
    federation = make_federation(round_size=5, min_updates=5, aggregation_rule="trimmed_mean", aggregation_params={"trim_fraction": 0.2})
    nodes = enrol(federation, 5)
    start_federation(federation)

    submit_round(nodes, [-50.0, 1.0, 2.0, 3.0, 80.0], round_number=1, model_version=0)

    # floor(0.2 * 5) = 1 cut from each side: mean(1, 2, 3) = 2.
    first = TrainingRound.objects.get(federation=federation, number=1)
    np.testing.assert_allclose(load_weights(first.result_version)["bias"], [2.0, 2.0])


def test_target_updates_waits_for_every_selected_node(transactional_db):
    federation = make_federation(round_size=3, min_updates=2, target_updates=3)
    nodes = enrol(federation, 3)
    start_federation(federation)

    submit_round(nodes[:2], [1.0, 1.0], round_number=1, model_version=0)

    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.OPEN


def test_target_updates_round_closes_when_all_report(transactional_db):
    federation = make_federation(round_size=3, min_updates=2, target_updates=3)
    nodes = enrol(federation, 3)
    start_federation(federation)

    submit_round(nodes, [1.0, 1.0, 4.0], round_number=1, model_version=0)

    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.CLOSED


def test_fedadam_round_stores_optimizer_state(transactional_db):
    federation = make_federation(
        round_size=1, min_updates=1, max_rounds=2, server_optimizer="fedadam", server_learning_rate=0.1, server_optimizer_params={"beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    )
    [node] = enrol(federation, 1)
    start_federation(federation)

    submit_round([node], [1.0], round_number=1, model_version=0)

    # m = 0.1 * 1 = 0.1; v = 0.99 * tau^2 + 0.01 * 1 = 0.01000099; step = 0.1 * 0.1 / (sqrt(v) + tau).
    expected = 0.1 * 0.1 / (np.sqrt(0.99 * 1e-6 + 0.01) + 1e-3)
    first = TrainingRound.objects.get(federation=federation, number=1)
    federation.refresh_from_db()
    np.testing.assert_allclose(load_weights(first.result_version)["bias"], [expected, expected], rtol=1e-5)
    assert federation.server_optimizer_state is not None


# --- Reputation and quarantine -----------------------------------------------------

HONEST_FILLS = [1.0, 1.1, 0.9, 1.05, 0.95]


@pytest.fixture
def guarded(transactional_db):
    """Trimmed mean with reputation: five honest nodes and one attacker (the last node)."""
    federation = make_federation(
        round_size=6,
        min_updates=5,
        target_updates=6,
        max_rounds=10,
        aggregation_rule="trimmed_mean",
        aggregation_params={"trim_fraction": 0.2},
        quarantine_threshold=0.4,
    )
    nodes = enrol(federation, 6)
    start_federation(federation)
    return federation, nodes


def run_attacked_rounds(federation, nodes, count, *, start=1):
    """Run rounds start..start+count-1: honest nodes send values near 1, the last node sends -100 while active."""
    for number in range(start, start + count):
        active = [node for node in nodes if Node.objects.get(id=node.node.id).status == Node.Status.ACTIVE]
        fills = [-100.0 if node is nodes[-1] else HONEST_FILLS[index] for index, node in enumerate(active)]
        submit_round(active, fills, round_number=number, model_version=number - 1)


def test_attacker_quarantined_in_third_round(guarded):
    federation, nodes = guarded

    run_attacked_rounds(federation, nodes, 2)
    status_after_two = Node.objects.get(id=nodes[-1].node.id).status
    run_attacked_rounds(federation, nodes, 1, start=3)

    assert status_after_two == Node.Status.ACTIVE
    assert Node.objects.get(id=nodes[-1].node.id).status == Node.Status.QUARANTINED
    assert TrainingRound.objects.get(federation=federation, number=3).aggregation_report["quarantined_node_ids"] == [str(nodes[-1].node.id)]


def test_honest_nodes_stay_active_under_attack(guarded):
    federation, nodes = guarded

    run_attacked_rounds(federation, nodes, 5)

    statuses = [Node.objects.get(id=node.node.id).status for node in nodes[:-1]]
    assert statuses == [Node.Status.ACTIVE] * 5


def test_quarantined_node_cannot_submit(guarded):
    federation, nodes = guarded
    run_attacked_rounds(federation, nodes, 3)

    response = nodes[-1].submit(round_number=4, model_version=3)

    assert response.status_code == 403
    assert response.json()["code"] == "node_quarantined"


def test_quarantined_node_is_not_selected(guarded):
    federation, nodes = guarded
    run_attacked_rounds(federation, nodes, 3)

    fourth = TrainingRound.objects.get(federation=federation, number=4)

    assert nodes[-1].node.id not in set(fourth.selected_nodes.values_list("id", flat=True))


def test_quarantine_and_scores_are_audited(guarded):
    federation, nodes = guarded

    run_attacked_rounds(federation, nodes, 3)

    quarantine = AuditEntry.objects.get(action="node.quarantined")
    assert quarantine.target == f"node:{nodes[-1].node.id}"
    assert quarantine.details["threshold"] == 0.4
    assert AuditEntry.objects.filter(action="reputation.updated", federation=federation).count() == 3


def test_operator_reinstates_quarantined_node(guarded):
    federation, nodes = guarded
    run_attacked_rounds(federation, nodes, 3)
    out = StringIO()

    call_command("reinstate_node", str(nodes[-1].node.id), "--reason", "device reflashed", stdout=out)

    node = Node.objects.get(id=nodes[-1].node.id)
    assert json.loads(out.getvalue())["status"] == "active"
    assert node.status == Node.Status.ACTIVE
    assert Reputation.objects.get(node=node).score == 1.0
    assert AuditEntry.objects.get(action="node.reinstated").details["reason"] == "device reflashed"


def test_reinstating_active_node_is_rejected(guarded):
    _, nodes = guarded

    with pytest.raises(InvalidNodeState):
        reinstate_node(nodes[0].node)


def test_reinstate_command_rejects_bad_node_id(transactional_db):
    with pytest.raises(CommandError) as raised:
        call_command("reinstate_node", "not-a-uuid")

    assert "UUID" in str(raised.value)


def test_dropout_lowers_score_by_half_a_step(transactional_db):
    federation = make_federation(round_size=3, min_updates=2, target_updates=3)
    nodes = enrol(federation, 3)
    start_federation(federation)
    submit_round(nodes[:2], [1.0, 1.0], round_number=1, model_version=0)
    TrainingRound.objects.filter(federation=federation, number=1).update(deadline_at=timezone.now() - timedelta(seconds=1))

    close_expired_rounds()

    reputation = Reputation.objects.get(node=nodes[2].node)
    # 0.7 * 1.0 + 0.3 * 0.5
    assert reputation.score == pytest.approx(0.85)
    assert reputation.dropout_count == 1
    assert reputation.last_components == {"result": "dropout"}


def test_second_round_rewrites_stored_reputation(guarded):
    federation, nodes = guarded
    run_attacked_rounds(federation, nodes, 1)
    first = Reputation.objects.get(node=nodes[0].node)

    run_attacked_rounds(federation, nodes, 1, start=2)

    second = Reputation.objects.get(node=nodes[0].node)
    assert (second.accepted_count, second.last_round_number) == (2, 2)
    assert second.updated_at > first.updated_at
    assert set(second.last_components) == set(first.last_components)
    assert Reputation.objects.get(node=nodes[-1].node).score < second.score
