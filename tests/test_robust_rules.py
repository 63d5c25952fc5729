"""Byzantine-robust aggregation rules against hand-computed values (no database)."""

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from federation.aggregation.fedavg import AggregationError
from federation.aggregation.robust import (
    RULE_NAMES,
    RuleConfig,
    RulePreconditionError,
    aggregate_updates,
    check_preconditions,
    flatten_tensors,
    krum_scores,
    min_updates_for,
    unflatten_vector,
)

# Five 2-D updates: A, B, C and D close together around (1, 1), E far away.
CLUSTER = np.array([[1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.3], [100.0, 100.0]])
# Seven 1-D updates for Bulyan with f = 1: six small values and one outlier.
LINE = np.array([[0.0], [1.0], [2.0], [3.0], [5.0], [7.0], [50.0]])
# The config of each rule that the table-driven tests run. With f = 1, krum and multi_krum need 5 updates and bulyan 7.
CONFIGS = {
    "fedavg": RuleConfig(name="fedavg"),
    "median": RuleConfig(name="median"),
    "trimmed_mean": RuleConfig(name="trimmed_mean", trim_fraction=0.2),
    "krum": RuleConfig(name="krum", num_byzantine=1),
    "multi_krum": RuleConfig(name="multi_krum", num_byzantine=1),
    "bulyan": RuleConfig(name="bulyan", num_byzantine=1),
    "norm_bounding": RuleConfig(name="norm_bounding", norm_bound_multiplier=1.5),
    "centered_clipping": RuleConfig(name="centered_clipping", clipping_radius=2.0),
}
SELECTING_RULES = ("krum", "multi_krum", "bulyan")


def run(updates, config, counts=None, reference=None):
    updates = np.asarray(updates, dtype=np.float64)
    counts = [1] * len(updates) if counts is None else counts
    return aggregate_updates(updates, num_examples=counts, config=config, reference=reference)


