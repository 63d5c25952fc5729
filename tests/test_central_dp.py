"""User-level DP-FedAvg aggregation and the noise source, against hand calculations and numpy references (no database)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from federation.aggregation.fedavg import AggregationError
from federation.aggregation.kernels import FLOAT32_NORM_RELATIVE_ERROR
from privacy.central_dp import DpAggregate, clip_update, dp_fedavg_aggregate, dp_fedavg_aggregate_stack
from privacy.noise import gaussian_noise, secure_generator

# Clip norm 1, noise multiplier 1, a fixed cohort of 10 clients and updates
# of 5,000 coordinates: the released mean then has noise of standard
# deviation z * C / m = 0.1 in each coordinate.
NUM_COORDINATES = 5000
COHORT_SIZE = 10
EXPECTED_MEAN_STD = 0.1
# The sample standard deviation of n = 5,000 normal draws has a relative
# standard error of about 1 / sqrt(2 n) = 1%, so 5% is 5 standard errors.
STD_RELATIVE_TOLERANCE = 0.05

ZERO_SHAPES = {"w": (NUM_COORDINATES,)}


def zero_updates(count):
    return ({"w": np.zeros(NUM_COORDINATES, dtype=np.float32)} for _ in range(count))


def aggregate_zero_cohort(*, count, client_side_noise, seed=0, noise_multiplier=1.0):
    return dp_fedavg_aggregate(
        zero_updates(count),
        tensor_shapes=ZERO_SHAPES,
        clip_norm=1.0,
        noise_multiplier=noise_multiplier,
        expected_participants=COHORT_SIZE,
        rng=np.random.default_rng(seed),
        client_side_noise=client_side_noise,
    )


def reference_clipped_mean(updates, *, clip_norm, denominator):
    """Clip and average with stacked arrays, independently of the streaming code."""
    names = list(updates[0])
    flat = np.stack([np.concatenate([np.ravel(update[name]).astype(np.float64) for name in names]) for update in updates])
    norms = np.linalg.norm(flat, axis=1)
    scales = np.minimum(1.0, clip_norm / norms)
    mean_flat = (flat * scales[:, None]).sum(axis=0) / denominator
    result = {}
    offset = 0
    for name in names:
        size = np.size(updates[0][name])
        result[name] = mean_flat[offset : offset + size].reshape(np.shape(updates[0][name]))
        offset += size
    return result, norms


# Noise of the released mean.


@pytest.mark.parametrize("client_side_noise", [False, True], ids=["server_side", "client_side"])
def test_zero_updates_release_std_point_one(client_side_noise):
    result = aggregate_zero_cohort(count=COHORT_SIZE, client_side_noise=client_side_noise)

    empirical_std = float(np.std(result.mean["w"].astype(np.float64)))

    assert empirical_std == pytest.approx(EXPECTED_MEAN_STD, rel=STD_RELATIVE_TOLERANCE)


@pytest.mark.parametrize("client_side_noise", [False, True], ids=["server_side", "client_side"])
def test_noise_is_added_once_not_twice(client_side_noise):
    # Noise added by the clients and again by the server would give std 0.1 * sqrt(2) = 0.141.
    result = aggregate_zero_cohort(count=COHORT_SIZE, client_side_noise=client_side_noise, seed=1)

    empirical_std = float(np.std(result.mean["w"].astype(np.float64)))

    assert empirical_std < EXPECTED_MEAN_STD * math.sqrt(2) * (1 - STD_RELATIVE_TOLERANCE)
    assert empirical_std > EXPECTED_MEAN_STD * (1 - STD_RELATIVE_TOLERANCE)


@pytest.mark.parametrize("client_side_noise", [False, True], ids=["server_side", "client_side"])
def test_full_cohort_reports_noise_std_z_c(client_side_noise):
    result = aggregate_zero_cohort(count=COHORT_SIZE, client_side_noise=client_side_noise)

    assert result.noise_std_of_sum == pytest.approx(1.0, rel=1e-12)


def test_zero_noise_gives_exact_clipped_mean():
    updates = [
        {"a": np.array([1.0, 2.0]), "b": np.array([2.0])},  # norm 3, scaled by 1/3
        {"a": np.array([0.3, 0.0]), "b": np.array([0.4])},  # norm 0.5, unchanged
    ]

    result = dp_fedavg_aggregate(
        updates,
        tensor_shapes={"a": (2,), "b": (1,)},
        clip_norm=1.0,
        noise_multiplier=0.0,
        expected_participants=4.0,
        rng=np.random.default_rng(0),
    )

    # a: ([1/3, 2/3] + [0.3, 0]) / 4 and b: (2/3 + 0.4) / 4, divided by m = 4, not by the 2 received.
    np.testing.assert_allclose(result.mean["a"], [(1 / 3 + 0.3) / 4, (2 / 3) / 4], rtol=1e-6)
    np.testing.assert_allclose(result.mean["b"], [(2 / 3 + 0.4) / 4], rtol=1e-6)


def test_client_side_zero_noise_gives_exact_mean():
    updates = [{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 0.5])}]

    result = dp_fedavg_aggregate(
        updates,
        tensor_shapes={"w": (2,)},
        clip_norm=1.0,
        noise_multiplier=0.0,
        expected_participants=2.0,
        rng=np.random.default_rng(0),
        client_side_noise=True,
    )

    # ([0.6, 0.8] + [0, 0.5]) / 2
    np.testing.assert_allclose(result.mean["w"], [0.3, 0.65], rtol=1e-6)


def test_norm_three_update_clips_to_one():
    update = {"a": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[2.0]], dtype=np.float32)}

    clipped, norm = clip_update(update, clip_norm=1.0)

    clipped_norm = math.sqrt(float(np.sum(clipped["a"] ** 2) + np.sum(clipped["b"] ** 2)))
    assert norm == pytest.approx(3.0, rel=1e-12)
    assert clipped_norm == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(clipped["a"], [1 / 3, 2 / 3], rtol=1e-12)
    np.testing.assert_allclose(clipped["b"], [[2 / 3]], rtol=1e-12)


def test_aggregate_reports_clipping_statistics():
    updates = [{"w": np.array([3.0, 0.0])}, {"w": np.array([0.0, 0.5])}, {"w": np.array([0.6, 0.8])}]

    result = dp_fedavg_aggregate(
        updates,
        tensor_shapes={"w": (2,)},
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_participants=3.0,
        rng=np.random.default_rng(0),
    )

    assert isinstance(result, DpAggregate)
    assert result.num_updates == 3
    assert result.num_clipped == 1  # norm 1.0 equals C and is not clipped
    np.testing.assert_allclose(result.norms, [3.0, 0.5, 1.0], rtol=1e-12)
    assert result.norms.dtype == np.float64
    assert result.mean["w"].dtype == np.float32


# An empty Poisson cohort still releases noise.


def test_empty_cohort_releases_noise_only_mean():
    result = aggregate_zero_cohort(count=0, client_side_noise=False, seed=2)

    empirical_std = float(np.std(result.mean["w"].astype(np.float64)))

    assert np.all(np.isfinite(result.mean["w"]))
    assert empirical_std == pytest.approx(EXPECTED_MEAN_STD, rel=STD_RELATIVE_TOLERANCE)
    assert result.num_updates == 0
    assert result.num_clipped == 0
    assert result.norms.shape == (0,)
    assert result.noise_std_of_sum == 1.0


def test_every_call_is_one_noised_release():
    # Poisson sampling of 20 users at q = 0.05 leaves about a third of the
    # cohorts empty. The accountant is charged once per call, so each call
    # must release fresh noise, cohort or not.
    rng = np.random.default_rng(3)
    num_users, sampling_rate, num_calls = 20, 0.05, 60
    num_empty_cohorts = 0
    num_noised_releases = 0
    previous_mean = None

    for _ in range(num_calls):
        cohort_size = int(np.count_nonzero(rng.random(num_users) < sampling_rate))
        num_empty_cohorts += cohort_size == 0
        result = dp_fedavg_aggregate(
            zero_updates(cohort_size),
            tensor_shapes=ZERO_SHAPES,
            clip_norm=1.0,
            noise_multiplier=1.0,
            expected_participants=num_users * sampling_rate,
            rng=rng,
        )
        is_fresh_noise = bool(np.any(result.mean["w"] != 0)) and (previous_mean is None or bool(np.any(result.mean["w"] != previous_mean)))
        num_noised_releases += is_fresh_noise
        previous_mean = result.mean["w"]

    assert num_empty_cohorts > 0
    assert num_noised_releases == num_calls


def test_client_side_empty_cohort_has_no_noise():
    result = aggregate_zero_cohort(count=0, client_side_noise=True)

    assert result.noise_std_of_sum == 0.0
    assert np.all(result.mean["w"] == 0.0)


def test_client_side_short_cohort_reduces_noise():
    result = aggregate_zero_cohort(count=4, client_side_noise=True)

    # 4 of 10 clients report, so the sum carries sqrt(4 / 10) of the intended noise.
    assert result.noise_std_of_sum == pytest.approx(math.sqrt(0.4), rel=1e-12)
    assert float(np.std(result.mean["w"])) == pytest.approx(EXPECTED_MEAN_STD * math.sqrt(0.4), rel=STD_RELATIVE_TOLERANCE)


# Clipping bounds and the streaming sum.

finite_vectors = hnp.arrays(
    dtype=np.float64,
    shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6),
    elements=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
)
clip_norms = st.floats(min_value=1e-3, max_value=1e3)


@settings(max_examples=200, deadline=None)
@given(first=finite_vectors, second=finite_vectors, clip_norm=clip_norms)
def test_clipped_norm_never_exceeds_clip_norm(first, second, clip_norm):
    clipped, _ = clip_update({"first": first, "second": second}, clip_norm=clip_norm)

    clipped_norm = math.sqrt(float(np.sum(clipped["first"] ** 2) + np.sum(clipped["second"] ** 2)))

    assert clipped_norm <= clip_norm + 1e-6


@settings(max_examples=200, deadline=None)
@given(first=finite_vectors, second=finite_vectors, clip_norm=clip_norms)
def test_clipping_preserves_direction(first, second, clip_norm):
    clipped, norm = clip_update({"first": first, "second": second}, clip_norm=clip_norm)

    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0

    np.testing.assert_allclose(clipped["first"], first * scale, rtol=1e-12, atol=0)
    np.testing.assert_allclose(clipped["second"], second * scale, rtol=1e-12, atol=0)


@settings(max_examples=200, deadline=None)
@given(vector=finite_vectors, clip_norm=clip_norms)
def test_updates_within_clip_norm_are_unchanged(vector, clip_norm):
    norm = float(np.linalg.norm(vector))
    small = vector * (0.999 * clip_norm / norm) if norm > clip_norm else vector

    clipped, _ = clip_update({"w": small}, clip_norm=clip_norm)

    np.testing.assert_array_equal(clipped["w"], small)


def test_clip_update_handles_overflowing_squares():
    clipped, norm = clip_update({"w": np.array([3e200, 4e200])}, clip_norm=1.0)

    assert norm == pytest.approx(5e200, rel=1e-12)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-12)


def test_streaming_aggregate_matches_stacked_reference():
    rng = np.random.default_rng(4)
    updates = [{"w": rng.normal(0, 1.0, size=(3, 4)), "b": rng.normal(0, 0.3, size=(4,))} for _ in range(25)]

    result = dp_fedavg_aggregate(
        iter(updates),
        tensor_shapes={"w": (3, 4), "b": (4,)},
        clip_norm=2.0,
        noise_multiplier=0.0,
        expected_participants=30.0,
        rng=rng,
    )
    expected_mean, expected_norms = reference_clipped_mean(updates, clip_norm=2.0, denominator=30.0)

    np.testing.assert_allclose(result.mean["w"], expected_mean["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.mean["b"], expected_mean["b"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.norms, expected_norms, rtol=1e-12)
    assert result.num_clipped == int(np.count_nonzero(expected_norms > 2.0))


def test_noised_aggregate_matches_reference_noise_draws():
    # The server draws N(0, (z C)^2) for each tensor in tensor_shapes order after the sum.
    updates = [{"w": np.array([0.5, -0.5]), "b": np.array([1.0])}]
    reference_rng = np.random.default_rng(5)
    expected_w = (np.array([0.5, -0.5]) + reference_rng.normal(0.0, 1.5 * 2.0, size=(2,))) / 8.0
    expected_b = (np.array([1.0]) + reference_rng.normal(0.0, 1.5 * 2.0, size=(1,))) / 8.0

    result = dp_fedavg_aggregate(
        updates,
        tensor_shapes={"w": (2,), "b": (1,)},
        clip_norm=2.0,
        noise_multiplier=1.5,
        expected_participants=8.0,
        rng=np.random.default_rng(5),
    )

    np.testing.assert_allclose(result.mean["w"], expected_w, rtol=1e-6)
    np.testing.assert_allclose(result.mean["b"], expected_b, rtol=1e-6)


def test_inputs_are_not_mutated():
    updates = [{"w": np.array([3.0, 4.0], dtype=np.float32)}, {"w": np.array([0.1, 0.2], dtype=np.float32)}]
    originals = [{"w": update["w"].copy()} for update in updates]

    dp_fedavg_aggregate(
        updates,
        tensor_shapes={"w": (2,)},
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_participants=2.0,
        rng=np.random.default_rng(6),
        client_side_noise=True,
    )
    clip_update(updates[0], clip_norm=1.0)

    for update, original in zip(updates, originals, strict=True):
        np.testing.assert_array_equal(update["w"], original["w"])


def test_clip_update_returns_new_arrays_for_small_updates():
    update = {"w": np.array([0.1, 0.2])}

    clipped, _ = clip_update(update, clip_norm=1.0)
    clipped["w"][0] = 99.0

    assert update["w"][0] == 0.1


# Validation.


def aggregate(updates, **overrides):
    arguments = {
        "tensor_shapes": {"w": (2,)},
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "expected_participants": 2.0,
        "rng": np.random.default_rng(0),
    }
    arguments.update(overrides)
    return dp_fedavg_aggregate(updates, **arguments)


def test_wrong_shape_is_rejected():
    with pytest.raises(AggregationError, match=r"Update 1 tensor 'w' has shape \(3,\), expected \(2,\)"):
        aggregate([{"w": np.zeros(2)}, {"w": np.zeros(3)}])


def test_missing_tensor_is_rejected():
    with pytest.raises(AggregationError, match=r"\['b'\] are missing"):
        aggregate([{"w": np.zeros(2)}], tensor_shapes={"w": (2,), "b": (1,)})


def test_unexpected_tensor_is_rejected():
    with pytest.raises(AggregationError, match=r"\['extra'\] are unexpected"):
        aggregate([{"w": np.zeros(2), "extra": np.zeros(1)}])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_rejected(bad_value):
    with pytest.raises(AggregationError, match="NaN or infinite"):
        aggregate([{"w": np.array([0.0, bad_value])}])


def test_non_numeric_update_is_rejected():
    with pytest.raises(AggregationError, match="expected a real floating-point or integer dtype"):
        aggregate([{"w": np.array(["a", "b"])}])


def test_update_that_is_not_a_mapping_is_rejected():
    with pytest.raises(AggregationError, match="expected a mapping"):
        aggregate([np.zeros(2)])


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, math.inf, math.nan])
def test_invalid_clip_norm_is_rejected(clip_norm):
    with pytest.raises(ValueError, match="clip_norm must be"):
        aggregate([], clip_norm=clip_norm)


@pytest.mark.parametrize("noise_multiplier", [-0.1, math.inf, math.nan])
def test_invalid_noise_multiplier_is_rejected(noise_multiplier):
    with pytest.raises(ValueError, match="noise_multiplier must be"):
        aggregate([], noise_multiplier=noise_multiplier)


@pytest.mark.parametrize("expected_participants", [0.0, -3.0, math.inf])
def test_invalid_expected_participants_is_rejected(expected_participants):
    with pytest.raises(ValueError, match="expected_participants must be"):
        aggregate([], expected_participants=expected_participants)


@pytest.mark.parametrize("tensor_shapes", [{}, {"w": (-1,)}, {"w": (2.5,)}, {"w": None}])
def test_invalid_tensor_shapes_are_rejected(tensor_shapes):
    with pytest.raises(ValueError, match="tensor_shapes"):
        aggregate([], tensor_shapes=tensor_shapes)


def test_clip_update_rejects_non_finite_values():
    with pytest.raises(ValueError, match="Tensor 'w' contains NaN or infinite values"):
        clip_update({"w": np.array([1.0, np.nan])}, clip_norm=1.0)


def test_mean_overflowing_float32_is_rejected():
    with pytest.raises(AggregationError, match="not finite in float32"):
        aggregate([{"w": np.array([1e300, 0.0])}], clip_norm=1e300, noise_multiplier=0.0, expected_participants=1.0)


# The noise source.


def test_gaussian_noise_has_requested_std_and_dtype():
    noise = gaussian_noise((20000,), std=2.5, rng=np.random.default_rng(7))

    assert noise.dtype == np.float64
    assert float(np.std(noise)) == pytest.approx(2.5, rel=0.03)
    assert abs(float(np.mean(noise))) < 0.1


def test_gaussian_noise_with_zero_std_is_zero():
    noise = gaussian_noise((3, 2), std=0.0, rng=np.random.default_rng(8))

    np.testing.assert_array_equal(noise, np.zeros((3, 2)))


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf, True])
def test_gaussian_noise_rejects_invalid_std(std):
    with pytest.raises(ValueError, match="std must be"):
        gaussian_noise((2,), std=std, rng=np.random.default_rng(0))


def test_secure_generators_are_independent():
    first = secure_generator()
    second = secure_generator()

    assert isinstance(first.bit_generator, np.random.PCG64DXSM)
    assert not np.array_equal(first.integers(0, 2**63, size=4), second.integers(0, 2**63, size=4))


STACK_SHAPES = {"w": (2, 3), "b": (4,)}


def stacked_and_streamed(stack, *, clip_norm=2.0, noise_multiplier=1.0, seed=5):
    kwargs = {"tensor_shapes": STACK_SHAPES, "clip_norm": clip_norm, "noise_multiplier": noise_multiplier, "expected_participants": 4.0}
    streamed_updates = [{"w": row[:6].reshape(2, 3), "b": row[6:]} for row in stack]
    stacked = dp_fedavg_aggregate_stack(stack, rng=np.random.default_rng(seed), **kwargs)
    streamed = dp_fedavg_aggregate(streamed_updates, rng=np.random.default_rng(seed), **kwargs)
    return stacked, streamed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_updates", [1, 2, 5, 40])
def test_stacked_aggregate_matches_streaming(dtype, num_updates):
    stack = np.random.default_rng(num_updates).normal(scale=0.8, size=(num_updates, 10)).astype(dtype)

    stacked, streamed = stacked_and_streamed(stack)

    np.testing.assert_allclose(stacked.mean["w"], streamed.mean["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stacked.mean["b"], streamed.mean["b"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stacked.norms, streamed.norms, rtol=1e-12)
    assert stacked.num_clipped == streamed.num_clipped
    assert stacked.noise_std_of_sum == streamed.noise_std_of_sum


def test_stacked_keeps_norm_equal_to_clip():
    stack = np.zeros((2, 10))
    stack[0, 0] = 2.0
    stack[1, 0] = 6.0

    stacked, _ = stacked_and_streamed(stack, noise_multiplier=0.0)

    assert stacked.num_clipped == 1
    np.testing.assert_allclose(stacked.norms, [2.0, 6.0], rtol=1e-15)
    assert stacked.mean["w"][0, 0] == pytest.approx((2.0 + 2.0) / 4.0, rel=1e-7)


def test_stacked_aggregate_clips_rows_whose_squares_overflow():
    stack = np.zeros((1, 10))
    stack[0, :2] = [3e200, 4e200]

    stacked, _ = stacked_and_streamed(stack, noise_multiplier=0.0)

    assert stacked.norms[0] == pytest.approx(5e200, rel=1e-12)
    np.testing.assert_allclose(stacked.mean["w"][0, :2], [0.6 * 2.0 / 4.0, 0.8 * 2.0 / 4.0], rtol=1e-6)


def test_stacked_float32_norms_within_bound():
    stack = np.random.default_rng(3).normal(scale=0.1, size=(6, 1000)).astype(np.float32)
    shapes = {"w": (1000,)}

    stacked = dp_fedavg_aggregate_stack(stack, tensor_shapes=shapes, clip_norm=2.0, noise_multiplier=0.0, expected_participants=6.0, rng=np.random.default_rng(0))

    expected = np.sqrt((stack.astype(np.float64) ** 2).sum(axis=1))
    np.testing.assert_allclose(stacked.norms, expected, rtol=FLOAT32_NORM_RELATIVE_ERROR / 2)


@pytest.mark.parametrize("norm_over_clip", [1.0, 1.000001, 7.0])
def test_stacked_float32_clipped_row_never_exceeds_clip_norm(norm_over_clip):
    row = np.random.default_rng(4).normal(size=1000)
    row *= norm_over_clip / np.linalg.norm(row)
    stack = row.astype(np.float32)[None, :]

    stacked = dp_fedavg_aggregate_stack(stack, tensor_shapes={"w": (1000,)}, clip_norm=1.0, noise_multiplier=0.0, expected_participants=1.0, rng=np.random.default_rng(0))

    assert np.linalg.norm(stacked.mean["w"].astype(np.float64)) <= 1.0


@pytest.mark.parametrize(("scale", "num_params"), [(1e-22, 1000), (1e-24, 1000), (1.0, 10)])
def test_stacked_clipping_holds_at_any_scale(scale, num_params):
    row = np.random.default_rng(5).normal(size=num_params)
    stack = (3 * scale * row / np.linalg.norm(row)).astype(np.float32)[None, :]

    stacked = dp_fedavg_aggregate_stack(stack, tensor_shapes={"w": (num_params,)}, clip_norm=scale, noise_multiplier=0.0, expected_participants=1.0, rng=np.random.default_rng(0))

    assert np.linalg.norm(stacked.mean["w"].astype(np.float64)) <= scale


def test_stacked_empty_cohort_releases_noise_only():
    stacked, streamed = stacked_and_streamed(np.zeros((0, 10), dtype=np.float32))

    assert stacked.num_updates == 0
    np.testing.assert_allclose(stacked.mean["b"], streamed.mean["b"], rtol=1e-7)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_stacked_aggregate_rejects_non_finite_row(bad_value):
    stack = np.ones((3, 10), dtype=np.float32)
    stack[1, 4] = bad_value

    with pytest.raises(AggregationError, match="Update 1 contains NaN or infinite values"):
        stacked_and_streamed(stack)


@pytest.mark.parametrize("stack", [np.ones((3, 9)), np.ones(10), np.ones((3, 10), dtype=np.int64)])
def test_stacked_aggregate_rejects_wrong_shape_or_dtype(stack):
    with pytest.raises(AggregationError, match=r"Expected float32 or float64 updates of shape \(k, 10\)"):
        dp_fedavg_aggregate_stack(stack, tensor_shapes=STACK_SHAPES, clip_norm=1.0, noise_multiplier=1.0, expected_participants=4.0, rng=np.random.default_rng(0))
