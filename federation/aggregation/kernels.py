"""Memory-bound kernels over a stack of flattened updates, (n_clients, n_params).

Pure module: numpy and threadpoolctl. The stack is float32 or float64, one
2-D array or a RowStack of separate rows (the server's memory-mapped
payloads), and is never copied whole or modified. Work that needs more than
one pass over a coordinate (casts, centring) runs on column blocks of about
COLUMN_BLOCK_BYTES, or GATHER_BLOCK_BYTES gathered from a RowStack, so it
stays in cache and its extra memory is bounded whatever the number of
parameters. Weighted sums, float32 norms and float32 distances to a centre
read a RowStack row by row, in runs, without gathering. Large stacks are split among threads
(`map_column_spans`, `map_row_spans`) without changing any result. The sorts and selections of the median, trimmed mean and Bulyan
are in `federation.aggregation.order_statistics`.

Precision: float64 stacks are aggregated in float64. A float32 stack is
multiplied in float32, by BLAS for an array and by numpy's ufuncs for a
RowStack, so the two round differently, but no float32 accumulator sums more
than FLOAT32_TERMS terms before the partial result is added to a float64 total, so
the extra relative error is at most about FLOAT32_TERMS * 2**-24 of the sum
of absolute terms, and in practice near the float32 rounding of the inputs.
Norms and distances summed from float32 partials return their error bound.
"""

import contextvars
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from threadpoolctl import OpenBLASController, ThreadpoolController

FloatArray = npt.NDArray[np.floating]
Float64Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.integer]
SpanResult = TypeVar("SpanResult")

# Columns per block are chosen so that one block of the stack fills about
# this many bytes, small enough for a 1 MiB L2 cache and large enough that
# numpy's per-call overhead stays below a few percent.
COLUMN_BLOCK_BYTES = 1 << 20
# Maximum threads of map_column_spans and map_row_spans. On a 2-core AMD
# EPYC (Zen 3) virtual machine with numpy 2.4.6, the median of 100 float32
# rows of 1e6 values took 0.33 s on one thread and 0.17 s on two. The
# trimmed mean took 0.44 s and 0.25 s. Whether memory-bound kernels gain
# depends on the machine. On the AMD machine, a weighted sum with distances
# gathered from 100 rows took 0.10 s on one thread and 0.11 to 0.13 s on
# two. On the 2-core Intel Xeon (family 6, model 207) machine of
# BENCHMARKS.md, one core reads memory at about 9 to 13 GB/s and two at
# about 20. There the weighted sum of 100 float32 rows of 1e6 values took
# 31 to 39 ms on one thread and 20 to 27 ms on two, and their squared norms
# 46 to 60 ms and 24 to 33 ms, so the sums, norms and distances use the
# threads too.
# NOTE: only one and two threads were measured. The cap of 4 is a guess at where more threads stop paying off.
MAX_SPAN_THREADS = 4
# Spans per thread, so a thread that falls behind hands work to the others.
SPANS_PER_THREAD = 4
# Stacks smaller than this many values, or with fewer than
# PARALLEL_MIN_SPANS_PER_THREAD blocks (or rows) per thread, run on the calling
# thread. Starting a pool of two threads and handing it 8 spans took 0.6 to
# 0.7 ms. With 3 spans of 2 MiB blocks, the median of 100 rows of 10,486
# values took 4.3 ms on two threads against 3.3 ms on one.
PARALLEL_MIN_VALUES = 1 << 20
PARALLEL_MIN_SPANS_PER_THREAD = 2
# The same threshold for the memory-bound kernels (sums, norms, distances),
# which do little work per value, so a split pays later than for sorts. On
# the Intel machine of BENCHMARKS.md, FedAvg with distances from a RowStack
# of 100 rows took 7.5 ms on one thread and 10.6 ms on two at 7.6e6 values,
# and 27.1 and 22.7 ms at 15.3e6. Row norms took 2.5 and 2.8 ms at 7.6e6
# values, and 3.2 and 3.8 ms at 15.3e6. Larger stacks gain: the norms of
# 100 rows of 1e6 values took 46 to 60 ms and 24 to 33 ms.
MEMORY_BOUND_MIN_VALUES = 1 << 24
# Columns of one row read at a time where rows are summed one by one, a
# multiple of FLOAT32_NORM_TERMS: 1 MiB of float32.
ROW_RUN_COLUMNS = 1 << 18
# Columns of one run of the weighted sum of a RowStack, whose partial sum
# and product (256 KiB each for float32 rows) stay in L2 while the rows
# stream through.
ROW_SUM_COLUMNS = 1 << 16
# Gram blocks are larger because a matrix product amortises its packing over more columns.
GRAM_BLOCK_BYTES = 4 << 20
# The column blocks of a Gram matrix fall into GRAM_GROUPS groups whose
# (n, n) products are summed separately, so threads can compute column spans
# and the result does not depend on their number. map_column_spans splits
# only where each thread gets at least PARALLEL_MIN_SPANS_PER_THREAD groups,
# so GRAM_GROUPS serves MAX_SPAN_THREADS threads. The group matrices are
# kept until all spans finish, so there are fewer groups where they would
# take more than GRAM_GROUPS_BYTES: 16 groups up to n = 724 rows, 8 up to
# n = 1,024, and one from n = 2,049, whose matrix may take more.
GRAM_GROUPS = 4 * MAX_SPAN_THREADS
GRAM_GROUPS_BYTES = 64 << 20
# Bytes of one column block gathered from the rows of a RowStack: small
# enough to stay in a 32 MiB L3 cache with the kernel's own buffers, large
# enough that the per-row copy calls cost little. With many rows a block
# keeps at least GATHER_MIN_COLUMNS columns, up to GATHER_MAX_BYTES: at
# n = 1,000 rows of 1e5 float32 values, 1,048-column blocks spent most of
# their time in the Python loop over rows.
GATHER_BLOCK_BYTES = 4 << 20
GATHER_MIN_COLUMNS = 4096
GATHER_MAX_BYTES = 16 << 20
# Terms a float32 BLAS accumulator sums before its result moves to float64:
# rows of a weighted sum.
FLOAT32_TERMS = 32
# Columns of one matrix-vector product in weighted_sum. Its float64 block of
# the total (512 KiB) stays in L2 while FLOAT32_TERMS rows stream through.
# With numpy 2.4.6 and OpenBLAS 0.3.31 on a 2-core AMD EPYC (Zen 3)
# virtual machine, 100 rows of 1e6 float32 values took 17.5 ms with 65,536
# columns, 29 ms with 16,384 and 30 ms with 1 MiB blocks of 8,192.
WEIGHTED_SUM_COLUMNS = 1 << 16
# Most columns of a float32 Gram block. Each entry of a block product sums at
# most this many float32 terms, so relative error stays near 1e-6 of the squared norms.
FLOAT32_GRAM_COLUMNS = 16384
# Coordinates sampled to pick the Gram centre, in CENTRE_SAMPLE_RUNS runs of
# contiguous columns, and at most CENTRE_SAMPLE_VALUES values in all, so the
# float64 sample and its temporaries stay near 4 MiB each: at n = 1,000, 4,096
# columns made the call peak at 101 MiB.
CENTRE_SAMPLE_COLUMNS = 4096
CENTRE_SAMPLE_RUNS = 16
CENTRE_SAMPLE_VALUES = 1 << 19
# A second Gram pass around the medoid runs only when the first centre is at
# least this many times farther, in squared distance, from the medoid than
# the medoid's median neighbour. Then ||a - c|| stays within a factor of 2 of
# the cluster's own distances and cancellation costs at most a few more bits.
# Updates of similar spread (i.i.d. noise) have all distances alike, and a
# ratio of 1 recomputed about every other time.
RECENTRE_RATIO = 4.0
# Elements per reused float64 block of squared_norm and add_scaled_inplace:
# 256 KiB, so the block stays in L2. For 100 rows of 1e6 float32 values,
# squared_norm took 50 ms with it against 73 ms with new blocks of 2**17, and
# add_scaled_inplace 90 ms against 102 ms (numpy 2.4.6, a 2-core AMD EPYC Zen 3 virtual machine).
FLOAT64_BLOCK_SIZE = 1 << 15
# Squares one float32 partial sum of row_squared_norms adds before the partial
# moves to float64. For 100 rows of 1e6 float32 values, numpy 2.4.6 took 16 ms
# with 256 (the time of one np.add.reduce pass) against 56 ms for
# squared_norm's float64 blocks, on a 2-core AMD EPYC (Zen 3) virtual machine.
FLOAT32_NORM_TERMS = 256
# Bound on |computed - exact| / exact of a squared norm summed in float32
# partials of FLOAT32_NORM_TERMS squares: each partial of k non-negative terms,
# each square rounded once, is within gamma_(k+1) = (k + 1) u / (1 - (k + 1) u)
# of its exact value for u = 2**-24, whatever the order of the additions, and
# the float64 sum of the partials adds about 1e-16 per partial. Squares of
# values below about 1e-19 underflow, which adds at most 2**-149 per value.
# Rows small enough for that to matter are summed in float64 instead.
FLOAT32_NORM_RELATIVE_ERROR = 1.6e-5