def test_fedavg_matches_hand_computation():
    # (1*10 + 3*30) / 40 = 2.5 and (2*10 + 5*30) / 40 = 4.25
    result = run([[1.0, 2.0], [3.0, 5.0]], RuleConfig(name="fedavg"), counts=[10, 30])

    np.testing.assert_allclose(result.aggregate, [2.5, 4.25], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(result.kept_fraction, [1.0, 1.0])
    assert result.selected_indices is None


def test_median_of_four_values():
    # Sorted 1, 2, 4, 100: the two middle values average to (2 + 4) / 2 = 3.
    result = run([[1.0], [2.0], [4.0], [100.0]], RuleConfig(name="median"))

    np.testing.assert_array_equal(result.aggregate, [3.0])


def test_median_of_three_points():
    # First coordinate 1, 9, 5 -> 5, second 9, 5, 1 -> 5. No client sent (5, 5).
    result = run([[1.0, 9.0], [9.0, 5.0], [5.0, 1.0]], RuleConfig(name="median"))

    np.testing.assert_array_equal(result.aggregate, [5.0, 5.0])
    assert result.kept_fraction is None


def test_median_of_two_values():
    result = run([[0.0], [1.0]], RuleConfig(name="median"))

    np.testing.assert_array_equal(result.aggregate, [0.5])


@pytest.mark.parametrize("updates", [[[1.0], [2.0], [4.0], [100.0]], [[1.0, 9.0], [9.0, 5.0], [5.0, 1.0]]])
def test_median_ignores_client_order(updates):
    expected = run(updates, RuleConfig(name="median")).aggregate

    for order in itertools.permutations(range(len(updates))):
        result = run([updates[index] for index in order], RuleConfig(name="median"))

        np.testing.assert_array_equal(result.aggregate, expected, err_msg=str(order))


def test_trimmed_mean_matches_hand_computation():
    # n = 5, beta = 0.2: k = floor(0.2 * 5) = 1 value cut from each end of each coordinate.
    # First coordinate 1, 2, 3, 4, 100: cut 1 (A) and 100 (E), mean (2 + 3 + 4) / 3 = 3.
    # Second coordinate 10 (A), 20 (D), 30 (C), 40 (E), 50 (B): cut A and B, mean (20 + 30 + 40) / 3 = 30.
    # Kept coordinates out of 2: A 0, B 1, C 2, D 2, E 1.
    updates = [[1.0, 10.0], [2.0, 50.0], [3.0, 30.0], [4.0, 20.0], [100.0, 40.0]]

    result = run(updates, RuleConfig(name="trimmed_mean", trim_fraction=0.2))

    np.testing.assert_allclose(result.aggregate, [3.0, 30.0], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result.kept_fraction, [0.0, 0.5, 1.0, 1.0, 0.5])


def test_trimmed_mean_with_zero_fraction_is_mean():
    # k = floor(0 * 3) = 0, so (1 + 2 + 6) / 3 = 3 with unit weights whatever the counts.
    result = run([[1.0], [2.0], [6.0]], RuleConfig(name="trimmed_mean", trim_fraction=0.0), counts=[1, 50, 7])

    np.testing.assert_allclose(result.aggregate, [3.0], rtol=0, atol=1e-15)


def test_trimmed_mean_rounds_cut_down():
    # n = 4, beta = 0.2: k = floor(0.8) = 0, nothing is cut and the mean is (1 + 2 + 3 + 10) / 4 = 4.
    result = run([[1.0], [2.0], [3.0], [10.0]], RuleConfig(name="trimmed_mean", trim_fraction=0.2))

    np.testing.assert_allclose(result.aggregate, [4.0], rtol=0, atol=1e-15)


def test_krum_rejects_three_updates():
    # Krum needs n >= 2f + 3 = 5. Flower 1.42.0 would score these with one neighbour instead.
    config = RuleConfig(name="krum", num_byzantine=1)

    with pytest.raises(RulePreconditionError) as raised:
        run(CLUSTER[[0, 1, 4]], config)

    assert "Krum" in str(raised.value)
    assert "got 3" in str(raised.value)
    assert "f=1" in str(raised.value)


def test_krum_rejects_four_updates():
    with pytest.raises(RulePreconditionError, match=r"Krum .*got 4, f=1"):
        run(CLUSTER[:4], RuleConfig(name="krum", num_byzantine=1))


def test_krum_scores_match_hand_computation():
    # Squared distances: AB 0.02, AC 0.02, AD 0.09, BC 0.08, BD 0.17, CD 0.05,
    # EA 19602, EB 19602.02, EC 19602.02, ED 19542.69 (99^2 + 98.7^2).
    # n - f - 2 = 2 neighbours: A 0.02 + 0.02, B 0.02 + 0.08, C 0.02 + 0.05, D 0.05 + 0.09,
    # E 19542.69 + 19602.
    scores = krum_scores(CLUSTER, num_byzantine=1)

    np.testing.assert_allclose(scores, [0.04, 0.10, 0.07, 0.14, 39144.69], rtol=1e-12, atol=1e-12)


def test_krum_selects_lowest_score():
    result = run(CLUSTER, RuleConfig(name="krum", num_byzantine=1))

    np.testing.assert_array_equal(result.aggregate, CLUSTER[0])
    assert result.selected_indices == (0,)
    np.testing.assert_array_equal(result.kept_fraction, [1.0, 0.0, 0.0, 0.0, 0.0])


def test_krum_ignores_large_common_offset():
    # float32 spacing near 1e4 is about 1e-3, so the differences of 0.1 survive the offset,
    # and the distance computation must not cancel them.
    updates = (CLUSTER + 10000.0).astype(np.float32)

    result = aggregate_updates(updates, num_examples=[1] * 5, config=RuleConfig(name="krum", num_byzantine=1))

    assert result.selected_indices == (0,)
    np.testing.assert_array_equal(result.aggregate, updates[0])


def test_krum_keeps_precision_beside_far_outlier():
    # Centring on the mean would move the centre by 2e11, and squared norms near 1e23 cannot
    # resolve distances of 0.02 in float64.
    updates = CLUSTER.copy()
    updates[4] = [1e12, 1e12]

    scores = krum_scores(updates, num_byzantine=1)

    np.testing.assert_allclose(scores[:4], [0.04, 0.10, 0.07, 0.14], rtol=0, atol=1e-9)


def test_krum_breaks_ties_by_lowest_index():
    # With 2 neighbours, index 1 (value 0) scores 0 + 1 = 1, index 2 (value 0) 0 + 1 = 1,
    # index 3 (value 1) 1 + 1 = 2, index 0 (value 10) 81 + 100 = 181, and index 4 is far.
    # Indices 1 and 2 tie and 1 wins.
    result = run([[10.0], [0.0], [0.0], [1.0], [30.0]], RuleConfig(name="krum", num_byzantine=1))

    assert result.selected_indices == (1,)


def test_multi_krum_averages_by_example_count():
    # m = n - f = 4 lowest scores: A, C, B, D. Counts 2, 1, 1, 4 (E's 100 is left out), total 8:
    # x = (2*1.0 + 1.1 + 0.9 + 4*1.0) / 8 = 1.0 and y = (2*1.0 + 0.9 + 1.1 + 4*1.3) / 8 = 9.2 / 8 = 1.15.
    result = run(CLUSTER, RuleConfig(name="multi_krum", num_byzantine=1), counts=[2, 1, 1, 4, 100])

    np.testing.assert_allclose(result.aggregate, [1.0, 1.15], rtol=0, atol=1e-12)
    assert result.selected_indices == (0, 1, 2, 3)
    np.testing.assert_array_equal(result.kept_fraction, [1.0, 1.0, 1.0, 1.0, 0.0])


def test_multi_krum_with_two_selected():
    # m = 2: A (0.04) and C (0.07), counts 2 and 1: x = (2*1.0 + 0.9) / 3, y = (2*1.0 + 1.1) / 3.
    config = RuleConfig(name="multi_krum", num_byzantine=1, num_selected=2)

    result = run(CLUSTER, config, counts=[2, 1, 1, 4, 100])

    np.testing.assert_allclose(result.aggregate, [2.9 / 3, 3.1 / 3], rtol=0, atol=1e-12)
    assert result.selected_indices == (0, 2)


def test_bulyan_matches_hand_computation():
    # n = 7, f = 1: theta = 7 - 2 = 5 selected, beta = 5 - 2 = 3 averaged per coordinate.
    # Values by index: 0, 1, 2, 3, 5, 7, 50. Scores are sums of squared distances.
    # Step 1, 7 left, 7 - 1 - 2 = 4 neighbours: 0 -> 1+4+9+25 = 39, 1 -> 1+1+4+16 = 22,
    #   2 -> 1+1+4+9 = 15, 3 -> 1+4+4+9 = 18, 5 -> 4+4+9+16 = 33, 7 -> 4+16+25+36 = 81, select value 2.
    # Step 2, 6 left, 3 neighbours: 0 -> 1+9+25 = 35, 1 -> 1+4+16 = 21, 3 -> 4+4+9 = 17,
    #   5 -> 4+4+16 = 24, 7 -> 4+16+36 = 56, select value 3.
    # Step 3, 5 left, 2 neighbours: 0 -> 1+25 = 26, 1 -> 1+16 = 17, 5 -> 4+16 = 20, 7 -> 4+36 = 40, select value 1.
    # Step 4, 4 left, max(1, 4 - 3) = 1 neighbour: 0 -> 25, 5 -> 4, 7 -> 4, 50 -> 1849;
    #   5 and 7 tie and the lower index (4, value 5) is selected.
    # Step 5, 3 left, max(1, 0) = 1 neighbour: 0 -> 49, 7 -> 49, 50 -> 1849, and index 0 wins the tie.
    # The selection set has values 0, 1, 2, 3 and 5 with median 2 and distances 2, 1, 0, 1 and 3 to it.
    # The 3 closest are 2, 1 and 3, so the aggregate is (2 + 1 + 3) / 3 = 2.
    result = run(LINE, RuleConfig(name="bulyan", num_byzantine=1))

    np.testing.assert_allclose(result.aggregate, [2.0], rtol=0, atol=1e-15)
    assert result.selected_indices == (0, 1, 2, 3, 4)
    np.testing.assert_array_equal(result.kept_fraction, [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])


def test_bulyan_scores_last_steps_by_neighbour():
    # LINE with the outlier moved to index 0. Steps 1 to 4 select the same values, now
    # indices 3, 4, 2 and 5. Step 5 has 50 (index 0), 0 (index 1) and 7 (index 6) left, and
    # 3 - f - 2 = 0 neighbours would give all three score 0 and select the outlier by index.
    # With one neighbour the scores are 43^2 = 1849, 49 and 49, so index 1 is selected.
    result = run(np.roll(LINE, 1, axis=0), RuleConfig(name="bulyan", num_byzantine=1))

    assert result.selected_indices == (1, 2, 3, 4, 5)
    np.testing.assert_allclose(result.aggregate, [2.0], rtol=0, atol=1e-15)


def test_bulyan_credits_clients_per_coordinate():
    # f = 0: theta = n = 3 and beta = 3, so every value of every coordinate is averaged:
    # (1 + 2 + 6) / 3 = 3 and (4 + 0 + 2) / 3 = 2.
    result = run([[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]], RuleConfig(name="bulyan"))

    np.testing.assert_allclose(result.aggregate, [3.0, 2.0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(result.kept_fraction, [1.0, 1.0, 1.0])


def test_norm_bounding_matches_hand_computation():
    # Norms 5, 1 and 2 have median 2, so with multiplier 1 the bound is 2. Scales 2/5 = 0.4, 1, 1.
    # Clipped (1.2, 1.6), (0, 1), (0, 2) with counts 1, 1, 2 (total 4):
    # x = 1.2 / 4 = 0.3, y = (1.6 + 1 + 2*2) / 4 = 1.65.
    updates = [[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]

    result = run(updates, RuleConfig(name="norm_bounding"), counts=[1, 1, 2])

    np.testing.assert_allclose(result.aggregate, [0.3, 1.65], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.kept_fraction, [0.4, 1.0, 1.0], rtol=0, atol=1e-15)


def test_centered_clipping_one_iteration():
    # v0 = 0, tau = 1: (3, 4) has norm 5 and scale 0.2, (0.6, 0.8) has norm 1 and scale 1.
    # v1 = ((0.6, 0.8) + (0.6, 0.8)) / 2 = (0.6, 0.8).
    config = RuleConfig(name="centered_clipping", clipping_radius=1.0, clipping_iterations=1)

    result = run([[3.0, 4.0], [0.6, 0.8]], config)

    np.testing.assert_allclose(result.aggregate, [0.6, 0.8], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.kept_fraction, [0.2, 1.0], rtol=0, atol=1e-12)


def test_centered_clipping_two_iterations():
    # From v1 = (0.6, 0.8): (3, 4) - v1 = (2.4, 3.2), norm 4, scale 0.25, clipped (0.6, 0.8);
    # (0.6, 0.8) - v1 = 0, scale 1. v2 = v1 + ((0.6, 0.8) + 0) / 2 = (0.9, 1.2).
    config = RuleConfig(name="centered_clipping", clipping_radius=1.0, clipping_iterations=2)

    result = run([[3.0, 4.0], [0.6, 0.8]], config)

    np.testing.assert_allclose(result.aggregate, [0.9, 1.2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.kept_fraction, [0.25, 1.0], rtol=0, atol=1e-12)


def test_centered_clipping_starts_at_reference():
    # Starting at (0.6, 0.8), one iteration is the second iteration above.
    config = RuleConfig(name="centered_clipping", clipping_radius=1.0, clipping_iterations=1)

    result = run([[3.0, 4.0], [0.6, 0.8]], config, reference=np.array([0.6, 0.8]))

    np.testing.assert_allclose(result.aggregate, [0.9, 1.2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
def test_krum_rules_skip_non_finite_update(rule, bad_value):
    # A has the lowest score when finite. With a NaN or infinity it must be neither selected nor averaged.
    updates = CLUSTER.copy()
    updates[0, 1] = bad_value

    result = run(updates, CONFIGS[rule])

    assert 0 not in result.selected_indices
    assert np.all(np.isfinite(result.aggregate))
    assert result.kept_fraction[0] == 0.0


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_bulyan_skips_non_finite_update(bad_value):
    # Index 2 (value 2) is selected first when finite.
    updates = LINE.copy()
    updates[2, 0] = bad_value

    result = run(updates, CONFIGS["bulyan"])

    assert 2 not in result.selected_indices
    assert np.all(np.isfinite(result.aggregate))
    assert result.kept_fraction[2] == 0.0


def test_krum_with_non_finite_selects_next_best():
    # Without A (infinitely far), 2 neighbours: B 0.08 + 0.17, C 0.05 + 0.08, D 0.05 + 0.17, so C wins.
    updates = CLUSTER.copy()
    updates[0] = np.nan

    result = run(updates, CONFIGS["krum"])

    assert result.selected_indices == (2,)


def test_multi_krum_rejects_too_few_finite():
    # m = n - f = 4 but only 3 updates are finite.
    updates = CLUSTER.copy()
    updates[[1, 3]] = np.nan

    with pytest.raises(AggregationError, match="only 3 of 5"):
        run(updates, CONFIGS["multi_krum"])


def test_krum_rejects_when_no_score_is_finite():
    # Two finite updates each have one finite neighbour, and a score needs n - f - 2 = 2.
    updates = CLUSTER.copy()
    updates[[0, 1, 2]] = np.inf

    with pytest.raises(AggregationError, match="only 0 of 5"):
        run(updates, CONFIGS["krum"])


def test_aggregate_updates_rejects_dict_config():
    with pytest.raises(TypeError, match="RuleConfig.from_dict"):
        aggregate_updates(LINE, num_examples=[1] * 7, config={"name": "median"})


def test_krum_too_few_finite_names_neighbours():
    # n = 7, f = 1: a score needs 4 finite neighbours, and with 3 NaN updates each finite one has 3.
    updates = LINE.copy()
    updates[[0, 3, 5]] = np.nan

    with pytest.raises(AggregationError, match="only with 4 finite neighbours"):
        run(updates, CONFIGS["krum"])


def test_bulyan_rejects_too_few_finite():
    # theta = 5 but only 4 updates are finite.
    updates = LINE.copy()
    updates[[0, 3, 5]] = np.nan

    with pytest.raises(AggregationError, match="selection set of 5"):
        run(updates, CONFIGS["bulyan"])


@pytest.mark.parametrize("rule", [name for name in RULE_NAMES if name not in SELECTING_RULES])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_other_rules_reject_non_finite(rule, bad_value):
    updates = CLUSTER.copy()
    updates[2, 0] = bad_value

    with pytest.raises(AggregationError, match="Update 2 has non-finite values"):
        run(updates, CONFIGS[rule])


def test_overflowing_aggregate_is_rejected():
    # The mean of 1.7e308 and 1.7e308 is finite, but their float64 sum is not.
    with pytest.raises(AggregationError, match="not finite"):
        run([[1.7e308], [1.7e308]], RuleConfig(name="trimmed_mean", trim_fraction=0.0))


@pytest.mark.parametrize(
    ("config", "num_updates", "fragments"),
    [
        (RuleConfig(name="krum", num_byzantine=1), 4, ["Krum", "got 4", "f=1", "at least 5"]),
        (RuleConfig(name="krum", num_byzantine=2), 6, ["Krum", "got 6", "f=2", "at least 7"]),
        (RuleConfig(name="multi_krum", num_byzantine=1), 4, ["Multi-Krum", "got 4", "f=1"]),
        (RuleConfig(name="multi_krum", num_byzantine=1, num_selected=5), 5, ["Multi-Krum", "m=5", "got 5", "f=1"]),
        (RuleConfig(name="multi_krum", num_byzantine=2, num_selected=6), 7, ["Multi-Krum", "m=6", "got 7", "f=2"]),
        (RuleConfig(name="bulyan", num_byzantine=1), 6, ["Bulyan", "got 6", "f=1", "4f+3=7"]),
        (RuleConfig(name="bulyan", num_byzantine=2), 10, ["Bulyan", "got 10", "f=2", "4f+3=11"]),
        (RuleConfig(name="median"), 0, ["median", "got 0"]),
        (RuleConfig(name="trimmed_mean"), 0, ["Trimmed mean", "got 0"]),
    ],
)
def test_preconditions_name_rule_and_counts(config, num_updates, fragments):
    with pytest.raises(RulePreconditionError) as raised:
        check_preconditions(config, num_updates)

    for fragment in fragments:
        assert fragment in str(raised.value), fragment


def test_aggregate_updates_checks_preconditions():
    with pytest.raises(RulePreconditionError, match="Bulyan"):
        run(LINE[:6], RuleConfig(name="bulyan", num_byzantine=1))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (RuleConfig(name="krum", num_byzantine=0), 3),
        (RuleConfig(name="krum", num_byzantine=1), 5),
        (RuleConfig(name="multi_krum", num_byzantine=1), 5),
        (RuleConfig(name="multi_krum", num_byzantine=1, num_selected=2), 5),
        (RuleConfig(name="multi_krum", num_byzantine=1, num_selected=5), 6),
        (RuleConfig(name="bulyan", num_byzantine=1), 7),
        (RuleConfig(name="bulyan", num_byzantine=2), 11),
        (RuleConfig(name="trimmed_mean", trim_fraction=0.45), 1),
        (RuleConfig(name="fedavg"), 1),
        (RuleConfig(name="median", num_byzantine=3), 1),
        (RuleConfig(name="norm_bounding"), 1),
        (RuleConfig(name="centered_clipping"), 1),
    ],
)
def test_min_updates_for_each_rule(config, expected):
    assert min_updates_for(config) == expected


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_preconditions_accept_minimum_count(rule):
    config = CONFIGS[rule]

    check_preconditions(config, min_updates_for(config))


def test_trimmed_mean_keeps_one_value_at_largest_fraction():
    # The largest float64 below 0.5 still cuts floor(beta * n) < n / 2 values, so one stays.
    config = RuleConfig(name="trimmed_mean", trim_fraction=math.nextafter(0.5, 0.0))

    for num_updates in range(1, 200):
        check_preconditions(config, num_updates)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"name": "geomed"}, "name must be one of fedavg, median, trimmed_mean, krum"),
        ({"name": None}, "name must be one of"),
        ({"num_byzantine": -1}, "num_byzantine must be at least 0, got -1"),
        ({"num_byzantine": True}, "num_byzantine must be an integer, got True"),
        ({"num_byzantine": 1.0}, "num_byzantine must be an integer, got 1.0"),
        ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\), got 0.5"),
        ({"trim_fraction": -0.1}, r"trim_fraction must be in \[0, 0.5\), got -0.1"),
        ({"trim_fraction": math.nan}, "trim_fraction must be finite, got nan"),
        ({"trim_fraction": False}, "trim_fraction must be a real number, got False"),
        ({"trim_fraction": "0.1"}, "trim_fraction must be a real number, got '0.1'"),
        ({"name": "multi_krum", "num_selected": 0}, "num_selected must be at least 1, got 0"),
        ({"name": "multi_krum", "num_selected": True}, "num_selected must be an integer, got True"),
        ({"name": "krum", "num_selected": 3}, "num_selected applies only to multi_krum, got 3 for krum"),
        ({"norm_bound_multiplier": 0.0}, "norm_bound_multiplier must be positive, got 0.0"),
        ({"norm_bound_multiplier": math.inf}, "norm_bound_multiplier must be finite, got inf"),
        ({"clipping_radius": -1.0}, "clipping_radius must be positive, got -1.0"),
        ({"clipping_radius": math.nan}, "clipping_radius must be finite, got nan"),
        ({"clipping_iterations": 0}, "clipping_iterations must be at least 1, got 0"),
        ({"clipping_iterations": 2.0}, "clipping_iterations must be an integer, got 2.0"),
        ({"clipping_iterations": True}, "clipping_iterations must be an integer, got True"),
    ],
)
def test_rule_config_rejects_bad_field(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        RuleConfig(**overrides)


def test_rule_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['f', 'rule'\]"):
        RuleConfig.from_dict({"name": "krum", "rule": "krum", "f": 1})


def test_rule_config_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="must be a mapping, got list"):
        RuleConfig.from_dict(["krum"])


