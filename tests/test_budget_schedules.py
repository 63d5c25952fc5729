"""Record-level budgets: sensitivity classes, spending schedules and spends that never overdraw."""

import os
import subprocess
import sys
import uuid

import dp_accounting
import pytest
from django.db import connection, transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.exceptions import InvalidFederationConfig
from federation.models import Node, TrainingRound
from federation.services.enrolment import enrol_node, issue_enrolment_tokens
from federation.services.federations import start_federation
from privacy.accounting import RDP_ORDERS
from privacy.exceptions import BudgetExhausted
from privacy.models import PrivacyBudget, PrivacyLedgerEntry
from privacy.schedules import noise_schedule
from privacy.services.budgets import record_spend
from tests.conftest import DP_PLAN, SignedNode, make_federation

SCHEDULE_ARGUMENTS = {"delta": 1e-5, "sampling_rate": 0.2, "steps": 5, "participations": 10}


def reference_rdp_epsilon(noise_multipliers, *, sampling_rate=0.2, steps=5, delta=1e-5) -> float:
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    for noise_multiplier in noise_multipliers:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("schedule", ["even", "front_loaded"])
def test_schedule_spends_the_allocation_without_exceeding_it(schedule):
    noise = noise_schedule(epsilon=4.0, schedule=schedule, **SCHEDULE_ARGUMENTS)

    epsilon = reference_rdp_epsilon(noise)

    assert epsilon <= 4.0
    assert epsilon >= 4.0 * 0.99


def test_even_schedule_uses_one_noise_multiplier():
    noise = noise_schedule(epsilon=4.0, schedule="even", **SCHEDULE_ARGUMENTS)

    assert len(set(noise)) == 1


def test_front_loaded_schedule_doubles_noise_from_first_to_last():
    noise = noise_schedule(epsilon=4.0, schedule="front_loaded", **SCHEDULE_ARGUMENTS)

    assert noise[-1] == pytest.approx(2 * noise[0])
    assert list(noise) == sorted(noise)


def test_smaller_allocation_gets_more_noise():
    personal = noise_schedule(epsilon=8.0, schedule="even", **SCHEDULE_ARGUMENTS)
    special = noise_schedule(epsilon=2.0, schedule="even", **SCHEDULE_ARGUMENTS)

    assert special[0] > personal[0]


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="schedule"):
        noise_schedule(epsilon=4.0, schedule="back_loaded", **SCHEDULE_ARGUMENTS)


def make_closed_rounds(federation, count: int) -> list[TrainingRound]:
    """Closed rounds to charge spends against: the ledger allows one spend per node and round."""
    base_version = federation.model_versions.get(version=0)
    return [
        TrainingRound.objects.create(federation=federation, number=100 + index, state="closed", base_version=base_version, deadline_at=timezone.now())
        for index in range(count)
    ]


def budgeted_federation(**kwargs):
    return make_federation(
        plan=DP_PLAN,
        round_size=2,
        min_updates=2,
        node_epsilon_budget=8.0,
        sensitivity_budgets={"special_category": 2.0, "public": 20.0},
        planned_participations=4,
        **kwargs,
    )


def enrol_with_class(federation, sensitivity_class: str) -> SignedNode:
    [token] = issue_enrolment_tokens(federation, count=1, ttl_seconds=600, sensitivity_class=sensitivity_class)
    node, secret = enrol_node(token=token, display_name=sensitivity_class)
    return SignedNode(node, secret)


def test_nodes_get_their_class_allocation(transactional_db):
    federation = budgeted_federation()

    special = enrol_with_class(federation, "special_category")
    personal = enrol_with_class(federation, "personal")

    assert special.node.sensitivity_class == "special_category"
    assert PrivacyBudget.objects.get(node=special.node).epsilon_allocated == 2.0
    assert PrivacyBudget.objects.get(node=personal.node).epsilon_allocated == 8.0


def test_task_carries_the_noise_of_the_node_class_and_the_ledger_charges_it(transactional_db):
    federation = budgeted_federation()
    special = enrol_with_class(federation, "special_category")
    personal = enrol_with_class(federation, "personal")
    start_federation(federation)

    special_noise = special.request("GET", "/api/v1/task").json()["training_plan"]["dp"]["noise_multiplier"]
    personal_noise = personal.request("GET", "/api/v1/task").json()["training_plan"]["dp"]["noise_multiplier"]
    assert special.submit(round_number=1).status_code == 202

    expected = noise_schedule(epsilon=2.0, schedule="even", **{**SCHEDULE_ARGUMENTS, "participations": 4})[0]
    assert special_noise == pytest.approx(expected)
    assert special_noise > personal_noise
    assert PrivacyLedgerEntry.objects.get(node=special.node).noise_multiplier == pytest.approx(special_noise)