_controller: ThreadpoolController | None = None
# The active limit of single_threaded_blas and the number of blocks inside it.
_blas_limit: Any = None
_blas_limit_users = 0
_blas_limit_lock = threading.Lock()
# Marks the threads of map_column_spans and map_row_spans, whose own calls stay on their thread.
_span_thread = threading.local()


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run BLAS calls in the block on one thread.

    The products here are either memory-bound (matrix-vector) or have a tiny
    (n, n) output and a long inner dimension (Gram blocks), and OpenBLAS 0.3.31
    splits them badly: with numpy 2.4.6 and OpenBLAS 0.3.31 on a shared
    2-core virtual machine, a float32 Gram product of 100 updates
    of 1e6 parameters ran about ten times slower on two threads than on one.
    Setting OPENBLAS_NUM_THREADS=1 before numpy is imported has the same effect
    process-wide.

    The BLAS thread count belongs to the whole process, so nested and
    concurrent blocks share one limit: the first to enter sets it and the
    last to leave, in whatever thread, restores the count from before the
    first. threadpoolctl 3.8 lets only one "controlling" thread change
    OpenBLAS's count and silently ignores the others, so each change here
    takes control for its own call and releases it.
    """
    global _controller, _blas_limit, _blas_limit_users
    with _blas_limit_lock:
        if _controller is None:
            # Inspecting the loaded libraries takes milliseconds, so it runs once per process.
            _controller = ThreadpoolController()
        if _blas_limit_users == 0:
            OpenBLASController.clear_controlling_thread(force=True)
            _blas_limit = _controller.limit(limits=1, user_api="blas")
            OpenBLASController.clear_controlling_thread(force=True)
        _blas_limit_users += 1
    try:
        yield
    finally:
        with _blas_limit_lock:
            _blas_limit_users -= 1
            if _blas_limit_users == 0 and _blas_limit is not None:
                OpenBLASController.clear_controlling_thread(force=True)
                _blas_limit.restore_original_limits()
                OpenBLASController.clear_controlling_thread(force=True)
                _blas_limit = None


def block_width(num_rows: int, *, itemsize: int, block_bytes: int = COLUMN_BLOCK_BYTES, block_columns: int | None = None) -> int:
    """Columns of one block of about `block_bytes` over `num_rows` rows, or `block_columns` when given."""
    return block_columns or max(64, block_bytes // max(1, num_rows * itemsize))


def column_blocks(
    num_rows: int, num_columns: int, *, itemsize: int, block_bytes: int = COLUMN_BLOCK_BYTES, block_columns: int | None = None, first: int = 0
) -> Iterator[slice]:
    """Yield column slices covering range(first, num_columns), each about `block_bytes` over `num_rows` rows.

    `block_columns` overrides the width, for tests that need blocks not dividing the column count.
    """
    width = block_width(num_rows, itemsize=itemsize, block_bytes=block_bytes, block_columns=block_columns)
    for start in range(first, num_columns, width):
        yield slice(start, min(num_columns, start + width))


def available_cpus() -> int:
    """Return the number of CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def map_column_spans(
    task: Callable[[slice], SpanResult], *, num_rows: int, num_columns: int, span_multiple: int, threads: int | None = None, min_values: int = PARALLEL_MIN_VALUES
) -> list[SpanResult]:
    """Run `task` on contiguous spans of range(num_columns) on up to `threads` threads and return its results in column order.

    For kernels whose columns are independent, so each span writes its own
    columns of the output. numpy releases the GIL in its copies, sorts,
    ufunc loops and BLAS calls, so the threads run in parallel. A stack of
    fewer than `min_values` values runs on the calling thread, and so does a
    call made on a worker thread of another call, so threads never start
    threads of their own. Each thread takes spans as it finishes the last one, so a thread slowed
    by other load on the machine does less of the work. The threads see the
    caller's numpy error state (np.errstate). BLAS runs on one thread inside
    every span, on the calling thread too (see single_threaded_blas).

    Args:
        task: reads the columns of the span it is given; called once per span.
        span_multiple: spans start at multiples of this many columns. With
            the task's block width, the blocks of every span are the blocks
            one thread would read, so every block is computed as on one
            thread and the results do not depend on the number of threads.
        threads: most threads, or None for every CPU this process may use,
            up to MAX_SPAN_THREADS.
        min_values: smallest num_rows * num_columns split among threads;
            PARALLEL_MIN_VALUES for sorts, MEMORY_BOUND_MIN_VALUES for passes
            bound by memory bandwidth.
    """
    return _map_spans(task, length=num_columns, span_multiple=span_multiple, num_values=num_rows * num_columns, threads=threads, min_values=min_values)


