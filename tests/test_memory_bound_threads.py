"""Memory-bound kernels and server-side DP split their work among threads and return what one thread returns (no database)."""

import threading

import numpy as np
import pytest

from federation.aggregation import kernels
from federation.aggregation.fedavg import AggregationError
from federation.aggregation.kernels import (
    FLOAT32_NORM_TERMS,
    PARALLEL_MIN_VALUES,
    RowStack,
    float32_squared_distances_to,
    map_column_spans,
    map_row_spans,
    row_squared_norms,
    weighted_mean_and_distances,
    weighted_sum,
)
from privacy.central_dp import dp_fedavg_aggregate_stack

# 100 rows make gathered blocks 10,240 columns wide, so 80,000 columns give
# three threads at least two blocks each; 8e6 values pass PARALLEL_MIN_VALUES.
NUM_ROWS = 100
NUM_COLUMNS = 80_000
# weighted_sum's own blocks are wider; this width gives three threads two blocks each.
SUM_BLOCK_COLUMNS = 4096


@pytest.fixture
def span_counts(monkeypatch):
    """Record how many spans each kernel call was split into, so a test can tell it ran on several threads."""
    counts: list[int] = []
    original = kernels._map_spans

    def counting(*args, **kwargs):
        results = original(*args, **kwargs)
        counts.append(len(results))
        return results

    monkeypatch.setattr(kernels, "_map_spans", counting)
    return counts


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


def test_row_spans_of_large_stack_run_on_worker_threads():
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
    one_thread = weighted_sum(stack, weights[: rows.size], rows=rows, block_columns=SUM_BLOCK_COLUMNS, threads=1)

    np.testing.assert_array_equal(threaded, one_thread)
    assert max(span_counts) > 1


def test_threaded_weighted_sum_of_all_rows_equals_float64_sum():
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
    one_thread, error = float32_squared_distances_to(stack, centre, threads=1)

    np.testing.assert_array_equal(threaded, one_thread)
    assert threaded_error == error
    assert max(span_counts) > 1


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


def test_dp_release_on_large_stack_equals_hand_calculation():
    # Large enough for the noise to be drawn on its own thread.
    num_columns = PARALLEL_MIN_VALUES // 4 + FLOAT32_NORM_TERMS
    stack = (np.random.default_rng(4).standard_normal((4, num_columns)) * np.array([[1e-4], [1e-3], [2e-3], [5e-3]])).astype(np.float32)
    arguments = dp_arguments(num_columns)

    result = dp_fedavg_aggregate_stack(stack, rng=np.random.default_rng(9), **arguments)

    values = stack.astype(np.float64)
    norms = np.sqrt((values**2).sum(axis=1))
    clipped = (values * np.minimum(1.0, 1.0 / norms)[:, None]).sum(axis=0)
    # The draws come tensor by tensor, in the order of tensor_shapes.
    noise_rng = np.random.default_rng(9)
    noise = np.concatenate([noise_rng.normal(0.0, 0.8, size=15), noise_rng.normal(0.0, 0.8, size=num_columns - 15)])
    expected = (clipped + noise) / 12.5
    released = np.concatenate([result.mean["a"].reshape(-1), result.mean["b"]])
    np.testing.assert_allclose(released, expected, rtol=1e-5, atol=1e-6)


def test_dp_release_on_large_stack_names_non_finite_update():
    num_columns = PARALLEL_MIN_VALUES // 4 + FLOAT32_NORM_TERMS
    stack = np.zeros((4, num_columns), dtype=np.float32)
    stack[2, 99] = np.nan

    with pytest.raises(AggregationError, match="Update 2 contains NaN"):
        dp_fedavg_aggregate_stack(stack, rng=np.random.default_rng(9), **dp_arguments(num_columns))
