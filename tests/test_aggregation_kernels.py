"""Column-block aggregation kernels against plain numpy references (no database)."""

import math
import tracemalloc

import numpy as np
import pytest

from federation.aggregation import kernels
from federation.aggregation.fedavg import weighted_average
from federation.aggregation.kernels import (
    CENTRE_SAMPLE_COLUMNS,
    FLOAT32_NORM_RELATIVE_ERROR,
    FLOAT32_NORM_TERMS,
    RowStack,
    add_scaled_inplace,
    all_finite,
    find_non_finite_rows,
    float32_squared_distances_to,
    narrow_to_float32_in_place,
    pairwise_squared_distances,
    row_squared_norms,
    squared_distances_to,
    squared_norm,
    weighted_sum,
)
from federation.aggregation.order_statistics import (
    SORTING_NETWORK_MAX_ROWS,
    closest_to_median_mean,
    coordinate_median,
    sorting_network,
    trimmed_mean,
)

# Block widths that divide the 37 columns below unevenly, once, or not at all.
BLOCK_COLUMNS = [1, 5, 16, 37, 64, None]
NUM_ROWS = [1, 2, 3, 10, 33]
NUM_COLUMNS = 37


def make_stack(num_rows, *, seed=0, dtype=np.float64, num_columns=NUM_COLUMNS):
    return np.random.default_rng(seed).normal(size=(num_rows, num_columns)).astype(dtype)


def reference_distances(stack):
    values = stack.astype(np.float64)
    return ((values[:, None, :] - values[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("num_rows", NUM_ROWS)
@pytest.mark.parametrize("block_columns", BLOCK_COLUMNS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_equals_numpy_median(num_rows, block_columns, dtype):
    stack = make_stack(num_rows, dtype=dtype)

    median = coordinate_median(stack, block_columns=block_columns)

    assert median.dtype == np.float64
    np.testing.assert_array_equal(median, np.median(stack.astype(np.float64), axis=0))


def test_median_of_tied_values():
    stack = np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 2.0], [1.0, 5.0]])

    np.testing.assert_array_equal(coordinate_median(stack, block_columns=1), [1.0, 2.0])


def reference_trimmed_mean(stack, num_trimmed):
    values = stack.astype(np.float64)
    num_rows = values.shape[0]
    order = np.argsort(values, axis=0, kind="stable")[num_trimmed : num_rows - num_trimmed]
    is_kept = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(is_kept, order, True, axis=0)
    return np.take_along_axis(values, order, axis=0).mean(axis=0), is_kept.sum(axis=1)


@pytest.mark.parametrize("num_rows", NUM_ROWS)
@pytest.mark.parametrize("block_columns", BLOCK_COLUMNS)
@pytest.mark.parametrize("trim_fraction", [0.0, 0.1, 0.3, 0.49])
def test_trimmed_mean_equals_stable_sort_reference(num_rows, block_columns, trim_fraction):
    stack = make_stack(num_rows, seed=num_rows)
    num_trimmed = int(trim_fraction * num_rows)

    mean, kept_counts = trimmed_mean(stack, num_trimmed=num_trimmed, block_columns=block_columns)

    expected_mean, expected_counts = reference_trimmed_mean(stack, num_trimmed)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(kept_counts, expected_counts)


@pytest.mark.parametrize("block_columns", [1, 3, None])
def test_trimmed_mean_keeps_lower_rows_on_ties(block_columns):
    # Small integers tie often, so most columns go through the stable-sort path.
    stack = np.random.default_rng(1).integers(0, 3, size=(9, 20)).astype(np.float32)

    mean, kept_counts = trimmed_mean(stack, num_trimmed=2, block_columns=block_columns)

    expected_mean, expected_counts = reference_trimmed_mean(stack, 2)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-15)
    np.testing.assert_array_equal(kept_counts, expected_counts)