def map_row_spans(
    task: Callable[[slice], SpanResult], *, num_rows: int, num_columns: int, threads: int | None = None, min_values: int = PARALLEL_MIN_VALUES
) -> list[SpanResult]:
    """Run `task` on contiguous spans of range(num_rows) on up to `threads` threads and return its results in row order.

    For kernels that compute one value per row, such as norms and
    distances: each row is computed whole by one thread, so the results do
    not depend on the number of threads. Otherwise as `map_column_spans`.
    """
    return _map_spans(task, length=num_rows, span_multiple=1, num_values=num_rows * num_columns, threads=threads, min_values=min_values)


def _map_spans(task: Callable[[slice], SpanResult], *, length: int, span_multiple: int, num_values: int, threads: int | None, min_values: int) -> list[SpanResult]:
    count = min(MAX_SPAN_THREADS, available_cpus()) if threads is None else threads
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {threads}.")
    too_small = num_values < min_values or length < PARALLEL_MIN_SPANS_PER_THREAD * count * span_multiple
    if count == 1 or too_small or getattr(_span_thread, "active", False):
        with single_threaded_blas():
            return [task(slice(0, length))]
    num_spans = count * SPANS_PER_THREAD
    width = -(-length // (num_spans * span_multiple)) * span_multiple
    spans = [slice(start, min(length, start + width)) for start in range(0, length, width)]
    # Each span runs in a copy of the caller's context, so np.errstate set by the caller applies in the threads.
    context = contextvars.copy_context()

    def run_in_context(span: slice) -> SpanResult:
        _span_thread.active = True
        return context.copy().run(task, span)

    # BLAS stays on one thread in each of the span threads (see single_threaded_blas).
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=count, thread_name_prefix="flo-aggregation") as pool:
        return list(pool.map(run_in_context, spans))


class RowStack:
    """An (n_rows, n_params) stack whose rows are separate 1-D arrays, such as memory-mapped update payloads.

    The kernels of this module and of `federation.aggregation.order_statistics`
    accept it wherever they accept a 2-D array, and read it row by row or one
    column block at a time, so the rows are never copied into one (n_rows, n_params)
    array. On a 2-core virtual machine, allocating and filling
    such an array for 100 float32 updates of 1e6 parameters took 0.1 to 0.4 s,
    longer than the median of the updates. Indexing supports the forms the
    kernels use: `stack[i]`, `stack[i, columns]`, and a (rows, columns) pair
    where rows is a slice, an index array or np.ix_ output. A block read
    with more than one row is gathered into a buffer of the calling thread
    that its next such read overwrites, so copy it to keep it.
    """

    def __init__(self, rows: Sequence[FloatArray]) -> None:
        """Wrap `rows`, 1-D float32 or float64 arrays of one size and dtype; they are read, never modified."""
        self.rows = [np.asarray(row) for row in rows]
        if not self.rows:
            raise ValueError("A RowStack needs at least one row.")
        first = self.rows[0]
        if first.ndim != 1 or first.dtype not in (np.float32, np.float64):
            raise ValueError(f"RowStack rows must be 1-D float32 or float64 arrays, got shape {first.shape} and dtype {first.dtype}.")
        for index, row in enumerate(self.rows):
            if row.shape != first.shape or row.dtype != first.dtype:
                raise ValueError(f"Row {index} has shape {row.shape} and dtype {row.dtype}, expected {first.shape} and {first.dtype}.")
        self.shape = (len(self.rows), first.size)
        self.dtype = first.dtype
        self.itemsize = first.itemsize
        self.ndim = 2
        # Each thread gathers into its own buffer, so column spans can be read in parallel.
        self._local = threading.local()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: object) -> FloatArray:
        if isinstance(key, (int, np.integer)):
            return self.rows[int(key)]
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(f"RowStack supports stack[i] and stack[rows, columns], not stack[{key!r}].")
        rows, columns = key
        if isinstance(rows, (int, np.integer)):
            return self.rows[int(rows)][columns]
        if not isinstance(rows, slice) and np.asarray(rows).dtype == bool:
            raise TypeError("RowStack takes row indices or a slice, not a boolean mask.")
        indices: Sequence[int] = range(*rows.indices(self.shape[0])) if isinstance(rows, slice) else np.asarray(rows).reshape(-1).tolist()
        if not isinstance(columns, slice):
            # np.ix_ gives a column index array of shape (1, k).
            columns = np.asarray(columns).reshape(-1)
        width = len(range(*columns.indices(self.shape[1]))) if isinstance(columns, slice) else columns.size
        size = len(indices) * width
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.size < size:
            buffer = self._local.buffer = np.empty(size, dtype=self.dtype)
        block = buffer[:size].reshape(len(indices), width)
        for position, index in enumerate(indices):
            block[position] = self.rows[index][columns]
        return block


