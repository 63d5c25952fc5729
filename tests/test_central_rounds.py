"""User-level central DP-FedAvg through the round services and the signed API."""

import dp_accounting
import numpy as np
import pytest

from federation.exceptions import InvalidFederationConfig
from federation.models import Federation, ModelVersion, TrainingRound
from federation.services import rounds as round_services
from federation.services.federations import start_federation
from federation.services.weights import load_weights
from privacy import accounting
from privacy.models import FederationPrivacyLedgerEntry
from privacy.services.central import federation_epsilon
from tests.conftest import PLAIN_PLAN, TINY_MODEL, enrol, zero_update

CENTRAL = {"target_epsilon": 5.0, "participation_rate": 1.0, "clip_norm": 1.0, "accountant": "pld"}


def make_central_federation(*, central=None, max_rounds=5, name="central"):
    from federation.services.federations import create_federation

    return create_federation(name=name, model_spec=TINY_MODEL, training_plan=PLAIN_PLAN, max_rounds=max_rounds, central_dp={**CENTRAL, **(central or {})})


def reference_pld_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float = 1e-5) -> float:
    accountant = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def run_round(federation, nodes, number: int, *, fill: float = 0.0) -> TrainingRound:
    training_round = TrainingRound.objects.get(federation=federation, number=number)
    version = training_round.base_version.version
    for node in nodes:
        if training_round.selected_nodes.filter(id=node.node.id).exists():
            assert node.submit(round_number=number, model_version=version, tensors=zero_update(fill=fill)).status_code == 202
    training_round.refresh_from_db()
    return training_round


def test_calibrated_noise_meets_target_over_planned_rounds(transactional_db):
    federation = make_central_federation(central={"participation_rate": 0.1, "target_epsilon": 3.0}, max_rounds=50)

    epsilon = reference_pld_epsilon(federation.central_noise_multiplier, 0.1, 50)

    assert epsilon <= 3.0 * 1.01
    assert epsilon >= 3.0 * 0.95


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"participation_rate": 1.5}, "participation_rate"),
        ({"participation_rate": 0}, "participation_rate"),
        ({"target_epsilon": -1}, "target_epsilon"),
        ({"target_epsilon": float("nan")}, "target_epsilon"),
        ({"clip_norm": 0}, "clip_norm"),
        ({"accountant": "moments"}, "accountant"),
        ({"surprise": 1}, "surprise"),
        ({"adaptive_clipping": {"count_noise_multiplier": -1.0}}, "adaptive_clipping"),
    ],
    ids=["rate-above-one", "rate-zero", "negative-target", "nan-target", "zero-clip", "unknown-accountant", "unknown-key", "bad-adaptive"],
)
def test_invalid_central_settings_are_rejected(transactional_db, override, fragment):
    with pytest.raises(InvalidFederationConfig, match=fragment):
        make_central_federation(central=override)

    assert Federation.objects.count() == 0


@pytest.mark.parametrize("delta", [0.5, 0.9, 1.0, 0.0, -1e-5])
def test_invalid_delta_is_rejected_at_configuration(transactional_db, delta):
    from federation.services.federations import create_federation

    with pytest.raises(InvalidFederationConfig, match="dp_delta"):
        create_federation(name="d", model_spec=TINY_MODEL, training_plan=PLAIN_PLAN, dp_delta=delta, central_dp=CENTRAL)


def test_federation_epsilon_grows_every_round_and_matches_reference(transactional_db):
    federation = make_central_federation(central={"participation_rate": 1.0}, max_rounds=5)
    nodes = enrol(federation, 3)
    start_federation(federation)

    epsilons = []
    for number in range(1, 6):
        if number == 4:
            # A worker restart loses every in-process cache; the ledger in the database is all that remains.
            accounting._epsilon_for_counts.cache_clear()
            accounting._rdp_per_step.cache_clear()
        run_round(federation, nodes, number)
        epsilons.append(FederationPrivacyLedgerEntry.objects.get(round__federation=federation, round__number=number).epsilon_after)

    assert all(earlier < later for earlier, later in zip(epsilons, epsilons[1:], strict=False))
    for rounds, epsilon in enumerate(epsilons, start=1):
        assert epsilon == pytest.approx(reference_pld_epsilon(federation.central_noise_multiplier, 1.0, rounds), rel=0.01)
    assert epsilons[-1] <= 5.0 * (1 + 1e-9)