@pytest.mark.parametrize("num_rows", [1, 2, 31, 32, 33, 70])
@pytest.mark.parametrize("block_columns", [1, 5, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_sum_equals_float64_product(num_rows, block_columns, dtype):
    stack = make_stack(num_rows, dtype=dtype)
    weights = np.random.default_rng(2).random(num_rows)

    total = weighted_sum(stack, weights, block_columns=block_columns)

    expected = weights.astype(dtype).astype(np.float64) @ stack.astype(np.float64)
    np.testing.assert_allclose(total, expected, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6 if dtype == np.float32 else 1e-13)


def test_weighted_sum_reads_only_given_rows():
    stack = make_stack(5)
    stack[1] = np.nan

    total = weighted_sum(stack, np.array([0.5, 0.25]), rows=np.array([0, 3]), block_columns=4)

    np.testing.assert_allclose(total, 0.5 * stack[0] + 0.25 * stack[3], rtol=1e-14)


@pytest.mark.parametrize("rows", [[0, 1, 2, 5, 6, 9], list(range(3, 70)), [69, 0, 1, 40]], ids=["runs and gaps", "run over two chunks", "unordered"])
def test_weighted_sum_of_selected_rows_equals_float64_reference(rows):
    stack = make_stack(70, dtype=np.float32)
    weights = np.linspace(0.1, 1.0, len(rows))

    total = weighted_sum(stack, weights, rows=np.array(rows), block_columns=16)

    expected = weights.astype(np.float32).astype(np.float64) @ stack[rows].astype(np.float64)
    np.testing.assert_allclose(total, expected, rtol=1e-6, atol=1e-6)


def test_weighted_sum_propagates_non_finite():
    stack = make_stack(40, dtype=np.float32)
    stack[35, 3] = np.inf

    total = weighted_sum(stack, np.full(40, 1 / 40))

    assert not np.isfinite(total[3])
    assert np.all(np.isfinite(np.delete(total, 3)))


def test_non_finite_rows_found_despite_overflowing_sums():
    stack = np.ones((4, 6), dtype=np.float32)
    stack[0] = 3e38
    stack[2, 5] = np.nan
    stack[3, 0] = -np.inf

    np.testing.assert_array_equal(find_non_finite_rows(stack), [2, 3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_squared_distances_to_centre(dtype):
    stack = make_stack(6, dtype=dtype)
    centre = np.linspace(-1, 1, NUM_COLUMNS)

    distances = squared_distances_to(stack, centre, block_columns=7)

    expected = ((stack.astype(np.float64) - centre) ** 2).sum(axis=1)
    np.testing.assert_allclose(distances, expected, rtol=1e-13)


def test_squared_norm_is_float64_over_blocks():
    values = np.full((3, 5), 0.1, dtype=np.float32)

    assert squared_norm(values, block_size=4) == pytest.approx(15 * float(np.float32(0.1)) ** 2, rel=1e-15)


def exact_squared_norms(stack):
    # A float32 square is exact in float64 (48 significant bits), and fsum adds exactly.
    return np.array([math.fsum(value * value for value in row.astype(np.float64)) for row in stack])


@pytest.mark.parametrize("num_columns", [FLOAT32_NORM_TERMS, 1000, 3 * FLOAT32_NORM_TERMS + 7])
def test_row_squared_norms_float32_within_stated_bound(num_columns):
    stack = np.random.default_rng(num_columns).normal(scale=30.0, size=(5, num_columns)).astype(np.float32)

    squared_norms, relative_error = row_squared_norms(stack)

    assert relative_error == FLOAT32_NORM_RELATIVE_ERROR
    assert np.all(np.abs(squared_norms - exact_squared_norms(stack)) <= relative_error * exact_squared_norms(stack))


def test_row_norms_bound_under_heavy_rounding():
    # Values of 1 + 2**-12 have squares that round in float32, and equal terms make every partial sum round the same way.
    stack = np.full((2, 4 * FLOAT32_NORM_TERMS), 1 + 2.0**-12, dtype=np.float32)
    stack[1, ::2] = np.float32(1e-3)

    squared_norms, relative_error = row_squared_norms(stack)

    exact = exact_squared_norms(stack)
    assert np.all(np.abs(squared_norms - exact) <= relative_error * exact)


@pytest.mark.parametrize("scale", [1e-22, 1e-30, 1e-40])
def test_row_squared_norms_bound_holds_where_squares_underflow(scale):
    # float32 squares of these values are subnormal or zero; such rows are summed from float64.
    stack = (scale * np.random.default_rng(2).normal(size=(3, 4 * FLOAT32_NORM_TERMS))).astype(np.float32)

    squared_norms, relative_error = row_squared_norms(stack)

    exact = exact_squared_norms(stack)
    assert np.all(np.abs(squared_norms - exact) <= relative_error * exact)


def test_row_norms_of_float64_rows_exact():
    stack = make_stack(4)

    squared_norms, relative_error = row_squared_norms(stack)

    assert relative_error == 0.0
    np.testing.assert_allclose(squared_norms, (stack**2).sum(axis=1), rtol=1e-14)


def test_row_norms_of_short_rows_use_float64():
    stack = make_stack(3, dtype=np.float32, num_columns=FLOAT32_NORM_TERMS - 1)

    _, relative_error = row_squared_norms(stack)

    assert relative_error == 0.0


def test_row_norms_recompute_overflowing_squares():
    stack = np.ones((2, 2 * FLOAT32_NORM_TERMS), dtype=np.float32)
    stack[1, 3] = 3e20

    squared_norms, _ = row_squared_norms(stack)

    assert squared_norms[1] == pytest.approx(float(np.float32(3e20)) ** 2, rel=1e-12)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_row_norms_flag_non_finite_rows(bad_value):
    stack = np.ones((3, 2 * FLOAT32_NORM_TERMS), dtype=np.float32)
    stack[1, 300] = bad_value

    squared_norms, _ = row_squared_norms(stack)

    np.testing.assert_array_equal(np.isfinite(squared_norms), [True, False, True])


@pytest.mark.parametrize("as_rows", [False, True])
@pytest.mark.parametrize("num_columns", [10, 1000, 5 * FLOAT32_NORM_TERMS + 3])
def test_float32_squared_distances_within_stated_bound(num_columns, as_rows):
    rng = np.random.default_rng(num_columns)
    centre = rng.normal(size=num_columns).astype(np.float32)
    # Rows near the centre, where differences are small next to the values.
    stack = (centre + rng.normal(scale=1e-3, size=(6, num_columns))).astype(np.float32)

    squared, relative_error = float32_squared_distances_to(kernels.RowStack(list(stack)) if as_rows else stack, centre)

    exact = exact_squared_norms(stack.astype(np.float64) - centre.astype(np.float64))
    assert np.all(np.abs(squared - exact) <= relative_error * exact)


def test_float32_squared_distances_of_rows_read_in_runs(monkeypatch):
    # Runs of 512 columns over rows of 2,000 leave a shorter last run.
    monkeypatch.setattr(kernels, "ROW_RUN_COLUMNS", 2 * FLOAT32_NORM_TERMS)
    rng = np.random.default_rng(3)
    centre = rng.normal(size=2000).astype(np.float32)
    stack = (centre + rng.normal(scale=1e-2, size=(4, 2000))).astype(np.float32)

    squared, relative_error = float32_squared_distances_to(kernels.RowStack(list(stack)), centre)

    exact = exact_squared_norms(stack.astype(np.float64) - centre.astype(np.float64))
    assert np.all(np.abs(squared - exact) <= relative_error * exact)


@pytest.mark.parametrize("as_rows", [False, True])
def test_float32_squared_distances_survive_overflowing_differences(as_rows):
    # 3e38 - (-3e38) passes float32's range, while the squared distance fits float64.
    stack = np.array([[3e38, 1.0], [0.0, 1.0]], dtype=np.float32)
    centre = np.array([-3e38, 0.0], dtype=np.float32)

    squared, _ = float32_squared_distances_to(kernels.RowStack(list(stack)) if as_rows else stack, centre)

    value = float(np.float32(3e38))
    np.testing.assert_allclose(squared, [(2 * value) ** 2 + 1.0, value**2 + 1.0], rtol=1e-6)


def test_float32_squared_distances_of_float64_stack_are_float64():
    stack = make_stack(3)
    centre = np.linspace(-1, 1, NUM_COLUMNS).astype(np.float32)

    squared, relative_error = float32_squared_distances_to(stack, centre)

    assert relative_error == 0.0
    np.testing.assert_allclose(squared, ((stack - centre.astype(np.float64)) ** 2).sum(axis=1), rtol=1e-13)


def test_add_scaled_inplace_accumulates_in_float64():
    total = np.zeros(10)
    values = np.full(10, 1e-3, dtype=np.float32)

    add_scaled_inplace(total, values, 3.0, block_size=3)
    add_scaled_inplace(total, values, 1.0, block_size=3)

    np.testing.assert_allclose(total, np.full(10, 4.0 * float(np.float32(1e-3))), rtol=1e-15)


@pytest.mark.parametrize("num_rows", [1, 2, 3, 12])
@pytest.mark.parametrize("block_columns", [1, 5, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pairwise_distances_equal_direct_differences(num_rows, block_columns, dtype):
    stack = make_stack(num_rows, dtype=dtype)

    distances = pairwise_squared_distances(stack, block_columns=block_columns)

    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(distances, reference_distances(stack), rtol=tolerance, atol=tolerance)


def test_pairwise_distances_survive_large_offset_in_float32():
    rng = np.random.default_rng(3)
    stack = (10000.0 + 0.01 * rng.normal(size=(8, 1000))).astype(np.float32)

    distances = pairwise_squared_distances(stack, block_columns=100)

    np.testing.assert_allclose(distances, reference_distances(stack), rtol=1e-4)


def test_pairwise_distances_recentre_away_from_far_update():
    # The centre is picked on every second column, where row 0 sits on the
    # median; its other columns are far away. The first Gram matrix then
    # shows a more central row, and the second pass keeps the cluster's precision.
    rng = np.random.default_rng(4)
    stack = 0.01 * rng.normal(size=(7, 2 * CENTRE_SAMPLE_COLUMNS))
    stack[0, ::2] = np.median(stack[1:, ::2], axis=0)
    stack[0, 1::2] = 1e6

    distances = pairwise_squared_distances(stack)

    np.testing.assert_allclose(distances[1:, 1:], reference_distances(stack[1:]), rtol=1e-9, atol=1e-12)


def spy_on_gram_centres(monkeypatch):
    centres = []
    original = kernels._centred_gram
    monkeypatch.setattr(kernels, "_centred_gram", lambda *args, **kwargs: centres.append(kwargs["centre_row"]) or original(*args, **kwargs))
    return centres


@pytest.mark.parametrize("seed", range(6))
def test_pairwise_origin_centre_single_pass(monkeypatch, seed):
    # Independent noise puts every update at about the same distance from the others and from the origin.
    stack = np.random.default_rng(seed).normal(size=(30, 2000)).astype(np.float32)
    centres = spy_on_gram_centres(monkeypatch)

    distances = pairwise_squared_distances(stack)

    assert centres == [None]
    np.testing.assert_allclose(distances, reference_distances(stack), rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_pairwise_row_centre_single_pass(monkeypatch, seed):
    # Far from the origin, the updates are centred on one of them, so their differences keep their precision.
    stack = (100.0 + 0.01 * np.random.default_rng(seed).normal(size=(30, 2000))).astype(np.float32)
    centres = spy_on_gram_centres(monkeypatch)

    distances = pairwise_squared_distances(stack)

    assert len(centres) == 1
    assert centres[0] is not None
    np.testing.assert_allclose(distances, reference_distances(stack), rtol=1e-3)


def test_pairwise_distances_sample_stays_small_for_many_rows():
    num_rows = 400
    stack = np.random.default_rng(9).normal(size=(num_rows, 2 * CENTRE_SAMPLE_COLUMNS)).astype(np.float32)

    tracemalloc.start()
    pairwise_squared_distances(stack)
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # A few (n, n) float64 matrices and a 4 MiB sample with its temporaries fit the bound.
    # A sample of every row at CENTRE_SAMPLE_COLUMNS columns alone takes 12.5 MiB per copy.
    assert peak_bytes < 8 * num_rows**2 * 8 + 3 * 4 * 2**20


def test_pairwise_distances_handle_float32_overflow():
    stack = np.zeros((4, 3), dtype=np.float32)
    stack[3] = 1e30

    distances = pairwise_squared_distances(stack)

    np.testing.assert_allclose(distances[3, :3], [3e60, 3e60, 3e60], rtol=1e-6)


def test_pairwise_distances_mark_non_finite_rows():
    stack = make_stack(4)
    stack[2, 0] = np.nan

    distances = pairwise_squared_distances(stack)

    assert np.all(np.isinf(distances[2])) and np.all(np.isinf(distances[:, 2]))
    np.testing.assert_allclose(distances[np.ix_([0, 1, 3], [0, 1, 3])], reference_distances(stack[[0, 1, 3]]), rtol=1e-12)


@pytest.mark.parametrize("block_columns", [1, 4, None])
def test_closest_to_median_mean_matches_reference(block_columns):
    stack = make_stack(9, seed=5)
    rows = np.array([0, 2, 3, 5, 8])
    values = stack[rows]
    order = np.argsort(np.abs(values - np.median(values, axis=0)), axis=0, kind="stable")[:3]

    mean, counts = closest_to_median_mean(stack, rows=rows, num_closest=3, block_columns=block_columns)

    np.testing.assert_allclose(mean, np.take_along_axis(values, order, axis=0).mean(axis=0), rtol=1e-14)
    np.testing.assert_array_equal(counts, np.bincount(order.ravel(), minlength=5))


def test_pairwise_distances_of_no_columns_are_zero():
    np.testing.assert_array_equal(pairwise_squared_distances(np.zeros((4, 0), dtype=np.float32)), np.zeros((4, 4)))


def reference_closest_to_median(values, num_closest):
    """Mean of each column's num_closest values nearest its median, ties to the lower row, and how often each row entered it."""
    values = values.astype(np.float64)
    order = np.argsort(np.abs(values - np.median(values, axis=0)), axis=0, kind="stable")[:num_closest]
    return np.take_along_axis(values, order, axis=0).mean(axis=0), np.bincount(order.ravel(), minlength=values.shape[0])


def tied_stack(num_rows, *, seed, dtype):
    """Values on a grid of halves, so medians, distances and window ends often tie, next to columns of continuous values."""
    rng = np.random.default_rng(seed)
    stack = rng.normal(size=(num_rows, 600))
    stack[:, :400] = np.round(stack[:, :400] * 4) / 2
    return stack.astype(dtype)


# (rows, selected rows, num_closest): the sorting network (up to 24 rows) and
# the transposed sort, windows of more than half the rows and of at most half.
CLOSEST_CASES = [(7, 5, 3), (11, 7, 3), (12, 8, 4), (9, 9, 9), (9, 9, 1), (30, 26, 18), (30, 30, 15), (40, 31, 2)]


@pytest.mark.parametrize(("num_rows", "num_selected", "num_closest"), CLOSEST_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("as_rows", [False, True])
def test_closest_to_median_mean_matches_reference_with_ties(num_rows, num_selected, num_closest, dtype, as_rows):
    stack = tied_stack(num_rows, seed=num_rows * num_closest, dtype=dtype)
    rows = np.sort(np.random.default_rng(num_selected).choice(num_rows, size=num_selected, replace=False))
    expected_mean, expected_counts = reference_closest_to_median(stack[rows], num_closest)

    mean, counts = closest_to_median_mean(RowStack(list(stack)) if as_rows else stack, rows=rows, num_closest=num_closest, block_columns=97)

    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(counts, expected_counts)


def test_closest_to_median_tie_takes_lower_row():
    # The median is 2; 1 and 3 are equally far, and the row holding 3 comes first.
    stack = np.array([[3.0], [1.0], [2.0]])

    mean, counts = closest_to_median_mean(stack, rows=np.arange(3), num_closest=2)

    np.testing.assert_array_equal(mean, [2.5])
    np.testing.assert_array_equal(counts, [1, 0, 1])


def test_closest_to_median_mean_rejects_empty_window():
    with pytest.raises(ValueError, match="num_closest"):
        closest_to_median_mean(make_stack(5), rows=np.arange(5), num_closest=0)


@pytest.mark.parametrize("num_inputs", range(1, 17))
def test_sorting_network_sorts_every_zero_one_input(num_inputs):
    # By the 0-1 principle a comparator network that sorts all 2**n inputs of zeros and ones sorts every input.
    codes = np.arange(2**num_inputs)
    values = ((codes[None, :] >> np.arange(num_inputs)[:, None]) & 1).astype(np.float32)

    for low, high in sorting_network(num_inputs):
        values[low], values[high] = np.minimum(values[low], values[high]), np.maximum(values[low], values[high])

    assert np.all(np.diff(values, axis=0) >= 0)


@pytest.mark.parametrize("num_inputs", range(17, SORTING_NETWORK_MAX_ROWS + 1))
def test_sorting_network_sorts_random_inputs(num_inputs):
    values = np.random.default_rng(num_inputs).integers(0, 5, size=(num_inputs, 5000)).astype(np.float64)
    expected = np.sort(values, axis=0)

    for low, high in sorting_network(num_inputs):
        values[low], values[high] = np.minimum(values[low], values[high]), np.maximum(values[low], values[high])

    np.testing.assert_array_equal(values, expected)


def test_sorting_network_compares_low_before_high():
    assert all(low < high for num_inputs in range(1, 25) for low, high in sorting_network(num_inputs))


# Both sides of the switch from the sorting network to the transposed np.sort.
@pytest.mark.parametrize("num_rows", [SORTING_NETWORK_MAX_ROWS - 1, SORTING_NETWORK_MAX_ROWS, SORTING_NETWORK_MAX_ROWS + 1, SORTING_NETWORK_MAX_ROWS + 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_equals_numpy_median_around_network_limit(num_rows, dtype):
    stack = make_stack(num_rows, dtype=dtype, num_columns=301)

    median = coordinate_median(stack, block_columns=64)

    np.testing.assert_array_equal(median, np.median(stack.astype(np.float64), axis=0))


@pytest.mark.parametrize("num_rows", [SORTING_NETWORK_MAX_ROWS, SORTING_NETWORK_MAX_ROWS + 1])
@pytest.mark.parametrize("num_trimmed", [0, 1, 5])
def test_trimmed_mean_equals_reference_around_network_limit(num_rows, num_trimmed):
    stack = make_stack(num_rows, seed=7, dtype=np.float32, num_columns=301)

    mean, kept_counts = trimmed_mean(stack, num_trimmed=num_trimmed, block_columns=64)

    expected_mean, expected_counts = reference_trimmed_mean(stack, num_trimmed)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-13)
    np.testing.assert_array_equal(kept_counts, expected_counts)


@pytest.mark.parametrize("num_rows", [9, 30, 31])
def test_trimmed_mean_ties_follow_stable_sort(num_rows):
    # Three distinct values among up to 31 rows put ties at both cuts of almost every column.
    stack = np.random.default_rng(num_rows).integers(0, 3, size=(num_rows, 50)).astype(np.float32)

    mean, kept_counts = trimmed_mean(stack, num_trimmed=num_rows // 4, block_columns=16)

    expected_mean, expected_counts = reference_trimmed_mean(stack, num_rows // 4)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-15)
    np.testing.assert_array_equal(kept_counts, expected_counts)


def test_trimmed_mean_sums_float32_in_float64():
    # The float32 sum of 24 values of 3e38 overflows; the float64 sum does not.
    stack = np.full((30, 4), 3e38, dtype=np.float32)

    mean, _ = trimmed_mean(stack, num_trimmed=3)

    np.testing.assert_allclose(mean, np.full(4, 3e38), rtol=1e-7)


def test_even_median_adds_in_float64():
    # In float32, 3e38 + 3e38 overflows; the float64 mean of the two middle values does not.
    stack = np.full((26, 3), 3e38, dtype=np.float32)

    median = coordinate_median(stack)

    assert np.all(np.isfinite(median))


@pytest.mark.parametrize("size", [1, 2, 7, 64, 1001])
@pytest.mark.parametrize("block_size", [1, 3, 16, 1 << 15])
def test_narrow_in_place_equals_astype(size, block_size):
    rng = np.random.default_rng(size * 31 + block_size)
    values = rng.normal(scale=1e3, size=size)
    values[::5] = 1e300  # too large for float32: inf, as astype gives
    with np.errstate(over="ignore"):
        expected = values.astype(np.float32)

    narrowed = narrow_to_float32_in_place(values.copy(), block_size=block_size)

    np.testing.assert_array_equal(narrowed, expected)
    assert narrowed.dtype == np.float32


def test_narrow_in_place_keeps_shape_and_buffer():
    values = np.arange(12, dtype=np.float64).reshape(3, 4)

    narrowed = narrow_to_float32_in_place(values, block_size=5)

    assert narrowed.shape == (3, 4)
    assert np.shares_memory(narrowed, values)
    np.testing.assert_array_equal(narrowed, np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.mark.parametrize("values", [np.zeros(4, dtype=np.float32), np.zeros((4, 4))[:, 1]], ids=["float32", "strided"])
def test_narrow_in_place_rejects_other_arrays(values):
    with pytest.raises(ValueError, match="C-contiguous float64"):
        narrow_to_float32_in_place(values)


def test_streamed_fedavg_peak_under_three_copies():
    num_params = 1_000_000
    rng = np.random.default_rng(5)
    updates = [({"w": rng.normal(size=num_params).astype(np.float32)}, count) for count in (3, 5, 7)]
    model_copy_bytes = num_params * 4

    tracemalloc.start()
    weighted_average(iter(updates), tensor_names=["w"])
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # The float64 running sum is two float32 model copies; block buffers add a fraction of one.
    assert peak_bytes < 2.5 * model_copy_bytes


# all_finite


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([3e38, 3e38], dtype=np.float32), True),
        (np.array([1e308, 1e308]), True),
        (np.array([[0.0, np.nan]], dtype=np.float32), False),
        (np.array([1.0, np.inf]), False),
        (np.array([np.inf, -np.inf], dtype=np.float32), False),
        (np.float32(1.5), True),
    ],
    ids=["float32-sum-overflows", "float64-sum-overflows", "nan", "inf", "opposite-infinities", "scalar"],
)
def test_all_finite_checks_values(values, expected):
    assert all_finite(values) is expected