def _gather_width(num_rows: int, itemsize: int) -> int:
    """Columns of one block gathered from a RowStack of `num_rows` rows (see GATHER_BLOCK_BYTES)."""
    row_bytes = max(1, num_rows * itemsize)
    return max(64, GATHER_BLOCK_BYTES // row_bytes, min(GATHER_MIN_COLUMNS, GATHER_MAX_BYTES // row_bytes))


# A stack of updates as the kernels accept it: one (n_rows, n_params) array or separate rows.
Stack = FloatArray | RowStack


def weighted_sum(stack: Stack, weights: FloatArray, *, rows: IntArray | None = None, block_columns: int | None = None, threads: int | None = None) -> Float64Array:
    """Compute sum_i weights[i] * stack[rows[i]] as float64 without a float64 copy of the stack.

    Column spans are summed on up to `threads` threads (`map_column_spans`),
    with the same blocks, so the result does not depend on the thread count.
    A float64 array summed over all its rows is one BLAS call on one thread.

    Args:
        stack: (n_clients, n_params) float32 or float64.
        weights: (n_rows,) float64, one per summed row.
        rows: (n_rows,) indices of the rows to sum, or None for all rows in order.
            Rows left out are never read, so they may hold NaN.
        block_columns: override of the column block width (tests).
        threads: most threads, or None for every usable CPU (see `map_column_spans`).

    Returns:
        (n_params,) float64. A non-finite input with a non-zero weight makes the
        matching output coordinates non-finite.

    Raises:
        ValueError: there is not one weight per summed row.
    """
    num_params = stack.shape[1]
    weights = np.asarray(weights, dtype=np.float64)
    row_indices = np.arange(stack.shape[0]) if rows is None else _row_indices(rows, stack.shape[0])
    if weights.shape != (row_indices.size,):
        raise ValueError(f"Expected {row_indices.size} weights, one per summed row, got an array of shape {weights.shape}.")
    if stack.dtype == np.float64 and rows is None and not isinstance(stack, RowStack):
        with single_threaded_blas():
            return weights @ stack

    cast_weights = weights.astype(stack.dtype)
    total = np.zeros(num_params)
    if isinstance(stack, RowStack):
        return _row_by_row_weighted_sum(stack, cast_weights, row_indices, total, block_columns=block_columns, threads=threads)
    # A chunk is a run of consecutive rows, so it is read as a view and never
    # copied, and has at most FLOAT32_TERMS rows, which bounds the float32
    # accumulation. Column blocks bound the float32 partial results.
    chunks = []
    start = 0
    for stop in range(1, row_indices.size + 1):
        if stop == row_indices.size or stop - start == FLOAT32_TERMS or row_indices[stop] != row_indices[stop - 1] + 1:
            chunks.append((start, stop))
            start = stop
    width = block_columns or WEIGHTED_SUM_COLUMNS

    def sum_span(span: slice) -> None:
        for columns in column_blocks(FLOAT32_TERMS, span.stop, itemsize=stack.itemsize, block_columns=width, first=span.start):
            for start, stop in chunks:
                first = int(row_indices[start])
                total[columns] += cast_weights[start:stop] @ stack[first : first + stop - start, columns]

    # map_column_spans holds BLAS to one thread, on the calling thread as on its own.
    map_column_spans(sum_span, num_rows=row_indices.size, num_columns=num_params, span_multiple=width, threads=threads, min_values=MEMORY_BOUND_MIN_VALUES)
    return total


def _row_indices(rows: object, num_rows: int) -> IntArray:
    """Return `rows` as a flat array of row numbers in range(num_rows); negative numbers count from the end.

    Raises:
        TypeError: `rows` contains anything but integers, such as a boolean mask.
        IndexError: a row number is out of range.
    """
    indices = np.asarray(rows).reshape(-1)
    if indices.size == 0:
        return np.zeros(0, dtype=np.intp)
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"rows must be integer row numbers, got an array of {indices.dtype}.")
    return np.arange(num_rows)[indices]


def _row_by_row_weighted_sum(
    stack: RowStack, cast_weights: FloatArray, row_indices: IntArray, total: Float64Array, *, block_columns: int | None, threads: int | None
) -> Float64Array:
    """Add sum_i cast_weights[i] * stack[row_indices[i]] into `total`, reading each row in runs of ROW_SUM_COLUMNS.

    Each run of a row is read where it lies, multiplied by its weight and
    added into a partial sum in the stack's dtype, which sums at most
    FLOAT32_TERMS rows before it is added to the float64 total. The error
    bound is that of the matrix-vector products on an array, but the
    rounding differs from theirs, because they multiply and add in another
    order. Nothing is gathered, so the extra memory is the total and two
    runs per thread.
    """
    num_params = stack.shape[1]
    width = block_columns or ROW_SUM_COLUMNS
    rows = [stack.rows[int(index)] for index in row_indices]

    def sum_span(span: slice) -> None:
        partial = np.empty(width, dtype=stack.dtype)
        product = np.empty(width, dtype=stack.dtype)
        for columns in column_blocks(1, span.stop, itemsize=stack.itemsize, block_columns=width, first=span.start):
            size = columns.stop - columns.start
            run_partial, run_product = partial[:size], product[:size]
            for first in range(0, len(rows), FLOAT32_TERMS):
                np.multiply(rows[first][columns], cast_weights[first], out=run_partial)
                for index in range(first + 1, min(len(rows), first + FLOAT32_TERMS)):
                    np.multiply(rows[index][columns], cast_weights[index], out=run_product)
                    np.add(run_partial, run_product, out=run_partial)
                total[columns] += run_partial

    map_column_spans(sum_span, num_rows=len(rows), num_columns=num_params, span_multiple=width, threads=threads, min_values=MEMORY_BOUND_MIN_VALUES)
    return total


def all_finite(values: FloatArray) -> bool:
    """Return whether `values`, of any shape, contains no NaN or infinity, usually in one pass.

    The sum is non-finite whenever a value is, so every value is checked
    only when the sum is not finite, which finite values can also cause by
    overflowing. The sum needs no temporary array, the check a boolean one.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(values, axis=None)
    return bool(np.isfinite(total)) or bool(np.all(np.isfinite(values)))


def find_non_finite_rows(stack: Stack) -> IntArray:
    """Return the ascending indices of the rows that hold a NaN or an infinity.

    One pass at memory speed: a row sum is non-finite whenever the row holds a
    non-finite value, so only rows whose sum is not finite, which also happens
    when finite values overflow, are checked element by element.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.array([np.add.reduce(row) for row in stack.rows]) if isinstance(stack, RowStack) else np.add.reduce(stack, axis=1)
    suspects = np.flatnonzero(~np.isfinite(sums))
    return np.array([index for index in suspects if not np.all(np.isfinite(stack[index]))], dtype=np.int64)


