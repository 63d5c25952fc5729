"""Memory-bound kernels and server-side DP split their work among threads and return what one thread returns (no database)."""

import threading
import tracemalloc

import numpy as np
import pytest

from federation.aggregation import kernels
from federation.aggregation.fedavg import AggregationError
from federation.aggregation.kernels import (
    FLOAT32_NORM_TERMS,
    MEMORY_BOUND_MIN_VALUES,
    PARALLEL_MIN_VALUES,
    WEIGHTED_SUM_COLUMNS,
    RowStack,
    float32_squared_distances_to,
    map_column_spans,
    map_row_spans,
    row_squared_norms,
    weighted_mean_and_distances,
    weighted_sum,
)
from privacy import central_dp
from privacy.central_dp import dp_fedavg_aggregate_stack

# 100 rows make gathered blocks 10,240 columns wide, so 80,000 columns give
# three threads at least two blocks each. The 8e6 values pass
# PARALLEL_MIN_VALUES, and the span_counts fixture lowers the threshold of
# the memory-bound kernels to it, so tests need not build 32 MiB stacks.
NUM_ROWS = 100
NUM_COLUMNS = 80_000
# weighted_sum's own blocks are wider; this width gives three threads two blocks each.
SUM_BLOCK_COLUMNS = 4096


@pytest.fixture
def span_counts(recorded_spans, monkeypatch):
    """recorded_spans, with memory-bound kernels split from PARALLEL_MIN_VALUES values up."""
    monkeypatch.setattr(kernels, "MEMORY_BOUND_MIN_VALUES", PARALLEL_MIN_VALUES)
    return recorded_spans


def make_stack(*, dtype=np.float32, seed=0) -> np.ndarray:
    stack = np.random.default_rng(seed).standard_normal((NUM_ROWS, NUM_COLUMNS)).astype(dtype)
    assert stack.size >= PARALLEL_MIN_VALUES
    return stack


def as_input(stack: np.ndarray, form: str):
    return RowStack([row.copy() for row in stack]) if form == "rows" else stack


def test_row_spans_cover_each_row_once():
    spans = map_row_spans(lambda span: span, num_rows=103, num_columns=PARALLEL_MIN_VALUES, threads=2)

    covered = np.concatenate([np.arange(span.start, span.stop) for span in spans])
    np.testing.assert_array_equal(covered, np.arange(103))


def test_few_rows_stay_on_caller_thread():
    caller = threading.get_ident()

    idents = map_row_spans(lambda span: threading.get_ident(), num_rows=3, num_columns=PARALLEL_MIN_VALUES, threads=2)

    assert idents == [caller]


def test_small_memory_bound_stack_one_span(recorded_spans):
    stack = make_stack()
    assert PARALLEL_MIN_VALUES <= stack.size < MEMORY_BOUND_MIN_VALUES

    row_squared_norms(stack, threads=2)

    assert recorded_spans == [1]


def test_large_row_spans_use_worker_threads():
    names = map_row_spans(lambda span: threading.current_thread().name, num_rows=100, num_columns=100_000, threads=2)

    assert all(name.startswith("flo-aggregation") for name in names)


def test_spans_inside_a_span_run_on_its_thread():
    def inner_threads(span: slice) -> tuple[int, list[int]]:
        inner = map_column_spans(lambda inner_span: threading.get_ident(), num_rows=100, num_columns=100_000, span_multiple=64, threads=2)
        return threading.get_ident(), inner

    results = map_column_spans(inner_threads, num_rows=100, num_columns=100_000, span_multiple=64, threads=2)

    assert all(inner == [outer] for outer, inner in results)