def test_rule_config_round_trips_through_json():
    config = RuleConfig(name="multi_krum", num_byzantine=np.int64(2), num_selected=4)

    restored = RuleConfig.from_dict(json.loads(json.dumps(config.to_dict())))

    assert restored == config
    assert type(restored.num_byzantine) is int


def test_rule_config_json_keeps_only_rule_parameters():
    config = RuleConfig(name="trimmed_mean", trim_fraction=0)

    assert config.to_dict() == {"name": "trimmed_mean", "trim_fraction": 0.0}
    assert type(config.to_dict()["trim_fraction"]) is float


def test_rule_config_rejects_parameter_rule_does_not_use():
    with pytest.raises(ValueError, match="median does not use trim_fraction"):
        RuleConfig.from_dict({"name": "median", "trim_fraction": 0.2})


def test_rule_config_from_dict_fills_defaults():
    assert RuleConfig.from_dict({"name": "median"}) == RuleConfig(name="median")


@pytest.mark.parametrize(
    ("updates", "counts", "fragment"),
    [
        (np.zeros(3), [1, 1, 1], r"shape \(n_clients, n_params\).*got shape \(3,\)"),
        (np.zeros((3, 0)), [1, 1, 1], r"n_params >= 1, got shape \(3, 0\)"),
        (np.zeros((3, 2), dtype=complex), [1, 1, 1], "real-valued updates, got dtype complex128"),
        (np.zeros((3, 2)), [1, 1], "Expected 3 example counts, one per update, got 2"),
        (np.zeros((3, 2)), [1, 0, 1], "Update 1 has example count 0"),
        (np.zeros((3, 2)), [1, 1, True], "Update 2 has example count True"),
        (np.zeros((3, 2)), [1, 2.5, 1], "Update 1 has example count 2.5"),
        (np.zeros((3, 2)), np.array([1.0, 1.0, 1.0]), "Update 0 has example count 1.0"),
    ],
)
def test_aggregate_updates_rejects_bad_input(updates, counts, fragment):
    with pytest.raises(AggregationError, match=fragment):
        aggregate_updates(updates, num_examples=counts, config=RuleConfig(name="fedavg"))


