"""Rules and kernels read a RowStack of separate rows as they read the same rows as one array: exactly, or within float32 rounding where weighted sums differ (no database)."""

import tracemalloc

import numpy as np
import pytest

from federation.aggregation import kernels
from federation.aggregation.fedavg import AggregationError
from federation.aggregation.kernels import (
    FLOAT32_NORM_TERMS,
    FLOAT32_TERMS,
    RowStack,
    find_non_finite_rows,
    float32_squared_distances_to,
    pairwise_squared_distances,
    row_squared_norms,
    squared_distances_to,
    weighted_mean_and_distances,
    weighted_sum,
)
from federation.aggregation.order_statistics import SORTING_NETWORK_MAX_ROWS, coordinate_median, trimmed_mean
from federation.aggregation.robust import RuleConfig, aggregate_updates, fedavg_with_distances
from privacy.central_dp import dp_fedavg_aggregate_stack

CONFIGS = [
    RuleConfig(name="fedavg"),
    RuleConfig(name="median"),
    RuleConfig(name="trimmed_mean", trim_fraction=0.2),
    RuleConfig(name="krum", num_byzantine=1),
    RuleConfig(name="multi_krum", num_byzantine=1),
    RuleConfig(name="bulyan", num_byzantine=1),
    RuleConfig(name="norm_bounding"),
    RuleConfig(name="centered_clipping", clipping_radius=0.5),
]
# Both sorting routes: the network below SORTING_NETWORK_MAX_ROWS rows and the transposed sort above it.
NUM_ROWS = [7, SORTING_NETWORK_MAX_ROWS + 6]
# Rules whose result is a weighted sum of float32 rows. A RowStack sums its
# rows one by one and an array by matrix-vector products, so their float32
# roundings differ within the documented bound. The other rules match to
# float64 rounding.
WEIGHTED_SUM_RULES = {"fedavg", "multi_krum", "norm_bounding", "centered_clipping"}


def make_rows(num_rows, *, num_columns=2 * FLOAT32_NORM_TERMS + 37, dtype=np.float32, seed=0):
    array = np.random.default_rng(seed).normal(size=(num_rows, num_columns)).astype(dtype)
    # Rows copied one by one, as separately memory-mapped payloads would be.
    return array, RowStack([row.copy() for row in array])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.name)
