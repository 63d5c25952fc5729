"""Order-statistic rules and Krum's distances split their columns into spans on several threads and return what one thread returns (no database)."""

import threading

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from federation.aggregation import kernels
from federation.aggregation.kernels import (
    GRAM_GROUPS,
    GRAM_GROUPS_BYTES,
    PARALLEL_MIN_SPANS_PER_THREAD,
    PARALLEL_MIN_VALUES,
    RowStack,
    available_cpus,
    block_width,
    map_column_spans,
    pairwise_squared_distances,
    single_threaded_blas,
)
from federation.aggregation.order_statistics import SORT_BLOCK_BYTES, closest_to_median_mean, coordinate_median, trimmed_mean

# Enough columns for map_column_spans to give 3 threads two blocks each at 20 rows or more.
NUM_COLUMNS = 160_000
# Gram blocks this narrow make GRAM_GROUPS groups of 20 blocks, so 3 threads get two groups each and a group adds several blocks.
GRAM_TEST_BLOCK_COLUMNS = 1000


def make_stack(num_rows: int, *, seed: int = 0, dtype=np.float32) -> np.ndarray:
    width = block_width(num_rows, itemsize=np.dtype(dtype).itemsize, block_bytes=SORT_BLOCK_BYTES)
    assert num_rows * NUM_COLUMNS >= PARALLEL_MIN_VALUES
    assert NUM_COLUMNS >= PARALLEL_MIN_SPANS_PER_THREAD * 3 * width
    rng = np.random.default_rng(seed)
    stack = rng.standard_normal((num_rows, NUM_COLUMNS)).astype(dtype)
    # Ties at the cuts, a NaN and an infinity exercise every path of the sorted blocks.
    stack[:, 100:200] = np.round(stack[:, 100:200])
    stack[3, 7] = np.nan
    stack[5, NUM_COLUMNS - 9] = np.inf
    return stack


def test_spans_cover_each_column_once():
    spans = map_column_spans(lambda span: span, num_rows=4, num_columns=1_000_003, span_multiple=1000, threads=2)

    covered = np.concatenate([np.arange(span.start, span.stop) for span in spans])
    np.testing.assert_array_equal(covered, np.arange(1_000_003))


def test_spans_start_on_span_multiple():
    spans = map_column_spans(lambda span: span, num_rows=4, num_columns=1_000_003, span_multiple=777, threads=3)

    assert all(span.start % 777 == 0 for span in spans)


def test_small_stack_runs_on_caller_thread():
    caller = threading.get_ident()

    idents = map_column_spans(lambda span: threading.get_ident(), num_rows=2, num_columns=1000, span_multiple=64, threads=2)

    assert idents == [caller]


def test_few_blocks_run_on_caller_thread():
    caller = threading.get_ident()

    idents = map_column_spans(lambda span: threading.get_ident(), num_rows=100, num_columns=100_000, span_multiple=30_000, threads=2)

    assert idents == [caller]


def blas_thread_counts() -> set[int]:
    return {info["num_threads"] for info in ThreadpoolController().select(user_api="blas").info()}


def test_concurrent_blas_limits_end_with_last_block():
    original = blas_thread_counts()
    first_inside, second_inside, first_left = threading.Event(), threading.Event(), threading.Event()
    seen_by_second = {}

    def first() -> None:
        with single_threaded_blas():
            first_inside.set()
            second_inside.wait(timeout=10)
        first_left.set()

    def second() -> None:
        first_inside.wait(timeout=10)
        with single_threaded_blas():
            second_inside.set()
            first_left.wait(timeout=10)
            seen_by_second["counts"] = blas_thread_counts()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert seen_by_second["counts"] == {1}
    assert blas_thread_counts() == original


def test_large_stack_runs_on_worker_threads():
    names = map_column_spans(lambda span: threading.current_thread().name, num_rows=100, num_columns=100_000, span_multiple=64, threads=2)

    assert all(name.startswith("flo-aggregation") for name in names)


def test_workers_keep_blas_single_threaded():
    counts = map_column_spans(lambda span: blas_thread_counts(), num_rows=100, num_columns=100_000, span_multiple=64, threads=2)

    assert all(count == {1} for count in counts)


def test_workers_keep_caller_error_state():
    stack = np.zeros((26, NUM_COLUMNS), dtype=np.float32)
    # The two middle values of column 5 are -inf and +inf, whose sum is invalid.
    stack[:13, 5] = -np.inf
    stack[13:, 5] = np.inf

    with np.errstate(invalid="raise"), pytest.raises(FloatingPointError):
        coordinate_median(stack, threads=2)