def test_aggregate_updates_accepts_integer_array_counts():
    result = aggregate_updates(np.array([[1.0], [4.0]]), num_examples=np.array([3, 1], dtype=np.int32), config=RuleConfig(name="fedavg"))

    np.testing.assert_allclose(result.aggregate, [1.75], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("reference", "fragment"),
    [
        (np.zeros(3), r"reference of shape \(2,\), got shape \(3,\)"),
        (np.array([0.0, np.nan]), "reference has non-finite values"),
    ],
)
def test_aggregate_updates_rejects_bad_reference(reference, fragment):
    with pytest.raises(AggregationError, match=fragment):
        run(CLUSTER, CONFIGS["centered_clipping"], reference=reference)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_rules_do_not_mutate_inputs(rule):
    updates = (LINE * np.array([[1.0, -2.0]])).astype(np.float32)
    counts = np.array([3, 1, 4, 1, 5, 9, 2])
    reference = np.array([0.5, -0.5])
    copies = (updates.copy(), counts.copy(), reference.copy())

    aggregate_updates(updates, num_examples=counts, config=CONFIGS[rule], reference=reference)

    np.testing.assert_array_equal(updates, copies[0])
    np.testing.assert_array_equal(counts, copies[1])
    np.testing.assert_array_equal(reference, copies[2])


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_rules_return_float64_vector(rule):
    result = aggregate_updates(LINE.astype(np.float32), num_examples=[1] * 7, config=CONFIGS[rule])

    assert result.aggregate.dtype == np.float64
    assert result.aggregate.shape == (1,)