@pytest.mark.parametrize("num_rows", NUM_ROWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rule_on_row_stack_equals_rule_on_array(config, num_rows, dtype):
    array, rows = make_rows(num_rows, dtype=dtype)
    counts = list(range(1, num_rows + 1))

    from_rows = aggregate_updates(rows, num_examples=counts, config=config)
    from_array = aggregate_updates(array, num_examples=counts, config=config)

    if dtype == np.float32 and config.name in WEIGHTED_SUM_RULES:
        # FLOAT32_TERMS float32 roundings of the weighted absolute terms on each side; centred clipping sums once per iteration.
        weights = np.array(counts) / sum(counts)
        bound = 2 * config.clipping_iterations * FLOAT32_TERMS * 2.0**-24 * (weights @ np.abs(array.astype(np.float64)))
        assert np.all(np.abs(from_rows.aggregate - from_array.aggregate) <= bound)
    else:
        np.testing.assert_allclose(from_rows.aggregate, from_array.aggregate, rtol=1e-12, atol=1e-15)
    assert from_rows.selected_indices == from_array.selected_indices


@pytest.mark.parametrize("num_rows", NUM_ROWS)
def test_trimmed_counts_on_row_stack_equal_array(num_rows):
    array, rows = make_rows(num_rows)

    _, kept_from_rows = trimmed_mean(rows, num_trimmed=2, block_columns=64)
    _, kept_from_array = trimmed_mean(array, num_trimmed=2, block_columns=64)

    np.testing.assert_array_equal(kept_from_rows, kept_from_array)


@pytest.mark.parametrize("num_rows", NUM_ROWS)
def test_median_on_row_stack_marks_non_finite_column(num_rows):
    array, _ = make_rows(num_rows)
    array[3, 10] = np.inf
    rows = RowStack(list(array))

    median = coordinate_median(rows, block_columns=16)

    assert np.isnan(median[10])
    assert np.all(np.isfinite(np.delete(median, 10)))


def test_row_stack_median_names_bad_row():
    array, _ = make_rows(9)
    array[4, 100] = np.nan

    with pytest.raises(AggregationError, match="Update 4 has non-finite values"):
        aggregate_updates(RowStack(list(array)), num_examples=[1] * 9, config=RuleConfig(name="median"))


def assert_within_float32_bound(total, array, weights):
    """Assert |total - exact| <= FLOAT32_TERMS * 2**-24 * sum_i |w_i x_i|, the weighted_sum bound, per coordinate."""
    terms = weights[:, None] * array.astype(np.float64)
    bound = FLOAT32_TERMS * 2.0**-24 * np.abs(terms).sum(axis=0)
    assert np.all(np.abs(total - terms.sum(axis=0)) <= bound)


def test_kernels_on_row_stack_equal_kernels_on_array():
    array, rows = make_rows(12, dtype=np.float32)
    weights = np.linspace(0.5, 2.0, 12)
    centre = array.mean(axis=0)

    # Float32 BLAS may order its additions by block width, so both sums are held to the documented bound instead of to each other.
    assert_within_float32_bound(weighted_sum(rows, weights, block_columns=50), array, weights)
    assert_within_float32_bound(weighted_sum(array, weights), array, weights)
    assert_within_float32_bound(weighted_sum(rows, weights[:3], rows=np.array([1, 5, 7])), array[[1, 5, 7]], weights[:3])
    np.testing.assert_allclose(squared_distances_to(rows, centre, block_columns=50), squared_distances_to(array, centre), rtol=1e-12)
    np.testing.assert_allclose(row_squared_norms(rows)[0], row_squared_norms(array)[0], rtol=1e-12)
    np.testing.assert_allclose(pairwise_squared_distances(rows), pairwise_squared_distances(array), rtol=1e-9)
    # An array's rows are read as a RowStack's, so the distances are identical.
    np.testing.assert_array_equal(float32_squared_distances_to(rows, centre)[0], float32_squared_distances_to(array, centre)[0])


def test_non_finite_rows_of_row_stack_found():
    array, _ = make_rows(5)
    array[1, 0] = np.nan
    array[3] = 3e38

    np.testing.assert_array_equal(find_non_finite_rows(RowStack(list(array))), [1])


def test_row_stack_reads_blocks_rows_and_index_pairs():
    array, rows = make_rows(6)

    np.testing.assert_array_equal(rows[2], array[2])
    np.testing.assert_array_equal(rows[2, 5:9], array[2, 5:9])
    np.testing.assert_array_equal(rows[1:4, 3:8], array[1:4, 3:8])
    np.testing.assert_array_equal(rows[np.array([0, 5]), 3:8], array[[0, 5], 3:8])
    np.testing.assert_array_equal(rows[np.ix_([4, 1], [7, 2, 9])], array[np.ix_([4, 1], [7, 2, 9])])


def test_row_stack_reuses_block_buffer():
    _, rows = make_rows(4)

    first = rows[:, 0:3]
    second = rows[:, 3:6]

    assert np.shares_memory(first, second)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "at least one row"),
        ([np.zeros((2, 2), dtype=np.float32)], "1-D float32 or float64"),
        ([np.zeros(3, dtype=np.int32)], "1-D float32 or float64"),
        ([np.zeros(3, dtype=np.float32), np.zeros(4, dtype=np.float32)], "Row 1 has shape"),
        ([np.zeros(3, dtype=np.float32), np.zeros(3)], "Row 1 has shape"),
    ],
)
def test_row_stack_rejects_mismatched_rows(rows, message):
    with pytest.raises(ValueError, match=message):
        RowStack(rows)


def test_row_stack_rejects_unsupported_index():
    _, rows = make_rows(3)

    with pytest.raises(TypeError, match="RowStack supports"):
        rows[0, 1, 2]


def test_dp_fedavg_on_row_stack_equals_array():
    array, rows = make_rows(9)
    array *= 0.05
    rows = RowStack(list(array))
    arguments = {"tensor_shapes": {"w": (array.shape[1],)}, "clip_norm": 1.0, "noise_multiplier": 0.7, "expected_participants": 10.0}

    from_rows = dp_fedavg_aggregate_stack(rows, rng=np.random.default_rng(3), **arguments)
    from_array = dp_fedavg_aggregate_stack(array, rng=np.random.default_rng(3), **arguments)

    # The clipped sums round differently (see WEIGHTED_SUM_RULES). Clip scales are at most 1, and the sum is divided by 10.
    bound = 2 * FLOAT32_TERMS * 2.0**-24 * np.abs(array.astype(np.float64)).sum(axis=0) / 10.0
    assert np.all(np.abs(from_rows.mean["w"].astype(np.float64) - from_array.mean["w"]) <= bound + 2.0**-24 * np.abs(from_array.mean["w"]))
    np.testing.assert_array_equal(from_rows.norms, from_array.norms)
    assert from_rows.num_clipped == from_array.num_clipped