def test_rounds_record_population_rate_and_fixed_denominator(transactional_db):
    federation = make_central_federation(central={"participation_rate": 1.0})
    nodes = enrol(federation, 4)
    start_federation(federation)

    first = run_round(federation, nodes, 1)

    assert first.population == 4
    assert first.participation_rate == 1.0
    assert first.expected_participants == 4.0
    assert FederationPrivacyLedgerEntry.objects.get(round=first).sampling_rate == 1.0


def test_empty_cohort_releases_noise_only_and_is_charged(transactional_db, monkeypatch):
    monkeypatch.setattr(round_services, "sample_participants", lambda eligible, **kwargs: [])
    federation = make_central_federation(max_rounds=2)
    enrol(federation, 3)

    start_federation(federation)

    rounds = list(TrainingRound.objects.filter(federation=federation).order_by("number"))
    assert [training_round.state for training_round in rounds] == ["closed", "closed"]
    assert FederationPrivacyLedgerEntry.objects.filter(federation=federation).count() == 2
    assert ModelVersion.objects.filter(federation=federation).count() == 3
    noise_only = load_weights(rounds[0].result_version)
    assert np.all(np.isfinite(noise_only["weight"]))
    assert np.any(noise_only["weight"] != 0)


def test_exhausted_central_budget_stops_opening_rounds(transactional_db):
    federation = make_central_federation(max_rounds=10)
    nodes = enrol(federation, 3)
    start_federation(federation)
    run_round(federation, nodes, 1)
    spent = federation_epsilon(federation)
    Federation.objects.filter(id=federation.id).update(target_epsilon=spent * 1.0001)

    run_round(federation, nodes, 2)

    federation.refresh_from_db()
    second = TrainingRound.objects.get(federation=federation, number=2)
    assert second.state == TrainingRound.State.FAILED
    assert "above its target" in second.failure_reason
    assert federation.status == Federation.Status.COMPLETED
    assert "central privacy budget" in federation.status_reason
    assert FederationPrivacyLedgerEntry.objects.filter(federation=federation).count() == 1


def test_adaptive_clipping_moves_the_clip_norm(transactional_db):
    federation = make_central_federation(central={"adaptive_clipping": {"count_noise_multiplier": 5.0, "target_quantile": 0.5, "learning_rate": 0.2}})
    nodes = enrol(federation, 3)
    start_federation(federation)

    first = run_round(federation, nodes, 1, fill=0.0)

    federation.refresh_from_db()
    assert first.clip_norm == 1.0
    assert first.num_clipped == 0
    assert federation.clip_norm != 1.0


def test_large_update_is_clipped_before_averaging(transactional_db):
    federation = make_central_federation()
    nodes = enrol(federation, 3)
    start_federation(federation)

    first = run_round(federation, nodes, 1, fill=100.0)

    assert first.num_clipped == 3
    # Each update is clipped to norm 1, so the noiseless mean has norm 1;
    # with z of a few units on 3 participants the noise stays far below 100.
    assert np.abs(load_weights(first.result_version)["weight"]).max() < 50


def test_record_level_and_central_dp_work_together(transactional_db):
    from federation.services.federations import create_federation
    from privacy.models import PrivacyLedgerEntry
    from tests.conftest import DP_PLAN

    federation = create_federation(name="both", model_spec=TINY_MODEL, training_plan=DP_PLAN, node_epsilon_budget=10.0, max_rounds=3, central_dp=CENTRAL)
    nodes = enrol(federation, 3)
    start_federation(federation)

    first = run_round(federation, nodes, 1)

    assert first.state == TrainingRound.State.CLOSED
    assert PrivacyLedgerEntry.objects.filter(round=first).count() == 3
    assert FederationPrivacyLedgerEntry.objects.filter(round=first).count() == 1


@pytest.mark.parametrize(
    ("central", "fragment"),
    [(5, "central_dp must be an object"), ({**CENTRAL, "adaptive_clipping": 3}, "adaptive_clipping"), ({**CENTRAL, "adaptive_clipping": {"x": 1}}, "adaptive_clipping")],
    ids=["not-an-object", "adaptive-not-an-object", "adaptive-unknown-key"],
)
def test_malformed_central_settings_are_rejected(transactional_db, central, fragment):
    from federation.services.federations import create_federation

    with pytest.raises(InvalidFederationConfig, match=fragment):
        create_federation(name="malformed", model_spec=TINY_MODEL, training_plan=PLAIN_PLAN, central_dp=central)


def test_status_reports_central_privacy(transactional_db):
    from federation.queries import describe_federation

    federation = make_central_federation()

    status = describe_federation(federation)

    assert status["central_dp"]["noise_multiplier"] == federation.central_noise_multiplier
    assert status["central_dp"]["epsilon_spent"] == 0.0
