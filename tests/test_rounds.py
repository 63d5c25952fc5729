"""Round lifecycle services: selection, budgets, deadlines, aggregation failures."""

from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from federation.models import Federation, ModelUpdate, ModelVersion, TrainingRound
from federation.services.aggregation import aggregate_round
from federation.services.federations import start_federation
from federation.services.rounds import (
    close_expired_rounds,
    list_eligible_nodes,
    open_missing_rounds,
    select_nodes,
)
from federation.services.weights import load_weights, store_model_version
from privacy.accounting import DpSgdEvent, compose_epsilon
from privacy.models import PrivacyBudget, PrivacyLedgerEntry
from tests.conftest import DP_PLAN, enrol, make_federation, zero_update

ONE_ROUND_EPSILON = compose_epsilon([DpSgdEvent(2.0, 0.2, 5)], delta=1e-5)


def test_node_with_exhausted_budget_is_never_selected(transactional_db):
    federation = make_federation(plan=DP_PLAN, round_size=2, min_updates=1, node_epsilon_budget=10.0)
    nodes = enrol(federation, 2)
    PrivacyBudget.objects.filter(node=nodes[0].node).update(epsilon_allocated=ONE_ROUND_EPSILON * 0.99)

    eligible = list_eligible_nodes(federation)

    assert [node.id for node in eligible] == [nodes[1].node.id]


def test_node_with_budget_for_one_more_round_is_selected(transactional_db):
    federation = make_federation(plan=DP_PLAN, round_size=2, min_updates=1, node_epsilon_budget=ONE_ROUND_EPSILON * 1.01)
    nodes = enrol(federation, 1)

    eligible = list_eligible_nodes(federation)

    assert [node.id for node in eligible] == [nodes[0].node.id]


def test_budget_runs_out_after_affordable_rounds_and_federation_completes(transactional_db):
    # Budget for exactly two participations: the third round cannot open.
    two_rounds = compose_epsilon([DpSgdEvent(2.0, 0.2, 5)] * 2, delta=1e-5)
    federation = make_federation(plan=DP_PLAN, round_size=2, min_updates=2, node_epsilon_budget=two_rounds * 1.001)
    nodes = enrol(federation, 2)
    start_federation(federation)

    for round_number, version in ((1, 0), (2, 1)):
        for node in nodes:
            assert node.submit(round_number=round_number, model_version=version).status_code == 202

    federation.refresh_from_db()
    assert federation.status == Federation.Status.COMPLETED
    assert "privacy budget" in federation.status_reason
    assert federation.rounds.count() == 2
    for node in nodes:
        budget = PrivacyBudget.objects.get(node=node.node)
        assert budget.epsilon_spent == pytest.approx(two_rounds, rel=1e-12)
        assert budget.epsilon_spent <= budget.epsilon_allocated
    assert PrivacyLedgerEntry.objects.count() == 4


def test_ledger_entries_record_composed_epsilon_after_each_round(transactional_db):
    federation = make_federation(plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=50.0, max_rounds=3)
    [node] = enrol(federation, 1)
    start_federation(federation)

    for round_number in (1, 2, 3):
        assert node.submit(round_number=round_number, model_version=round_number - 1).status_code == 202

    epsilons = list(PrivacyLedgerEntry.objects.filter(node=node.node).order_by("round__number").values_list("epsilon_after", flat=True))
    expected = [compose_epsilon([DpSgdEvent(2.0, 0.2, 5)] * rounds, delta=1e-5) for rounds in (1, 2, 3)]
    np.testing.assert_allclose(epsilons, expected, rtol=1e-12)


def test_selection_is_reproducible_and_without_replacement():
    eligible = [FakeNode(index) for index in range(10)]

    first = select_nodes(eligible, count=4, seed=7, round_number=3)
    second = select_nodes(eligible, count=4, seed=7, round_number=3)

    assert first == second
    assert len({node.id for node in first}) == 4