@pytest.mark.parametrize("num_rows", [1, 7, 40])
@pytest.mark.parametrize("form", ["array", "rows"])
def test_fedavg_with_distances_equals_fedavg_and_float64_distances(num_rows, form):
    array, rows = make_rows(num_rows, num_columns=3 * FLOAT32_NORM_TERMS + 5)
    stack = rows if form == "rows" else array
    counts = list(range(1, num_rows + 1))

    result, squared = fedavg_with_distances(stack, num_examples=counts)

    expected = aggregate_updates(stack, num_examples=counts, config=RuleConfig(name="fedavg"))
    np.testing.assert_array_equal(result.aggregate, expected.aggregate)
    average = expected.aggregate.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(squared, ((array.astype(np.float64) - average) ** 2).sum(axis=1), rtol=2e-5)


def test_fedavg_with_distances_names_non_finite_update():
    array, _ = make_rows(5)
    array[2, 7] = np.inf

    with pytest.raises(AggregationError, match="Update 2 has non-finite values"):
        fedavg_with_distances(RowStack(list(array)), num_examples=[1] * 5)



def test_row_stack_rejects_boolean_mask():
    _, rows = make_rows(3)

    with pytest.raises(TypeError, match="boolean mask"):
        rows[np.array([True, False, True]), 0:2]


def test_row_stack_sum_within_float32_bound():
    array, rows = make_rows(70)
    # More than FLOAT32_TERMS rows, out of order and one repeated, so the sum takes several float32 partials.
    selected = np.concatenate([np.arange(69, 20, -1), np.arange(0, 20), [33]])
    weights = np.random.default_rng(8).uniform(0.0, 3.0, size=selected.size)

    total = weighted_sum(rows, weights, rows=selected)

    exact = weights @ array[selected].astype(np.float64)
    # FLOAT32_TERMS roundings of a partial sum, one of each product and one of each weight's cast to float32.
    bound = (FLOAT32_TERMS + 2) * 2.0**-24 * (weights @ np.abs(array[selected].astype(np.float64)))
    assert np.all(np.abs(total - exact) <= bound)


@pytest.mark.parametrize("rows", [np.array([True, False, True]), np.array([0.0, 1.0])], ids=["mask", "floats"])
@pytest.mark.parametrize("form", ["array", "rows"])
def test_weighted_sum_rejects_non_integer_rows(rows, form):
    array, row_stack = make_rows(3)

    with pytest.raises(TypeError, match="integer row numbers"):
        weighted_sum(row_stack if form == "rows" else array, np.ones(rows.size), rows=rows)


@pytest.mark.parametrize("form", ["array", "rows"])
def test_weighted_sum_counts_negative_rows_from_end(form):
    array, row_stack = make_rows(5)

    total = weighted_sum(row_stack if form == "rows" else array, np.array([1.0]), rows=np.array([-1]))

    np.testing.assert_array_equal(total, array[4].astype(np.float64))


