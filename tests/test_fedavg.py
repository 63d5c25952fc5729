"""Example-weighted FedAvg against hand-computed values (no database)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.aggregation.fedavg import (
    AggregationError,
    apply_update,
    weighted_average,
)


def average(pairs, names=("w",)):
    return weighted_average(((dict(zip(names, values, strict=True)), count) for values, count in pairs), tensor_names=list(names))


def test_weighted_average_matches_hand_computation():
    # (1*10 + 3*30) / 40 = 2.5 and (2*10 + 5*30) / 40 = 4.25
    result = average([([np.array([1.0, 2.0], dtype=np.float32)], 10), ([np.array([3.0, 5.0], dtype=np.float32)], 30)])

    np.testing.assert_allclose(result["w"], [2.5, 4.25], rtol=0, atol=0)


def test_weighted_average_returns_float32():
    result = average([([np.array([1.0], dtype=np.float32)], 1)])

    assert result["w"].dtype == np.float32


def test_all_zero_counts_raise_total_weight_zero():
    with pytest.raises(AggregationError, match="total weight is zero"):
        average([([np.array([1.0, 2.0])], 0), ([np.array([3.0, 4.0])], 0)])


def test_zero_count_update_gets_no_weight():
    result = average([([np.array([1.0, 2.0])], 0), ([np.array([3.0, 4.0])], 10)])

    np.testing.assert_array_equal(result["w"], [3.0, 4.0])


def test_weights_normalise_over_reporting_updates_only():
    # Four nodes registered, two report: (2*100 + 4*300) / 400 = 3.5.
    result = average([([np.array([2.0])], 100), ([np.array([4.0])], 300)])

    np.testing.assert_array_equal(result["w"], [3.5])


def test_negative_count_is_rejected():
    with pytest.raises(AggregationError, match="non-negative"):
        average([([np.array([1.0])], -5)])


def test_boolean_count_is_rejected():
    with pytest.raises(AggregationError, match="non-negative integers"):
        average([([np.array([1.0])], True)])


def test_counts_beyond_int32_and_int64_do_not_overflow():
    # 2**31 - 1 and 1: exact mean in float64 is (x * (2**31 - 1) + y) / 2**31.
    big = 2**31 - 1
    result = average([([np.array([1.0])], big), ([np.array([0.0])], 1)])

    np.testing.assert_allclose(result["w"], [big / 2**31], rtol=1e-7)


def test_counts_summing_past_int64_stay_exact():
    huge = 2**62
    result = average([([np.array([2.0])], huge), ([np.array([4.0])], huge), ([np.array([6.0])], huge)])

    np.testing.assert_array_equal(result["w"], [4.0])


def test_non_finite_input_is_rejected():
    with pytest.raises(AggregationError, match="non-finite"):
        average([([np.array([np.nan, 1.0])], 1), ([np.array([1.0, 1.0])], 1)])


def test_mean_overflowing_float32_is_rejected():
    with pytest.raises(AggregationError, match="float32"):
        average([([np.array([1e300])], 1)])


def test_mismatched_shapes_are_rejected():
    with pytest.raises(AggregationError, match="shape"):
        average([([np.zeros((2, 2))], 1), ([np.zeros((2, 3))], 1)])


def test_missing_tensor_is_rejected():
    with pytest.raises(AggregationError, match="tensors"):
        weighted_average([({"w": np.zeros(2)}, 1)], tensor_names=["w", "b"])


def test_no_updates_are_rejected():
    with pytest.raises(AggregationError, match="No updates"):
        average([])


def test_apply_update_rejects_overflow_to_infinity():
    with pytest.raises(AggregationError, match="non-finite"):
        apply_update({"w": np.array([3e38], dtype=np.float32)}, {"w": np.array([3e38], dtype=np.float32)})


def test_apply_update_float32_matches_float64_rounding():
    # Random bit patterns span every exponent. The listed pairs add signed
    # zeros, subnormals, cancellation and ties at half a unit in the last place.
    rng = np.random.default_rng(7)
    tiny = np.float32(2**-149)
    one_up = np.nextafter(np.float32(1), np.float32(2))
    pairs = [(0.0, -0.0), (-0.0, -0.0), (tiny, tiny), (-tiny, 2 * tiny), (one_up, -1.0), (1.0, 2**-24), (one_up, 2**-24), (3e38, -3e38)]
    base, delta = (
        np.concatenate([rng.integers(0, 2**32, size=200_000, dtype=np.uint32).view(np.float32), np.array(column, dtype=np.float32)]) for column in zip(*pairs, strict=True)
    )
    with np.errstate(over="ignore", invalid="ignore"):
        reference = (base.astype(np.float64) + delta.astype(np.float64)).astype(np.float32)
    usable = np.isfinite(base) & np.isfinite(delta) & np.isfinite(reference)

    result = apply_update({"w": base[usable]}, {"w": delta[usable]})

    np.testing.assert_array_equal(result["w"].view(np.uint32), reference[usable].view(np.uint32))


def test_apply_update_rounds_float64_delta_once():
    # 1 + 2**-24 + 2**-50 lies above the midpoint 1 + 2**-24, so it rounds up to the next float32.
    # Rounding the delta to float32 first would give 1 + 2**-24, which rounds to even, 1.0.
    result = apply_update({"w": np.array([1.0], dtype=np.float32)}, {"w": np.array([2.0**-24 + 2.0**-50])})

    np.testing.assert_array_equal(result["w"], [np.nextafter(np.float32(1), np.float32(2))])


def test_apply_update_adds_delta():
    result = apply_update({"w": np.array([1.0, 2.0], dtype=np.float32)}, {"w": np.array([0.5, -1.0], dtype=np.float32)})

    np.testing.assert_array_equal(result["w"], [1.5, 1.0])


def test_weighted_average_does_not_mutate_inputs():
    values = np.array([1.0, 2.0], dtype=np.float32)

    average([([values], 3), ([np.array([5.0, 5.0], dtype=np.float32)], 1)])

    np.testing.assert_array_equal(values, [1.0, 2.0])


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3), st.integers(1, 10**9)),
        min_size=1,
        max_size=8,
    ),
    st.randoms(use_true_random=False),
)
def test_weighted_average_is_permutation_invariant(pairs, random):
    arrays = [([np.array(values, dtype=np.float32)], count) for values, count in pairs]
    shuffled = list(arrays)
    random.shuffle(shuffled)

    np.testing.assert_allclose(average(arrays)["w"], average(shuffled)["w"], rtol=1e-6, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=5), st.lists(st.integers(1, 10**9), min_size=1, max_size=6))
def test_equal_updates_are_a_fixed_point(values, counts):
    update = np.array(values, dtype=np.float32)

    result = average([([update], count) for count in counts])

    np.testing.assert_array_equal(result["w"], update)