def test_flatten_tensors_follows_name_order():
    tensors = {"b": np.array([3.0], dtype=np.float32), "w": np.array([[1.0, 2.0]], dtype=np.float32)}

    vector = flatten_tensors(tensors, ["w", "b"])

    np.testing.assert_array_equal(vector, [1.0, 2.0, 3.0])
    assert vector.dtype == np.float64


@pytest.mark.parametrize("names", [["w"], ["w", "b", "c"], ["w", "w", "b"]])
def test_flatten_tensors_rejects_mismatched_names(names):
    tensors = {"w": np.zeros(2), "b": np.zeros(1)}

    with pytest.raises(AggregationError, match="once each"):
        flatten_tensors(tensors, names)


def test_unflatten_vector_round_trips():
    shapes = {"w": (2, 3), "b": (3,), "scale": ()}
    tensors = {name: np.arange(math.prod(shape), dtype=np.float32).reshape(shape) + index for index, (name, shape) in enumerate(shapes.items())}

    restored = unflatten_vector(flatten_tensors(tensors, list(shapes)), shapes)

    for name, values in tensors.items():
        assert restored[name].dtype == np.float32, name
        np.testing.assert_array_equal(restored[name], values, err_msg=name)


def test_unflatten_vector_rejects_wrong_size():
    with pytest.raises(AggregationError, match=r"vector of shape \(4,\).*got shape \(5,\)"):
        unflatten_vector(np.zeros(5), {"w": (2, 2)})