@pytest.mark.parametrize(
    ("weights", "rows"),
    [(np.ones(4) / 4, None), (np.ones(2) / 2, None), (np.ones(3), np.array([0, 2]))],
    ids=["too-many", "too-few", "more-than-selected-rows"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["array", "rows"])
def test_weighted_sum_rejects_wrong_number_of_weights(form, dtype, weights, rows):
    array, row_stack = make_rows(3, dtype=dtype)

    with pytest.raises(ValueError, match="one per summed row"):
        weighted_sum(row_stack if form == "rows" else array, weights, rows=rows)


@pytest.mark.parametrize("form", ["array", "rows"])
def test_mean_and_distances_reject_wrong_number_of_weights(form):
    array, row_stack = make_rows(3)

    with pytest.raises(ValueError, match="one per summed row"):
        weighted_mean_and_distances(row_stack if form == "rows" else array, np.ones(4) / 4)


@pytest.mark.parametrize("form", ["array", "rows"])
def test_float32_distances_accept_centre_as_list(form):
    array, row_stack = make_rows(4)
    centre = array.mean(axis=0)

    squared, _ = float32_squared_distances_to(row_stack if form == "rows" else array, centre.tolist())

    np.testing.assert_array_equal(squared, float32_squared_distances_to(array, centre.astype(np.float32))[0])


@pytest.mark.parametrize("form", ["array", "rows"])
def test_float32_distances_reject_centre_of_wrong_length(form):
    array, row_stack = make_rows(4)

    with pytest.raises(ValueError, match="centre has shape"):
        float32_squared_distances_to(row_stack if form == "rows" else array, np.zeros(100, dtype=np.float32))


def test_row_stack_distances_in_runs(monkeypatch):
    # Runs of 512 columns over rows of 2,000 leave a shorter last run, and the float64 mean is cast to float32 run by run.
    monkeypatch.setattr(kernels, "ROW_RUN_COLUMNS", 2 * FLOAT32_NORM_TERMS)
    array, rows = make_rows(9, num_columns=2000)
    weights = np.random.default_rng(2).dirichlet(np.ones(9))

    total, squared, relative_error = weighted_mean_and_distances(rows, weights)

    centre = total.astype(np.float32).astype(np.float64)
    exact = ((array.astype(np.float64) - centre) ** 2).sum(axis=1)
    assert np.all(np.abs(squared - exact) <= relative_error * exact)


@pytest.mark.parametrize("form", ["array", "rows"])
def test_distances_non_finite_on_float32_overflow(form):
    # Two float32 partials of 32 and 8 rows stay finite; their float64 sum, 4e38, does not fit float32.
    array = np.full((40, 3 * FLOAT32_NORM_TERMS), 1e37, dtype=np.float32)
    stack = RowStack(list(array)) if form == "rows" else array

    total, squared, _ = weighted_mean_and_distances(stack, np.ones(40))

    assert np.all(np.isfinite(total))
    assert not np.any(np.isfinite(squared))


def padded_rows(array: np.ndarray) -> np.ndarray:
    """Return a copy of `array` whose rows are contiguous but lie 37 values apart beyond their ends, as in the first columns of a wider array."""
    wider = np.full((array.shape[0], array.shape[1] + 37), np.nan, dtype=array.dtype)
    wider[:, : array.shape[1]] = array
    return wider[:, : array.shape[1]]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.name)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rules_on_padded_rows_equal_rules_on_array(config, dtype):
    array, _ = make_rows(SORTING_NETWORK_MAX_ROWS + 6, dtype=dtype)
    counts = list(range(1, array.shape[0] + 1))

    padded = aggregate_updates(padded_rows(array), num_examples=counts, config=config)
    dense = aggregate_updates(array, num_examples=counts, config=config)

    np.testing.assert_allclose(padded.aggregate, dense.aggregate, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(padded.kept_fraction, dense.kept_fraction)


def test_fedavg_with_distances_on_padded_rows_equals_array():
    array, _ = make_rows(9)

    padded, padded_distances = fedavg_with_distances(padded_rows(array), num_examples=[1] * 9)
    dense, dense_distances = fedavg_with_distances(array, num_examples=[1] * 9)

    np.testing.assert_allclose(padded.aggregate, dense.aggregate, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(padded_distances, dense_distances, rtol=1e-5)


def test_dp_stack_on_padded_rows_equals_array():
    array, _ = make_rows(9)
    arguments = {"tensor_shapes": {"w": (array.shape[1],)}, "clip_norm": 1.0, "noise_multiplier": 0.5, "expected_participants": 9.0}

    padded = dp_fedavg_aggregate_stack(padded_rows(array), rng=np.random.default_rng(3), **arguments)
    dense = dp_fedavg_aggregate_stack(array, rng=np.random.default_rng(3), **arguments)

    np.testing.assert_allclose(padded.mean["w"], dense.mean["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(padded.norms, dense.norms, rtol=1e-12)


def test_padded_rows_are_aggregated_without_a_copy():
    # Large enough that a copy of the rows outweighs the median's own buffers.
    array, _ = make_rows(9, num_columns=1_000_000)
    padded = padded_rows(array)

    tracemalloc.start()
    aggregate_updates(padded, num_examples=[1] * 9, config=RuleConfig(name="median"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    assert peak < padded.nbytes / 2