@pytest.mark.parametrize("form", ["array", "rows"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_weighted_sum_equals_one_thread(span_counts, form, dtype):
    stack = make_stack(dtype=dtype)
    weights = np.random.default_rng(1).uniform(0.1, 2.0, size=NUM_ROWS)
    # Rows out of order and with gaps give chunks of one row and of several.
    rows = np.concatenate([np.arange(0, 40), np.arange(60, 45, -1), np.arange(70, 100, 2)])
    threaded_input = as_input(stack, form)

    threaded = weighted_sum(threaded_input, weights[: rows.size], rows=rows, block_columns=SUM_BLOCK_COLUMNS, threads=3)
    one_thread = weighted_sum(threaded_input, weights[: rows.size], rows=rows, block_columns=SUM_BLOCK_COLUMNS, threads=1)

    np.testing.assert_array_equal(threaded, one_thread)
    assert max(span_counts) > 1


def test_weighted_sum_splits_at_its_default_block_width(span_counts):
    stack = np.random.default_rng(5).standard_normal((20, 2 * 2 * WEIGHTED_SUM_COLUMNS + 1000)).astype(np.float32)
    weights = np.full(20, 0.05)

    threaded = weighted_sum(stack, weights, threads=2)

    np.testing.assert_array_equal(threaded, weighted_sum(stack, weights, threads=1))
    assert max(span_counts) > 1


def test_threaded_weighted_sum_matches_float64():
    stack = make_stack()
    weights = np.full(NUM_ROWS, 1.0 / NUM_ROWS)

    threaded = weighted_sum(stack, weights, block_columns=SUM_BLOCK_COLUMNS, threads=2)

    np.testing.assert_allclose(threaded, stack.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["array", "rows"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_row_norms_equal_one_thread(span_counts, form, dtype):
    stack = make_stack(dtype=dtype)
    stack[7, 11] = np.inf

    threaded, threaded_error = row_squared_norms(as_input(stack, form), threads=3)
    one_thread, error = row_squared_norms(stack, threads=1)

    np.testing.assert_array_equal(threaded, one_thread)
    assert threaded_error == error
    assert max(span_counts) > 1


@pytest.mark.parametrize("form", ["array", "rows"])
def test_threaded_distances_equal_one_thread(span_counts, form):
    stack = make_stack()
    centre = stack.mean(axis=0).astype(np.float32)

    threaded, threaded_error = float32_squared_distances_to(as_input(stack, form), centre, threads=3)
    one_thread, error = float32_squared_distances_to(as_input(stack, form), centre, threads=1)

    np.testing.assert_array_equal(threaded, one_thread)
    assert threaded_error == error
    assert max(span_counts) > 1


@pytest.mark.parametrize("centre_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["array", "rows"])
def test_distance_memory_does_not_grow_with_parameters(monkeypatch, form, centre_dtype):
    # ROW_RUN_COLUMNS of one float32 partial (256 columns), so the rows span 64 and 2,048 runs.
    monkeypatch.setattr(kernels, "ROW_RUN_COLUMNS", FLOAT32_NORM_TERMS)
    peaks = []
    for num_runs in (64, 2048):
        stack = np.random.default_rng(6).standard_normal((4, num_runs * FLOAT32_NORM_TERMS)).astype(np.float32)
        centre = stack[0].astype(centre_dtype)
        rows = as_input(stack, form)
        tracemalloc.start()
        float32_squared_distances_to(rows, centre, threads=1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()

    assert peaks[1] < 1.5 * peaks[0]


def test_threaded_distances_match_float64_reference():
    stack = make_stack()
    centre = stack.mean(axis=0).astype(np.float32)

    threaded, _ = float32_squared_distances_to(stack, centre, threads=2)

    np.testing.assert_allclose(threaded, ((stack.astype(np.float64) - centre) ** 2).sum(axis=1), rtol=2e-5)


@pytest.mark.parametrize("form", ["array", "rows"])
def test_threaded_mean_and_distances_equal_one_thread(span_counts, form):
    stack = make_stack()
    weights = np.random.default_rng(2).dirichlet(np.ones(NUM_ROWS))

    threaded_total, threaded_distances, threaded_error = weighted_mean_and_distances(as_input(stack, form), weights, threads=3)
    total, distances, error = weighted_mean_and_distances(as_input(stack, form), weights, threads=1)

    np.testing.assert_array_equal(threaded_total, total)
    np.testing.assert_array_equal(threaded_distances, distances)
    assert threaded_error == error
    assert max(span_counts) > 1


def dp_arguments(num_columns: int) -> dict:
    return {"tensor_shapes": {"a": (3, 5), "b": (num_columns - 15,)}, "clip_norm": 1.0, "noise_multiplier": 0.8, "expected_participants": 12.5}


DP_COLUMNS = PARALLEL_MIN_VALUES // 4 + FLOAT32_NORM_TERMS


def dp_stack() -> np.ndarray:
    scales = np.array([[1e-4], [1e-3], [2e-3], [5e-3]])
    return (np.random.default_rng(4).standard_normal((4, DP_COLUMNS)) * scales).astype(np.float32)


@pytest.fixture
def noise_thread(monkeypatch):
    """Send a 4 x 262,400 stack to the branch that draws the noise on its own thread, on any machine."""
    assert dp_stack().size >= PARALLEL_MIN_VALUES
    monkeypatch.setattr(central_dp, "available_cpus", lambda: 2)


def noise_threads_alive() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("flo-dp-noise")]


def test_dp_release_with_noise_thread_equals_release_without(noise_thread, monkeypatch):
    stack, arguments = dp_stack(), dp_arguments(DP_COLUMNS)
    threaded_rng, sequential_rng = np.random.default_rng(9), np.random.default_rng(9)

    threaded = dp_fedavg_aggregate_stack(stack, rng=threaded_rng, **arguments)
    monkeypatch.setattr(central_dp, "PARALLEL_MIN_VALUES", stack.size + 1)
    sequential = dp_fedavg_aggregate_stack(stack, rng=sequential_rng, **arguments)

    np.testing.assert_array_equal(threaded.mean["a"], sequential.mean["a"])
    np.testing.assert_array_equal(threaded.mean["b"], sequential.mean["b"])
    assert threaded_rng.bit_generator.state == sequential_rng.bit_generator.state


def test_dp_release_with_noise_thread_equals_hand_calculation(noise_thread):
    stack = dp_stack()

    result = dp_fedavg_aggregate_stack(stack, rng=np.random.default_rng(9), **dp_arguments(DP_COLUMNS))

    values = stack.astype(np.float64)
    norms = np.sqrt((values**2).sum(axis=1))
    clipped = (values * np.minimum(1.0, 1.0 / norms)[:, None]).sum(axis=0)
    # The draws come tensor by tensor, in the order of tensor_shapes.
    noise_rng = np.random.default_rng(9)
    noise = np.concatenate([noise_rng.normal(0.0, 0.8, size=15), noise_rng.normal(0.0, 0.8, size=DP_COLUMNS - 15)])
    released = np.concatenate([result.mean["a"].reshape(-1), result.mean["b"]])
    np.testing.assert_allclose(released, (clipped + noise) / 12.5, rtol=1e-5, atol=1e-6)


def test_dp_noise_thread_has_ended_when_release_returns(noise_thread):
    dp_fedavg_aggregate_stack(dp_stack(), rng=np.random.default_rng(9), **dp_arguments(DP_COLUMNS))

    assert noise_threads_alive() == []


def test_dp_rejection_ends_noise_thread(noise_thread):
    stack = dp_stack()
    stack[2, 99] = np.nan

    with pytest.raises(AggregationError, match="Update 2 contains NaN"):
        dp_fedavg_aggregate_stack(stack, rng=np.random.default_rng(9), **dp_arguments(DP_COLUMNS))
    assert noise_threads_alive() == []


def test_dp_rejects_noise_scale_that_overflows(noise_thread):
    arguments = {**dp_arguments(DP_COLUMNS), "clip_norm": 1e200, "noise_multiplier": 1e200}

    with pytest.raises(ValueError, match="noise_multiplier \\* clip_norm must be finite"):
        dp_fedavg_aggregate_stack(dp_stack(), rng=np.random.default_rng(9), **arguments)


def test_dp_peak_is_four_model_copies(noise_thread):
    num_columns = 1 << 20
    stack = (np.random.default_rng(7).standard_normal((4, num_columns)) * 1e-3).astype(np.float32)
    tracemalloc.start()
    dp_fedavg_aggregate_stack(stack, tensor_shapes={"w": (num_columns,)}, clip_norm=1.0, noise_multiplier=1.0, expected_participants=4.0, rng=np.random.default_rng(1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    # The float64 sum (2 copies) and the float64 noise being added to it (2).
    assert peak < 4.2 * 4 * num_columns