def test_unflatten_vector_rejects_float32_overflow():
    # 1e39 is finite in float64 but above float32's maximum of about 3.4e38.
    with pytest.raises(AggregationError, match="Tensor 'b' has values that are not finite in float32"):
        unflatten_vector(np.array([1.0, 2.0, 1e39]), {"w": (2,), "b": (1,)})


finite_updates = st.integers(1, 9).flatmap(
    lambda num_clients: hnp.arrays(
        np.float64,
        st.tuples(st.just(num_clients), st.integers(1, 4)),
        elements=st.floats(-1e6, 1e6, allow_nan=False),
    )
)


@settings(max_examples=60, deadline=None)
@given(finite_updates, st.sampled_from(["median", "trimmed_mean"]), st.floats(0.0, 0.49))
def test_coordinate_rules_stay_within_range(updates, rule, trim_fraction):
    result = run(updates, RuleConfig(name=rule, trim_fraction=trim_fraction))

    assert np.all(result.aggregate >= updates.min(axis=0) - 1e-9 * np.abs(updates).max())
    assert np.all(result.aggregate <= updates.max(axis=0) + 1e-9 * np.abs(updates).max())


@settings(max_examples=60, deadline=None)
@given(finite_updates, st.sampled_from(["median", "trimmed_mean"]), st.randoms(use_true_random=False))
def test_coordinate_rules_ignore_client_order(updates, rule, random):
    order = list(range(len(updates)))
    random.shuffle(order)
    config = RuleConfig(name=rule, trim_fraction=0.2)

    np.testing.assert_array_equal(run(updates[order], config).aggregate, run(updates, config).aggregate)


@settings(max_examples=60, deadline=None)
@given(finite_updates, st.floats(0.1, 3.0))
def test_norm_bounding_respects_bound(updates, multiplier):
    # A weighted mean of vectors of norm <= bound has norm <= bound.
    bound = multiplier * np.median(np.linalg.norm(updates, axis=1))

    result = run(updates, RuleConfig(name="norm_bounding", norm_bound_multiplier=multiplier))

    assert np.linalg.norm(result.aggregate) <= bound * (1 + 1e-12) + 1e-12
    assert np.all((result.kept_fraction >= 0.0) & (result.kept_fraction <= 1.0))


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 4), elements=st.floats(-1e6, 1e6, allow_nan=False)), st.sampled_from(RULE_NAMES))
def test_equal_updates_are_fixed_point(update, rule):
    # Seven copies of one update: every rule returns it, centered clipping once it starts there.
    updates = np.tile(update, (7, 1))

    result = run(updates, CONFIGS[rule], reference=update.copy())

    np.testing.assert_allclose(result.aggregate, update, rtol=1e-12, atol=1e-9)