def squared_distances_to(stack: Stack, centre: FloatArray | None = None, *, block_columns: int | None = None) -> Float64Array:
    """Compute ||stack[i] - centre||^2 for every row in float64, one column block at a time.

    Args:
        stack: (n_clients, n_params) float32 or float64.
        centre: (n_params,) or None for the origin (squared L2 norms).

    Returns:
        (n_clients,) float64. Values whose squares overflow float64 give inf.
    """
    num_rows, num_params = stack.shape
    if isinstance(stack, RowStack):
        totals = np.zeros(num_rows)
        for columns in column_blocks(num_rows, num_params, itemsize=stack.itemsize, block_columns=block_columns or _gather_width(num_rows, stack.itemsize)):
            totals += squared_distances_to(stack[:, columns], None if centre is None else centre[columns])
        return totals
    totals = np.zeros(num_rows)
    buffer = np.empty((num_rows, 0))
    for columns in column_blocks(num_rows, num_params, itemsize=8, block_columns=block_columns):
        width = columns.stop - columns.start
        if buffer.shape[1] < width:
            buffer = np.empty((num_rows, width))
        offsets = buffer[:, :width]
        if centre is None:
            np.copyto(offsets, stack[:, columns])
        else:
            np.subtract(stack[:, columns], centre[columns], out=offsets, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            totals += np.einsum("ij,ij->i", offsets, offsets)
    return totals


def float32_squared_distances_to(stack: Stack, centre: npt.NDArray[np.float32], *, threads: int | None = None) -> tuple[Float64Array, float]:
    """Compute ||stack[i] - centre||^2 for a float32 stack from float32 differences, at about the cost of one read.

    Each row is read in runs of ROW_RUN_COLUMNS (`_row_distances`). An
    array is read row by row exactly as a RowStack is, so both give
    identical results. A centre that is not float32 is rounded to float32
    first. The differences of a run are rounded once to float32, which adds
    at most 2**-23 relative to each square, and summed as in
    `row_squared_norms`. For 100 rows of 1e6 values this took a third of
    the time of `squared_distances_to`, which casts every block to float64.
    Reading an array's column blocks instead, all rows of a block at a
    time, was slower on both 2-core machines of BENCHMARKS.md where it was
    measured: 58 to 60 ms against 35 ms on the Intel Xeon (model 167), and
    39 to 50 ms against 20 to 23 ms on Zen 4.

    Args:
        stack: (n_clients, n_params) float32; a float64 stack is passed to `squared_distances_to`.
        centre: (n_params,) float32, or values that numpy rounds to float32.
        threads: maximum number of threads, among which the rows are
            split (`map_row_spans`), or None for every usable CPU. A float64
            stack runs on one thread.

    Returns:
        (squared_distances, relative_error) as in `row_squared_norms`.

    Raises:
        ValueError: the centre's shape is not (n_params,).
    """
    num_rows, num_params = stack.shape
    centre = np.asarray(centre)
    if centre.shape != (num_params,):
        raise ValueError(f"The centre has shape {centre.shape}, expected ({num_params},) for a stack of shape {stack.shape}.")
    if stack.dtype != np.float32:
        return squared_distances_to(stack, centre), 0.0
    return _threaded_row_distances(stack, centre, threads=threads)


def weighted_mean_and_distances(stack: Stack, weights: FloatArray, *, threads: int | None = None) -> tuple[Float64Array, Float64Array, float]:
    """Compute the weighted sum of the rows, and each row's squared distance to that sum.

    For a float32 stack the sum is rounded to float32 before the distances
    are taken.

    Two reads: `weighted_sum`, then `float32_squared_distances_to` to the
    float32 sum. One read of each column block, for the block's sum and
    then its rows' distances while it was in cache, was slower on the
    2-core machines of BENCHMARKS.md. For 100 float32 rows of 1e6 values
    it took 131 to 134 ms on the Intel Xeon (model 167), against 56 to
    57 ms for the two reads of an array. On Zen 4 it took 85 to 88 ms,
    against 48 to 61 ms for the two reads of a RowStack. Gathering a
    RowStack's column blocks would also copy every row once and hold a
    gather buffer per thread. On the Intel Xeon (model 207) the gathered
    single read took 108 to 113 ms, with a 4 MiB buffer per thread, and
    the two reads 102 to 105 ms.

    Args:
        stack: (n_clients, n_params) float32; a float64 stack is read twice,
            by `weighted_sum` and `squared_distances_to`.
        weights: (n_clients,) float64, one per row, usually summing to 1 for a mean.
        threads: maximum number of threads, or None for every usable CPU.
            For a float64 stack only the weighted sum uses them.

    Returns:
        (total, squared_distances, relative_error): the (n_params,) float64
        weighted sum, as `weighted_sum` gives it, and the squared distances
        with their error bound as in `row_squared_norms`. Coordinates whose
        sum overflows float32 make the distances non-finite.

    Raises:
        ValueError: there is not one weight per row.
    """
    total = weighted_sum(stack, weights, threads=threads)
    if stack.dtype != np.float32:
        return total, squared_distances_to(stack, total), 0.0
    squared_distances, relative_error = _threaded_row_distances(stack, total, threads=threads)
    return total, squared_distances, relative_error


def _threaded_row_distances(stack: Stack, centre: FloatArray, *, threads: int | None) -> tuple[Float64Array, float]:
    """Compute `_row_distances` of every row of a float32 stack, rows split among threads, with the error bound of `float32_squared_distances_to`.

    NOTE: with fewer than PARALLEL_MIN_SPANS_PER_THREAD rows per thread
    the rows run on one thread, where column spans would use every core:
    for 3 rows of 3e7 values the distances took 70 ms, against 62 ms by
    column blocks on two threads.
    """
    num_rows, num_params = stack.shape
    rows = stack.rows if isinstance(stack, RowStack) else list(stack)
    spans = map_row_spans(lambda span: _row_distances(rows[span], centre), num_rows=num_rows, num_columns=num_params, threads=threads, min_values=MEMORY_BOUND_MIN_VALUES)
    relative_error = (FLOAT32_NORM_RELATIVE_ERROR if num_params >= FLOAT32_NORM_TERMS else 0.0) + 2.0**-23
    return np.concatenate(spans), relative_error


def _row_distances(rows: Sequence[npt.NDArray[np.float32]], centre: FloatArray) -> Float64Array:
    """Return ||row - centre_32||^2 for float32 1-D rows (a RowStack's rows or the rows of an array), summed as `row_squared_norms` sums.

    centre_32 is `centre` rounded to float32, run by run into a buffer, so a
    float64 centre is never copied whole. A value beyond float32's range
    becomes inf and makes the distances non-finite. Each row's differences
    come from it directly, in runs of ROW_RUN_COLUMNS, so no column block
    is gathered (which would copy every row once more: for 100 rows of 1e6
    values, 118 ms against 50 ms). Runs are the outer loop, so each run of
    the centre stays in cache while the rows stream past it. Rows whose
    float32 squares overflow, or whose sum is small enough for underflow to
    matter, are summed again from float64 differences.
    """
    num_params = centre.size
    totals = np.zeros(len(rows))
    offsets = np.empty(min(ROW_RUN_COLUMNS, num_params), dtype=np.float32)
    centre_runs = np.empty(offsets.size, dtype=np.float32)
    partials = np.empty(offsets.size // FLOAT32_NORM_TERMS, dtype=np.float32)

    def centre_run(start: int, stop: int) -> npt.NDArray[np.float32]:
        if centre.dtype == np.float32:
            return centre[start:stop]
        run = centre_runs[: stop - start]
        np.copyto(run, centre[start:stop], casting="same_kind")
        return run

    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, num_params, ROW_RUN_COLUMNS):
            stop = min(num_params, start + ROW_RUN_COLUMNS)
            run_centre, run_offsets = centre_run(start, stop), offsets[: stop - start]
            head = (stop - start) // FLOAT32_NORM_TERMS * FLOAT32_NORM_TERMS
            chunks = run_offsets[:head].reshape(-1, FLOAT32_NORM_TERMS)
            run_partials = partials[: chunks.shape[0]]
            for index, row in enumerate(rows):
                np.subtract(row[start:stop], run_centre, out=run_offsets)
                np.vecdot(chunks, chunks, out=run_partials)
                totals[index] += np.add.reduce(run_partials, dtype=np.float64)
                if head < stop - start:
                    tail = run_offsets[head:].astype(np.float64)
                    totals[index] += np.einsum("i,i->", tail, tail)
        is_suspect = ~np.isfinite(totals) | (totals < num_params * float(np.finfo(np.float32).tiny))
        for suspect in np.flatnonzero(is_suspect):
            row = rows[int(suspect)]
            totals[suspect] = sum(
                squared_distances_to(row[None, start : start + ROW_RUN_COLUMNS], centre_run(start, min(num_params, start + ROW_RUN_COLUMNS)))[0]
                for start in range(0, num_params, ROW_RUN_COLUMNS)
            )
    return totals


def squared_norm(values: FloatArray, *, block_size: int = FLOAT64_BLOCK_SIZE) -> float:
    """Return sum(values**2) of an array of any shape in float64, without a float64 copy of it.

    Each block is cast into one reused float64 buffer and squared by a BLAS
    dot product. Squares that overflow float64 give inf.
    """
    flat = np.asarray(values).reshape(-1)
    buffer = np.empty(min(block_size, flat.size))
    total = 0.0
    with single_threaded_blas(), np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat.size, block_size):
            block = buffer[: min(block_size, flat.size - start)]
            np.copyto(block, flat[start : start + block_size])
            total += float(np.dot(block, block))
    return total