def test_selection_takes_everyone_when_fewer_than_round_size():
    assert select_nodes([1, 2], count=5, seed=0, round_number=1) == [1, 2]


def test_quarantined_and_revoked_nodes_are_not_eligible(transactional_db):
    federation = make_federation(round_size=3, min_updates=1)
    nodes = enrol(federation, 3)
    nodes[0].node.status = "quarantined"
    nodes[0].node.save()
    nodes[1].node.status = "revoked"
    nodes[1].node.save()

    assert [node.id for node in list_eligible_nodes(federation)] == [nodes[2].node.id]


def test_node_not_seen_recently_is_not_eligible(transactional_db):
    federation = make_federation(round_size=2, min_updates=1, node_liveness_seconds=60)
    nodes = enrol(federation, 2)
    nodes[0].node.last_seen_at = timezone.now() - timedelta(seconds=120)
    nodes[0].node.save()

    assert [node.id for node in list_eligible_nodes(federation)] == [nodes[1].node.id]


def test_deadline_with_too_few_updates_fails_round_and_opens_next(running):
    federation, nodes = running
    assert nodes[0].submit(round_number=1).status_code == 202
    TrainingRound.objects.filter(federation=federation, number=1).update(deadline_at=timezone.now() - timedelta(seconds=1))

    changed = close_expired_rounds()

    first = TrainingRound.objects.get(federation=federation, number=1)
    assert changed == 1
    assert first.state == TrainingRound.State.FAILED
    assert "1 accepted updates, fewer than min_updates=3" in first.failure_reason
    assert TrainingRound.objects.get(federation=federation, number=2).state == TrainingRound.State.OPEN
    assert ModelVersion.objects.filter(federation=federation).count() == 1


def test_deadline_with_enough_updates_aggregates_what_arrived(transactional_db):
    federation = make_federation(round_size=3, min_updates=2)
    nodes = enrol(federation, 3)
    start_federation(federation)
    TrainingRound.objects.filter(federation=federation, number=1).update(deadline_at=timezone.now() + timedelta(seconds=600))
    assert nodes[0].submit(round_number=1, tensors=zero_update(fill=1.0), num_examples=10).status_code == 202
    assert nodes[1].submit(round_number=1, tensors=zero_update(fill=4.0), num_examples=30).status_code == 202

    first = TrainingRound.objects.get(federation=federation, number=1)

    # min_updates=2 reached: (1*10 + 4*30) / 40 = 3.25
    assert first.state == TrainingRound.State.CLOSED
    np.testing.assert_array_equal(load_weights(first.result_version)["bias"], [3.25, 3.25])


def test_aggregation_that_overflows_fails_round_and_keeps_model(running):
    federation, nodes = running
    # A base model near float32's maximum: finite updates push the sum past it.
    TrainingRound.objects.filter(federation=federation).delete()
    ModelVersion.objects.filter(federation=federation).delete()
    store_model_version(federation, version=0, weights=zero_update(fill=3e38))
    Federation.objects.filter(id=federation.id).update(status="paused")
    start_federation(federation)

    for node in nodes:
        assert node.submit(round_number=1, tensors=zero_update(fill=3e38)).status_code == 202

    first = TrainingRound.objects.get(federation=federation, number=1)
    assert first.state == TrainingRound.State.FAILED
    assert "non-finite" in first.failure_reason
    assert ModelVersion.objects.filter(federation=federation).count() == 1
    assert TrainingRound.objects.get(federation=federation, number=2).state == TrainingRound.State.OPEN


def test_aggregating_twice_writes_one_version(running):
    federation, nodes = running
    for node in nodes[:2]:
        node.submit(round_number=1)
    first = TrainingRound.objects.get(federation=federation, number=1)
    TrainingRound.objects.filter(id=first.id).update(state=TrainingRound.State.AGGREGATING)

    versions = [aggregate_round(first.id), aggregate_round(first.id)]

    assert versions[0] is not None
    assert versions[1] is None
    assert ModelVersion.objects.filter(federation=federation).count() == 2