def test_spans_reject_zero_threads():
    with pytest.raises(ValueError, match="at least 1"):
        map_column_spans(lambda span: span, num_rows=100, num_columns=100_000, span_multiple=64, threads=0)


def test_available_cpus_counts_at_least_one():
    assert available_cpus() >= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_rows", [20, 25, 26])
@pytest.mark.parametrize("as_rows", [False, True])
def test_threaded_median_equals_one_thread(num_rows, as_rows, dtype):
    stack = make_stack(num_rows, dtype=dtype)
    threaded_input = RowStack(list(stack)) if as_rows else stack

    np.testing.assert_array_equal(coordinate_median(threaded_input, threads=3), coordinate_median(stack, threads=1))


@pytest.mark.parametrize(("num_rows", "dtype", "block_columns"), [(30, np.float32, None), (30, np.float32, 333), (20, np.float32, None), (30, np.float64, None)])
@pytest.mark.parametrize("as_rows", [False, True])
def test_threaded_trimmed_mean_equals_one_thread(as_rows, num_rows, dtype, block_columns):
    stack = make_stack(num_rows, dtype=dtype)
    threaded_input = RowStack(list(stack)) if as_rows else stack

    threaded_mean, threaded_counts = trimmed_mean(threaded_input, num_trimmed=4, block_columns=block_columns, threads=3)
    mean, counts = trimmed_mean(stack, num_trimmed=4, block_columns=block_columns, threads=1)

    np.testing.assert_array_equal(threaded_mean, mean)
    np.testing.assert_array_equal(threaded_counts, counts)


def test_threaded_trimmed_counts_sum_to_kept_values():
    stack = np.nan_to_num(make_stack(30), nan=0.0, posinf=0.0)

    _, kept_counts = trimmed_mean(stack, num_trimmed=4, threads=2)

    assert kept_counts.sum() == (30 - 8) * NUM_COLUMNS


def test_threaded_closest_to_median_mean_equals_one_thread():
    stack = np.nan_to_num(make_stack(40), nan=0.0, posinf=0.0)
    rows = np.arange(0, 40, 2)

    threaded_mean, threaded_counts = closest_to_median_mean(RowStack(list(stack)), rows=rows, num_closest=14, threads=2)
    mean, counts = closest_to_median_mean(stack, rows=rows, num_closest=14, threads=1)

    np.testing.assert_array_equal(threaded_mean, mean)
    np.testing.assert_array_equal(threaded_counts, counts)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("as_rows", [False, True])
def test_threaded_pairwise_distances_equal_one_thread(as_rows, dtype):
    # Updates far from the origin make the Gram matrix centre on one of them.
    stack = np.nan_to_num(make_stack(30, dtype=dtype), nan=0.0, posinf=0.0) + dtype(50.0)
    threaded_input = RowStack(list(stack)) if as_rows else stack

    threaded = pairwise_squared_distances(threaded_input, block_columns=GRAM_TEST_BLOCK_COLUMNS, threads=3)

    np.testing.assert_array_equal(threaded, pairwise_squared_distances(stack, block_columns=GRAM_TEST_BLOCK_COLUMNS, threads=1))


def test_threaded_pairwise_distances_non_finite_rows():
    stack = make_stack(30, dtype=np.float64)
    threaded = pairwise_squared_distances(stack, block_columns=GRAM_TEST_BLOCK_COLUMNS, threads=2)

    np.testing.assert_array_equal(threaded, pairwise_squared_distances(stack, block_columns=GRAM_TEST_BLOCK_COLUMNS, threads=1))


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_pairwise_distances_split_gram_among_threads(recorded_spans, threads):
    # Default blocks and a column count that no block width divides.
    pairwise_squared_distances(make_stack(30)[:, :-7], threads=threads)

    assert max(recorded_spans) > 1


def test_gram_groups_shrink_for_many_rows():
    num_rows = 2000

    assert kernels._gram_group_count(num_rows) * num_rows * num_rows * 8 <= GRAM_GROUPS_BYTES


def test_gram_groups_full_for_few_rows():
    assert kernels._gram_group_count(100) == GRAM_GROUPS


def test_row_stack_buffer_per_thread():
    stack = make_stack(25)
    rows = RowStack(list(stack))
    both_gathered = threading.Barrier(2)
    blocks = {}

    def gather(name: str, columns: slice) -> None:
        block = rows[:, columns]
        both_gathered.wait(timeout=10)
        blocks[name] = block.copy()

    threads = [threading.Thread(target=gather, args=("left", slice(0, 500))), threading.Thread(target=gather, args=("right", slice(1000, 1500)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    np.testing.assert_array_equal(blocks["left"], stack[:, 0:500])
    np.testing.assert_array_equal(blocks["right"], stack[:, 1000:1500])