def test_node_stops_after_its_planned_participations(transactional_db):
    federation = budgeted_federation(max_rounds=10)
    nodes = [enrol_with_class(federation, "special_category"), enrol_with_class(federation, "personal")]
    start_federation(federation)

    for number in range(1, 5):
        training_round = TrainingRound.objects.get(federation=federation, number=number)
        for node in nodes:
            assert node.submit(round_number=number, model_version=training_round.base_version.version).status_code == 202

    federation.refresh_from_db()
    assert federation.status == "completed"
    for node in nodes:
        budget = PrivacyBudget.objects.get(node=node.node)
        assert budget.epsilon_spent <= budget.epsilon_allocated
        assert budget.epsilon_spent >= budget.epsilon_allocated * 0.99


def test_tokens_for_a_class_without_allocation_are_refused(transactional_db):
    federation = make_federation(plan=DP_PLAN, round_size=1, min_updates=1, sensitivity_budgets={"public": 20.0})

    with pytest.raises(InvalidFederationConfig, match="no epsilon allocation"):
        issue_enrolment_tokens(federation, count=1, ttl_seconds=60, sensitivity_class="personal")


def test_unknown_sensitivity_class_in_budgets_is_refused(transactional_db):
    with pytest.raises(InvalidFederationConfig, match="sensitivity class"):
        make_federation(plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=1.0, sensitivity_budgets={"secret": 1.0})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(allocation=st.floats(0.5, 12.0), attempts=st.integers(1, 12))
def test_spends_are_monotone_and_never_exceed_allocation(transactional_db, allocation, attempts):
    federation = make_federation(name=f"property-{uuid.uuid4().hex}", plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=allocation)
    node = enrol_with_class(federation, "personal").node

    spent = []
    for training_round in make_closed_rounds(federation, attempts):
        try:
            with transaction.atomic():
                record_spend(node=Node.objects.get(id=node.id), training_round=training_round)
        except BudgetExhausted:
            pass
        spent.append(PrivacyBudget.objects.get(node=node).epsilon_spent)

    assert spent == sorted(spent)
    assert spent[-1] <= allocation


@pytest.mark.integration
@pytest.mark.postgresql
def test_concurrent_spends_from_processes_never_overdraw(transactional_db):
    assert connection.vendor == "postgresql", "run this test with DATABASE_URL pointing to PostgreSQL (make test-postgres)"
    allocation = reference_rdp_epsilon([2.0] * 3) * 1.0001  # room for exactly three spends
    federation = make_federation(plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=allocation)
    node = enrol_with_class(federation, "personal").node
    round_ids = [training_round.id for training_round in make_closed_rounds(federation, 12)]
    database = connection.settings_dict
    url = f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    script = (
        "import sys, django; django.setup()\n"
        "from django.db import transaction\n"
        "from federation.models import Node, TrainingRound\n"
        "from privacy.exceptions import BudgetExhausted\n"
        "from privacy.services.budgets import record_spend\n"
        "outcomes = []\n"
        "for round_id in map(int, sys.argv[2:]):\n"
        "    try:\n"
        "        with transaction.atomic():\n"
        "            record_spend(node=Node.objects.get(id=sys.argv[1]), training_round=TrainingRound.objects.get(id=round_id))\n"
        "        outcomes.append('spent')\n"
        "    except BudgetExhausted:\n"
        "        outcomes.append('refused')\n"
        "print(','.join(outcomes))\n"
    )
    environment = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "flo_site.settings"}

    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(node.id), *map(str, round_ids[index::4])], env=environment, stdout=subprocess.PIPE, text=True)
        for index in range(4)
    ]
    outcomes = [outcome for process in processes for outcome in process.communicate(timeout=120)[0].strip().split(",")]

    budget = PrivacyBudget.objects.get(node=node)
    assert outcomes.count("spent") == 3
    assert outcomes.count("refused") == 9
    assert budget.epsilon_spent <= allocation
    assert PrivacyLedgerEntry.objects.filter(node=node).count() == 3


def test_allocation_too_small_for_schedule_is_refused_at_configuration(transactional_db):
    with pytest.raises(InvalidFederationConfig, match="cannot follow"):
        make_federation(plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=1e-9, planned_participations=40)


def test_front_loaded_schedule_needs_planned_participations(transactional_db):
    with pytest.raises(InvalidFederationConfig, match="planned_participations"):
        make_federation(plan=DP_PLAN, round_size=1, min_updates=1, node_epsilon_budget=5.0, spending_schedule="front_loaded")


def test_start_with_too_few_eligible_nodes_keeps_the_draft(transactional_db):
    from federation.models import Federation

    federation = make_federation(round_size=3, min_updates=3)
    enrol_with_class(federation, "personal")

    with pytest.raises(InvalidFederationConfig, match="cannot open a round: Only 1 of 1 active nodes are eligible"):
        start_federation(federation)

    federation.refresh_from_db()
    assert federation.status == Federation.Status.DRAFT
