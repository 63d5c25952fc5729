"""RDP accounting of local DP-SGD against dp-accounting used directly (no database)."""

import itertools

import dp_accounting
import pytest

from privacy.accounting import RDP_ORDERS, DpSgdEvent, compose_epsilon


def reference_epsilon(events: list[tuple[float, float, int]], delta: float) -> float:
    """Compose each event separately with dp-accounting's own RDP accountant."""
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    for noise_multiplier, sampling_rate, steps in events:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    return accountant.get_epsilon(delta)


def test_single_event_matches_dp_accounting():
    expected = reference_epsilon([(2.0, 0.2, 5)], 1e-5)

    assert compose_epsilon([DpSgdEvent(2.0, 0.2, 5)], delta=1e-5) == pytest.approx(expected, rel=1e-12)


def test_repeated_events_compose_like_dp_accounting():
    expected = reference_epsilon([(2.0, 0.2, 5)] * 40, 1e-5)

    assert compose_epsilon([DpSgdEvent(2.0, 0.2, 5)] * 40, delta=1e-5) == pytest.approx(expected, rel=1e-9)


def test_mixed_events_compose_like_dp_accounting():
    events = [(2.0, 0.2, 5), (1.1, 0.05, 20), (2.0, 0.2, 5), (3.0, 0.5, 2)]
    expected = reference_epsilon(events, 1e-6)

    assert compose_epsilon([DpSgdEvent(*event) for event in events], delta=1e-6) == pytest.approx(expected, rel=1e-9)


def test_composition_is_tighter_than_summing_per_round_epsilons():
    one_round = compose_epsilon([DpSgdEvent(2.0, 0.2, 5)], delta=1e-5)

    ten_rounds = compose_epsilon([DpSgdEvent(2.0, 0.2, 5)] * 10, delta=1e-5)

    assert ten_rounds < 10 * one_round


def test_epsilon_grows_strictly_with_each_round():
    epsilons = [compose_epsilon([DpSgdEvent(1.1, 0.05, 10)] * rounds, delta=1e-5) for rounds in range(1, 6)]

    assert all(earlier < later for earlier, later in itertools.pairwise(epsilons))


def test_full_participation_is_finite_and_costs_more_than_sampling():
    full = compose_epsilon([DpSgdEvent(1.0, 1.0, 10)], delta=1e-5)
    sampled = compose_epsilon([DpSgdEvent(1.0, 0.1, 10)], delta=1e-5)

    assert full > sampled
    assert full < float("inf")


def test_no_events_cost_nothing():
    assert compose_epsilon([], delta=1e-5) == 0.0


@pytest.mark.parametrize("delta", [0.0, -1e-5, 1.0, 1.5])
def test_invalid_delta_is_rejected(delta):
    with pytest.raises(ValueError, match="delta"):
        compose_epsilon([DpSgdEvent(1.0, 0.1, 1)], delta=delta)


@pytest.mark.parametrize(
    ("arguments", "field"),
    [((0.0, 0.1, 1), "noise_multiplier"), ((1.0, 0.0, 1), "sampling_rate"), ((1.0, 1.5, 1), "sampling_rate"), ((1.0, 0.1, 0), "steps"), ((1.0, 0.1, 1.5), "steps")],
)
def test_invalid_event_is_rejected(arguments, field):
    with pytest.raises(ValueError, match=field):
        DpSgdEvent(*arguments)


def test_large_delta_never_gives_negative_epsilon():
    assert compose_epsilon([DpSgdEvent(50.0, 0.01, 1)], delta=0.9) >= 0.0