def row_squared_norms(stack: Stack, *, threads: int | None = None) -> tuple[Float64Array, float]:
    """Compute sum(stack[i]**2) for every row in one pass at memory speed, with a bound on its error.

    A float32 row is squared and summed in float32 partials of
    FLOAT32_NORM_TERMS values, and the partials are added in float64. Its
    columns beyond the last whole partial, and float64 rows, are summed in
    float64. A row whose float32 squares overflow (values above about
    1.8e19) or whose sum is so small that underflowing squares could matter
    is summed again from a float64 cast, so a result is non-finite only if
    the row contains a NaN or an infinity, or, for float64 rows, if its
    squares overflow float64.

    Args:
        stack: (n_clients, n_params) float32 or float64.
        threads: most threads, each summing whole rows (`map_row_spans`),
            or None for every usable CPU.

    Returns:
        (squared_norms, relative_error): the (n_clients,) float64 squared
        norms and a bound on |computed - exact| / exact that holds for every
        finite result (0 when no float32 partial was used).
    """
    num_rows, num_params = stack.shape
    uses_float32 = stack.dtype == np.float32 and num_params >= FLOAT32_NORM_TERMS
    head = num_params - num_params % FLOAT32_NORM_TERMS if uses_float32 else 0

    def span_norms(span: slice) -> Float64Array:
        if isinstance(stack, RowStack):
            return np.concatenate([_squared_norms_in_runs(row[None, :], head) for row in stack.rows[span]])
        return _squared_norms_in_runs(stack[span], head)

    # Each row is summed whole on one thread, so the norms do not depend on the thread count.
    totals = np.concatenate(map_row_spans(span_norms, num_rows=num_rows, num_columns=num_params, threads=threads, min_values=MEMORY_BOUND_MIN_VALUES))
    if uses_float32:
        # Squares below float32's smallest normal number lose relative
        # precision. Each loses at most 2**-149, so a total above
        # num_params * tiny keeps them within the bound's slack over (k + 1) u.
        is_suspect = ~np.isfinite(totals) | (totals < num_params * float(np.finfo(np.float32).tiny))
        for index in np.flatnonzero(is_suspect):
            totals[index] = squared_norm(stack[index])
    return totals, FLOAT32_NORM_RELATIVE_ERROR if uses_float32 else 0.0