def test_update_from_node_revoked_before_aggregation_is_left_out(running):
    federation, nodes = running
    nodes[0].submit(round_number=1, tensors=zero_update(fill=100.0))
    nodes[0].node.status = "revoked"
    nodes[0].node.save()
    nodes[1].submit(round_number=1, tensors=zero_update(fill=2.0))
    nodes[2].submit(round_number=1, tensors=zero_update(fill=4.0))

    first = TrainingRound.objects.get(federation=federation, number=1)

    assert first.state == TrainingRound.State.CLOSED
    assert ModelUpdate.objects.get(round=first, node=nodes[0].node).status == ModelUpdate.Status.REJECTED
    np.testing.assert_array_equal(load_weights(first.result_version)["bias"], [3.0, 3.0])


class FakeNode:
    def __init__(self, node_id):
        self.id = node_id


def test_selection_prefers_nodes_with_fewest_participations():
    eligible = [FakeNode(index) for index in range(6)]
    participations = {0: 3, 1: 0, 2: 3, 3: 1, 4: 0, 5: 2}

    chosen = select_nodes(eligible, count=3, seed=0, round_number=1, participations=participations)

    assert sorted(node.id for node in chosen) == [1, 3, 4]


def test_selection_breaks_ties_differently_across_rounds():
    eligible = [FakeNode(index) for index in range(20)]

    picks = {tuple(node.id for node in select_nodes(eligible, count=5, seed=0, round_number=number)) for number in range(1, 6)}

    assert len(picks) > 1


def test_task_poll_settles_expired_round_without_scheduler(running):
    federation, nodes = running
    TrainingRound.objects.filter(federation=federation, number=1).update(deadline_at=timezone.now() - timedelta(seconds=1))

    response = nodes[0].request("GET", "/api/v1/task")

    assert response.status_code == 200
    assert TrainingRound.objects.get(federation=federation, number=1).state == TrainingRound.State.FAILED
    assert response.json()["round"]["number"] == 2


def test_server_momentum_carries_velocity_between_rounds(transactional_db):
    federation = make_federation(round_size=1, min_updates=1, server_momentum=0.5, server_learning_rate=1.0, max_rounds=2)
    [node] = enrol(federation, 1)
    start_federation(federation)

    assert node.submit(round_number=1, model_version=0, tensors=zero_update(fill=1.0)).status_code == 202
    assert node.submit(round_number=2, model_version=1, tensors=zero_update(fill=1.0)).status_code == 202

    # Round 1: v = 1, w = 1. Round 2: v = 0.5 * 1 + 1 = 1.5, w = 1 + 1.5 = 2.5.
    second = TrainingRound.objects.get(federation=federation, number=2)
    np.testing.assert_allclose(load_weights(second.result_version)["bias"], [2.5, 2.5])


def test_open_missing_rounds_opens_next_round(transactional_db):
    federation = make_federation(round_size=2, min_updates=2)
    enrol(federation, 2)
    Federation.objects.filter(id=federation.id).update(status=Federation.Status.RUNNING)

    changed = close_expired_rounds(federation_id=federation.id)

    assert changed == 1
    assert TrainingRound.objects.get(federation=federation).state == TrainingRound.State.OPEN


def test_open_missing_rounds_leaves_paused_federation(transactional_db):
    federation = make_federation(round_size=2, min_updates=2)
    enrol(federation, 2)
    Federation.objects.filter(id=federation.id).update(status=Federation.Status.PAUSED)

    assert open_missing_rounds() == 0
    assert not TrainingRound.objects.filter(federation=federation).exists()


def test_open_missing_rounds_leaves_open_round(transactional_db):
    federation = make_federation(round_size=2, min_updates=2)
    enrol(federation, 2)
    start_federation(federation)

    assert open_missing_rounds(federation_id=federation.id) == 0
    assert TrainingRound.objects.filter(federation=federation).count() == 1
