"""Memory-bound kernels over a stack of flattened updates, (n_clients, n_params).

Pure module: numpy and threadpoolctl. The stack is float32 or float64 and is
never copied whole or modified. Work that needs more than one pass over a
coordinate (casts, centring) runs on column blocks of about
COLUMN_BLOCK_BYTES, so it stays in cache and its extra memory is bounded
whatever the number of parameters. The sorts and selections of the median,
trimmed mean and Bulyan are in `federation.aggregation.order_statistics`.

Precision: float64 stacks are aggregated in float64. A float32 stack is
multiplied in float32 by BLAS, but no float32 accumulator sums more than
FLOAT32_TERMS terms before the partial result is added to a float64 total, so
the extra relative error is at most about FLOAT32_TERMS * 2**-24 of the sum
of absolute terms, and in practice near the float32 rounding of the inputs.
"""

import math
import mmap
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

FloatArray = npt.NDArray[np.floating]
Float64Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.integer]

# Columns per block are chosen so that one block of the stack fills about
# this many bytes, small enough for a 1 MiB L2 cache and large enough that
# numpy's per-call overhead stays below a few percent.
COLUMN_BLOCK_BYTES = 1 << 20
# Gram blocks are larger because a matrix product amortises its packing over more columns.
GRAM_BLOCK_BYTES = 4 << 20
# Terms a float32 BLAS accumulator sums before its result moves to float64:
# rows of a weighted sum.
FLOAT32_TERMS = 32
# Most columns of a float32 Gram block. Each entry of a block product sums at
# most this many float32 terms, so relative error stays near 1e-6 of the squared norms.
FLOAT32_GRAM_COLUMNS = 16384
# Coordinates sampled to pick the Gram centre; the sample costs O(n * this).
CENTRE_SAMPLE_COLUMNS = 4096
# Elements per reused float64 block of squared_norm and add_scaled_inplace:
# 256 KiB, so the block stays in L2. For 100 rows of 1e6 float32 values,
# squared_norm took 50 ms with it against 73 ms with new blocks of 2**17, and
# add_scaled_inplace 90 ms against 102 ms (numpy 2.4.6, machine of BENCHMARKS.md).
FLOAT64_BLOCK_SIZE = 1 << 15
# Linux's mmap flag that maps every page of a mapping at once; 0 where the platform lacks it.
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

_controller: ThreadpoolController | None = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run BLAS calls in the block on one thread.

    The products here are either memory-bound (matrix-vector) or have a tiny
    (n, n) output and a long inner dimension (Gram blocks), and OpenBLAS 0.3.31
    splits them badly: with numpy 2.4.6 and OpenBLAS 0.3.31 on the shared
    2-core machine of BENCHMARKS.md, a float32 Gram product of 100 updates
    of 1e6 parameters ran about ten times slower on two threads than on one.
    Setting OPENBLAS_NUM_THREADS=1 before numpy is imported has the same effect
    process-wide.
    """
    global _controller
    if _controller is None:
        # Inspecting the loaded libraries takes milliseconds, so it runs once per process.
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


def column_blocks(num_rows: int, num_columns: int, *, itemsize: int, block_bytes: int = COLUMN_BLOCK_BYTES, block_columns: int | None = None) -> Iterator[slice]:
    """Yield column slices covering range(num_columns), each about `block_bytes` over `num_rows` rows.

    `block_columns` overrides the width, for tests that need blocks not dividing the column count.
    """
    width = block_columns or max(64, block_bytes // max(1, num_rows * itemsize))
    for start in range(0, num_columns, width):
        yield slice(start, min(num_columns, start + width))


def weighted_sum(stack: FloatArray, weights: FloatArray, *, rows: IntArray | None = None, block_columns: int | None = None) -> Float64Array:
    """Compute sum_i weights[i] * stack[rows[i]] as float64 without a float64 copy of the stack.

    Args:
        stack: (n_clients, n_params) float32 or float64.
        weights: (n_rows,) float64, one per summed row.
        rows: (n_rows,) indices of the rows to sum, or None for all rows in order.
            Rows left out are never read, so they may hold NaN.
        block_columns: override of the column block width (tests).

    Returns:
        (n_params,) float64. A non-finite input with a non-zero weight makes the
        matching output coordinates non-finite.
    """
    num_params = stack.shape[1]
    weights = np.asarray(weights, dtype=np.float64)
    if stack.dtype == np.float64 and rows is None:
        with single_threaded_blas():
            return weights @ stack

    row_indices = np.arange(stack.shape[0]) if rows is None else np.asarray(rows)
    cast_weights = weights.astype(stack.dtype)
    total = np.zeros(num_params)
    # Row chunks bound the float32 accumulation; column blocks bound the float32 partial results.
    with single_threaded_blas():
        for columns in column_blocks(FLOAT32_TERMS, num_params, itemsize=stack.itemsize, block_columns=block_columns):
            for start in range(0, row_indices.size, FLOAT32_TERMS):
                chunk = row_indices[start : start + FLOAT32_TERMS]
                if rows is None:
                    block = stack[chunk[0] : chunk[-1] + 1, columns]
                else:
                    block = stack[chunk, columns]
                total[columns] += cast_weights[start : start + FLOAT32_TERMS] @ block
    return total


def find_non_finite_rows(stack: FloatArray) -> IntArray:
    """Return the ascending indices of the rows that hold a NaN or an infinity.

    One pass at memory speed: a row sum is non-finite whenever the row holds a
    non-finite value, so only rows whose sum is not finite, which also happens
    when finite values overflow, are checked element by element.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        sums = np.add.reduce(stack, axis=1)
    suspects = np.flatnonzero(~np.isfinite(sums))
    return np.array([index for index in suspects if not np.all(np.isfinite(stack[index]))], dtype=np.int64)