def _squared_norms_in_runs(stack: FloatArray, head: int) -> Float64Array:
    # Splitting the rows' first `head` columns into runs is a view, so one vecdot call squares and sums every run of every row.
    # With it, dp_fedavg_stack on 100 rows of 1e6 values took 55 to 66 ms against 63 to 65 ms with np.einsum("ijk,ijk->ij")
    # (bench/aggregation.py, two interleaved runs in BENCHMARKS.md). Any order of additions keeps FLOAT32_NORM_RELATIVE_ERROR.
    num_rows, num_columns = stack.shape
    chunks = stack[:, :head].reshape(num_rows, head // FLOAT32_NORM_TERMS, FLOAT32_NORM_TERMS)
    with np.errstate(over="ignore", invalid="ignore"):
        totals = np.add.reduce(np.vecdot(chunks, chunks), axis=1, dtype=np.float64)
        if head < num_columns:
            # Row by row, because einsum's order of additions over a 2-D
            # operand can depend on its number of rows. The float64 norms of
            # 100 rows of 80,000 values once differed by 5e-15 from those of
            # a subset of the rows.
            for index in range(num_rows):
                tail = np.asarray(stack[index, head:], dtype=np.float64)
                totals[index] += np.einsum("i,i->", tail, tail)
    return totals


def narrow_to_float32_in_place(values: Float64Array, *, block_size: int = FLOAT64_BLOCK_SIZE) -> npt.NDArray[np.float32]:
    """Cast a C-contiguous float64 array to float32 inside its own buffer and return the float32 view.

    The result occupies the first half of the buffer, so the cast needs no
    second full-size array. Each block is read into a small float32
    temporary before it is written. The write only covers float64 elements
    that were already read, because element i of the float32 view lies at
    byte 4i and element j of the float64 array at byte 8j. `values` is
    destroyed. Values too large for float32 become inf.
    """
    if values.dtype != np.float64 or not values.flags.c_contiguous:
        raise ValueError(f"values must be a C-contiguous float64 array, got {values.dtype} (contiguous: {values.flags.c_contiguous}).")
    flat = values.reshape(-1)
    narrowed = flat.view(np.float32)[: flat.size]
    for start in range(0, flat.size, block_size):
        stop = min(flat.size, start + block_size)
        with np.errstate(over="ignore"):
            block = flat[start:stop].astype(np.float32)
        narrowed[start:stop] = block
    return narrowed.reshape(values.shape)


def add_scaled_inplace(total: Float64Array, values: FloatArray, scale: float, *, block_size: int = FLOAT64_BLOCK_SIZE) -> None:
    """Add scale * values to the float64 array `total`, in float64, without a full-size temporary.

    `values` has the shape of `total` and any real dtype.
    """
    flat_total = total.reshape(-1)
    flat_values = np.asarray(values).reshape(-1)
    if scale == 1.0:
        # The ufunc casts float32 inputs in small internal buffers, so no temporary is made.
        np.add(flat_total, flat_values, out=flat_total, dtype=np.float64)
        return
    buffer = np.empty(min(block_size, flat_total.size))
    for start in range(0, flat_total.size, block_size):
        stop = min(flat_total.size, start + block_size)
        scaled = buffer[: stop - start]
        np.multiply(flat_values[start:stop], scale, out=scaled, dtype=np.float64)
        flat_total[start:stop] += scaled


def pairwise_squared_distances(stack: Stack, *, block_columns: int | None = None, threads: int | None = None) -> Float64Array:
    """Compute the squared L2 distance between every pair of rows from one Gram matrix.

    ||a - b||^2 = ||a - c||^2 + ||b - c||^2 - 2 (a - c).(b - c) for any centre
    c. The subtraction loses the differences to cancellation when ||a - c||
    is much larger than ||a - b||, as with weights near 1e4 that differ by
    1e-2, so c is an update inside the cluster: the one nearest the
    coordinate-wise median of a sample of coordinates, or the origin when the
    sample shows it as central. If the full distances show that another
    update is far more central (its median squared
    distance to the others is below 1 / RECENTRE_RATIO of its squared
    distance to c), the Gram matrix is recomputed around that one, so an
    update chosen by an attacker costs a second pass and never precision.
    The (n, n) results are combined in float64. A float32
    stack is multiplied in float32 over FLOAT32_GRAM_COLUMNS columns at a
    time, and again in float64 if a float32 product overflows.

    Args:
        stack: (n_clients, n_params) float32 or float64, may hold NaN or inf.
        block_columns: override of the column block width (tests).
        threads: most threads for the Gram matrix, or None for every usable
            CPU up to MAX_SPAN_THREADS (see `map_column_spans`).

    Returns:
        (n_clients, n_clients) float64, symmetric, with no negative values.
        A row and column whose update has a non-finite value are all inf,
        including the diagonal; otherwise the diagonal is 0. A pair whose
        distance overflows float64 is inf.
    """
    num_rows = stack.shape[0]
    distances = np.full((num_rows, num_rows), np.inf)
    if num_rows == 0:
        return distances
    # Most rounds hold only finite updates, and then the Gram pass shows it
    # (any NaN or infinity makes its row of the Gram matrix non-finite), so
    # the rows are checked one by one only after a non-finite Gram matrix.
    finite_rows = np.arange(num_rows)
    centre = _pick_centre(stack, finite_rows)
    gram = _centred_gram(
        stack, rows=None, centre_row=centre, dtype=np.float32 if stack.dtype == np.float32 else np.float64, block_columns=block_columns, threads=threads
    )
    if np.all(np.isfinite(gram)):
        block, to_centre = _distances_from_gram(gram), np.diagonal(gram).copy()
    else:
        is_finite = np.ones(num_rows, dtype=bool)
        is_finite[find_non_finite_rows(stack)] = False
        finite_rows = np.flatnonzero(is_finite)
        if finite_rows.size == 0:
            return distances
        centre = _pick_centre(stack, finite_rows)
        centre_row = None if centre is None else int(finite_rows[centre])
        block, to_centre = _centred_distances(
            stack, rows=None if finite_rows.size == num_rows else finite_rows, centre_row=centre_row, block_columns=block_columns, threads=threads
        )

    rows = None if finite_rows.size == num_rows else finite_rows
    if finite_rows.size > 2:
        median_distances = np.median(np.sort(block, axis=1)[:, 1:], axis=1)
        medoid = int(np.argmin(median_distances))
        if medoid != centre and to_centre[medoid] > RECENTRE_RATIO * median_distances[medoid]:
            block, _ = _centred_distances(stack, rows=rows, centre_row=int(finite_rows[medoid]), block_columns=block_columns, threads=threads)

    distances[np.ix_(finite_rows, finite_rows)] = block
    return distances


def _pick_centre(stack: Stack, finite_rows: IntArray) -> int | None:
    """Return the position in `finite_rows` of the row nearest the coordinate-wise median of a column sample, or None for the origin.

    The origin serves when the sample shows it no farther from any row than
    the chosen row is, as for updates spread around a small mean. It saves
    subtracting the centre from every block. The sample is
    CENTRE_SAMPLE_RUNS evenly spaced runs of contiguous columns, which reads
    whole cache lines. For 100 rows of 1e6 float32 values, 4,096 columns
    took 14 ms as single columns spread evenly and under 1 ms as 16 runs of 256.
    """
    num_params = stack.shape[1]
    # Fewer columns for many rows keep the float64 sample near CENTRE_SAMPLE_VALUES values.
    sample_columns = max(CENTRE_SAMPLE_RUNS, min(CENTRE_SAMPLE_COLUMNS, CENTRE_SAMPLE_VALUES // max(1, finite_rows.size)))
    columns = np.arange(num_params)
    if num_params > sample_columns:
        run = sample_columns // CENTRE_SAMPLE_RUNS
        starts = np.linspace(0, num_params - run, CENTRE_SAMPLE_RUNS).astype(np.int64)
        columns = (starts[:, None] + np.arange(run)[None, :]).ravel()
    sample = np.asarray(stack[np.ix_(finite_rows, columns)], dtype=np.float64)
    # np.median along axis 0 took 13 ms for this sample; sorting contiguous transposed rows takes about 2 ms.
    ordered = np.ascontiguousarray(sample.T)
    ordered.sort(axis=1)
    num_rows = finite_rows.size
    median = (ordered[:, (num_rows - 1) // 2] + ordered[:, num_rows // 2]) / 2
    with np.errstate(over="ignore", invalid="ignore"):
        spreads = np.sum((sample - median) ** 2, axis=1)
        norms = np.sum(sample**2, axis=1)
    spreads[~np.isfinite(spreads)] = np.inf
    centre = int(np.argmin(spreads))
    # Row i lies about spreads[i] + spreads[centre] from the chosen row and norms[i] from the origin.
    if np.all(np.isfinite(norms)) and np.max(norms) <= np.max(spreads) + spreads[centre]:
        return None
    return centre


def _centred_distances(
    stack: Stack, *, rows: IntArray | None, centre_row: int | None, block_columns: int | None, threads: int | None
) -> tuple[Float64Array, Float64Array]:
    """Return the distances and each row's squared distance to the centre (the origin for None)."""
    dtype = np.float32 if stack.dtype == np.float32 else np.float64
    gram = _centred_gram(stack, rows=rows, centre_row=centre_row, dtype=dtype, block_columns=block_columns, threads=threads)
    if dtype == np.float32 and not np.all(np.isfinite(gram)):
        # A float32 square overflows at about 1.8e19; float64 gives the finite distance or inf as before.
        gram = _centred_gram(stack, rows=rows, centre_row=centre_row, dtype=np.float64, block_columns=block_columns, threads=threads)
    return _distances_from_gram(gram), np.diagonal(gram).copy()


def _centred_gram(
    stack: Stack, *, rows: IntArray | None, centre_row: int | None, dtype: type[np.floating], block_columns: int | None, threads: int | None
) -> Float64Array:
    """Return the float64 (n, n) Gram matrix of stack[rows] - stack[centre_row] (the rows themselves for None), multiplied in `dtype` over column blocks.

    The blocks fall into `_gram_group_count` groups of consecutive blocks.
    Column spans of whole groups run on up to `threads` threads (`map_column_spans`),
    each group's block products are added in order, and the group
    matrices in order, so the result does not depend on the thread count.
    """
    num_rows = stack.shape[0] if rows is None else rows.size
    num_params = stack.shape[1]
    itemsize = np.dtype(dtype).itemsize
    width = block_columns or max(64, GRAM_BLOCK_BYTES // (num_rows * itemsize))
    if dtype == np.float32:
        width = min(width, FLOAT32_GRAM_COLUMNS)
    # A stack of no columns still gets one (empty) group, so the spans have a positive width.
    num_blocks = max(1, -(-num_params // width))
    group_width = -(-num_blocks // _gram_group_count(num_rows)) * width

    def span_grams(span: slice) -> list[Float64Array]:
        buffer = np.empty((num_rows, min(width, num_params)), dtype=dtype)
        grams = []
        with np.errstate(over="ignore", invalid="ignore"):
            for group_start in range(span.start, span.stop, group_width):
                gram = np.zeros((num_rows, num_rows))
                for columns in column_blocks(num_rows, min(span.stop, group_start + group_width), itemsize=itemsize, block_columns=width, first=group_start):
                    offsets = buffer[:, : columns.stop - columns.start]
                    source = stack[:, columns] if rows is None else stack[rows, columns]
                    if centre_row is not None:
                        np.subtract(source, stack[centre_row, columns], out=offsets, dtype=dtype)
                    elif source.dtype == dtype:
                        offsets = source
                    else:
                        np.copyto(offsets, source)
                    # numpy runs a @ a.T as one symmetric rank-k update (syrk), half the work of a general product.
                    gram += offsets @ offsets.T
                grams.append(gram)
        return grams

    # map_column_spans keeps BLAS on one thread in every span, because a threaded BLAS was slower for these thin products.
    spans = map_column_spans(span_grams, num_rows=num_rows, num_columns=num_params, span_multiple=group_width, threads=threads)
    total = np.zeros((num_rows, num_rows))
    with np.errstate(over="ignore", invalid="ignore"):
        for grams in spans:
            for gram in grams:
                total += gram
    return total


def _gram_group_count(num_rows: int) -> int:
    """Return the number of column-block groups of `_centred_gram`: GRAM_GROUPS, or fewer where their (n, n) float64 matrices would pass GRAM_GROUPS_BYTES."""
    return max(1, min(GRAM_GROUPS, GRAM_GROUPS_BYTES // (num_rows * num_rows * 8)))


def _distances_from_gram(gram: Float64Array) -> Float64Array:
    """Turn a Gram matrix of centred rows into squared distances: ||a||^2 + ||b||^2 - 2 a.b."""
    squared_norms = np.diagonal(gram).copy()
    with np.errstate(over="ignore", invalid="ignore"):
        distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    # Huge values overflow to inf, and inf - inf gives NaN. Both mean "too far apart".
    distances[np.isnan(distances)] = np.inf
    # Rounding can leave tiny negative values where two updates (nearly) coincide.
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return distances