def squared_distances_to(stack: FloatArray, centre: FloatArray | None = None, *, block_columns: int | None = None) -> Float64Array:
    """Compute ||stack[i] - centre||^2 for every row in float64, one column block at a time.

    Args:
        stack: (n_clients, n_params) float32 or float64.
        centre: (n_params,) or None for the origin (squared L2 norms).

    Returns:
        (n_clients,) float64. Values whose squares overflow float64 give inf.
    """
    num_rows, num_params = stack.shape
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


def allocate_populated(shape: tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray:
    """Return a writable, uninitialised array whose pages are mapped in one call (MAP_POPULATE), not one page fault at a time.

    Falls back to np.empty where the platform has no MAP_POPULATE or the array is empty.
    """
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if size == 0 or not MAP_POPULATE:
        return np.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
    return np.frombuffer(mapping, dtype=dtype).reshape(shape)


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


def pairwise_squared_distances(stack: FloatArray, *, block_columns: int | None = None) -> Float64Array:
    """Compute the squared L2 distance between every pair of rows from one Gram matrix.

    ||a - b||^2 = ||a - c||^2 + ||b - c||^2 - 2 (a - c).(b - c) for any centre
    c. The subtraction loses the differences to cancellation when ||a - c||
    is much larger than ||a - b||, as with weights near 1e4 that differ by
    1e-2, so c is an update inside the cluster: the one nearest the
    coordinate-wise median of a sample of coordinates. If the full distances
    show that another update is far more central (its median distance to
    the others is below its distance to c), the Gram matrix is recomputed
    around that one, so an update chosen by an attacker costs a second pass
    and never precision. The (n, n) results are combined in float64. A float32
    stack is multiplied in float32 over FLOAT32_GRAM_COLUMNS columns at a
    time, and again in float64 if a float32 product overflows.

    Args:
        stack: (n_clients, n_params) float32 or float64, may hold NaN or inf.

    Returns:
        (n_clients, n_clients) float64, symmetric, with no negative values.
        A row and column whose update has a non-finite value are all inf,
        including the diagonal; otherwise the diagonal is 0. A pair whose
        distance overflows float64 is inf.
    """
    num_rows = stack.shape[0]
    distances = np.full((num_rows, num_rows), np.inf)
    is_finite = np.ones(num_rows, dtype=bool)
    is_finite[find_non_finite_rows(stack)] = False
    finite_rows = np.flatnonzero(is_finite)
    if finite_rows.size == 0:
        return distances

    rows = None if finite_rows.size == num_rows else finite_rows
    centre = _pick_centre(stack, finite_rows)
    block = _centred_distances(stack, rows=rows, centre_row=int(finite_rows[centre]), block_columns=block_columns)
    if finite_rows.size > 2:
        median_distances = np.median(np.sort(block, axis=1)[:, 1:], axis=1)
        medoid = int(np.argmin(median_distances))
        if medoid != centre and block[centre, medoid] > median_distances[medoid]:
            block = _centred_distances(stack, rows=rows, centre_row=int(finite_rows[medoid]), block_columns=block_columns)

    distances[np.ix_(finite_rows, finite_rows)] = block
    return distances


def _pick_centre(stack: FloatArray, finite_rows: IntArray) -> int:
    """Return the position in `finite_rows` of the row nearest the coordinate-wise median of a column sample."""
    step = max(1, stack.shape[1] // CENTRE_SAMPLE_COLUMNS)
    sample = np.asarray(stack[finite_rows, ::step], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        spreads = np.sum((sample - np.median(sample, axis=0)) ** 2, axis=1)
    return int(np.argmin(np.where(np.isfinite(spreads), spreads, np.inf)))


def _centred_distances(stack: FloatArray, *, rows: IntArray | None, centre_row: int, block_columns: int | None) -> Float64Array:
    dtype = np.float32 if stack.dtype == np.float32 else np.float64
    block = _centred_distances_in(stack, dtype, rows=rows, centre_row=centre_row, block_columns=block_columns)
    if dtype == np.float32 and not np.all(np.isfinite(block)):
        # A float32 square overflows at about 1.8e19; float64 gives the finite distance or inf as before.
        block = _centred_distances_in(stack, np.float64, rows=rows, centre_row=centre_row, block_columns=block_columns)
    return block


def _centred_distances_in(stack: FloatArray, dtype: type[np.floating], *, rows: IntArray | None, centre_row: int, block_columns: int | None) -> Float64Array:
    num_rows = stack.shape[0] if rows is None else rows.size
    num_params = stack.shape[1]
    itemsize = np.dtype(dtype).itemsize
    width = block_columns or max(64, GRAM_BLOCK_BYTES // (num_rows * itemsize))
    if dtype == np.float32:
        width = min(width, FLOAT32_GRAM_COLUMNS)
    gram = np.zeros((num_rows, num_rows))
    buffer = np.empty((num_rows, min(width, num_params)), dtype=dtype)
    with single_threaded_blas(), np.errstate(over="ignore", invalid="ignore"):
        for columns in column_blocks(num_rows, num_params, itemsize=itemsize, block_columns=width):
            offsets = buffer[:, : columns.stop - columns.start]
            source = stack[:, columns] if rows is None else stack[rows, columns]
            np.subtract(source, stack[centre_row, columns], out=offsets, dtype=dtype)
            # numpy runs a @ a.T as one symmetric rank-k update (syrk), half the work of a general product.
            gram += offsets @ offsets.T
        squared_norms = np.diagonal(gram).copy()
        distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    # Huge values overflow to inf, and inf - inf gives NaN. Both mean "too far apart".
    distances[np.isnan(distances)] = np.inf
    # Rounding can leave tiny negative values where two updates (nearly) coincide.
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return distances
