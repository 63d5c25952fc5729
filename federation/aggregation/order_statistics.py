"""Coordinate-wise order statistics over a stack of flattened updates, (n_clients, n_params).

Pure module: numpy only. The median, the trimmed mean and Bulyan's
closest-to-median mean sort or select the n_clients values of every
coordinate. They work on column blocks of about COLUMN_BLOCK_BYTES, so their
extra memory is bounded whatever the number of parameters, and never copy
or modify the stack.

Sorting a column block takes one of two routes, and both give the same sorted values:

- up to SORTING_NETWORK_MAX_ROWS rows, a sorting network of whole-row
  np.minimum and np.maximum calls sorts the block in its own layout, so each
  call compares thousands of coordinates with SIMD instructions and nothing
  is transposed;
- above it, the block is transposed into (width, n_clients) rows and np.sort
  sorts each row with numpy's SIMD sort (x86-simd-sort in numpy 2.x).

np.partition is not used. On rows of 100 float32 values, numpy 2.4.6 took
about 1.5 times as long to select one index as np.sort took to sort the
rows. With two indices, as the trimmed mean's two cuts would need, it took
about 15 times as long.
"""

import functools
from collections.abc import Iterator

import numpy as np

from federation.aggregation.kernels import COLUMN_BLOCK_BYTES, Float64Array, FloatArray, IntArray, column_blocks

# Largest number of rows sorted by a network. The network makes O(n log^2 n)
# passes over a block and the transposed sort a fixed two, so the network wins
# for small n only. With numpy 2.4.6 on the 2-core machine of BENCHMARKS.md,
# d = 1e6 float32, the network took 52 ms and the transposed sort 63 ms at
# n = 24, and 75 ms against 50 ms at n = 32.
SORTING_NETWORK_MAX_ROWS = 24


def coordinate_median(stack: FloatArray, *, block_columns: int | None = None) -> Float64Array:
    """Compute the coordinate-wise median, as np.median(stack, axis=0) in float64.

    For an even count the median is the mean of the two middle values,
    added in float64 as np.median adds them.

    Args:
        stack: (n_clients, n_params) finite values, n_clients >= 1.
        block_columns: override of the column block width (tests).

    Returns:
        (n_params,) float64.
    """
    num_rows, num_params = stack.shape
    middle = num_rows // 2
    median = np.empty(num_params)
    for columns, ordered in _sorted_column_blocks(stack, block_columns=block_columns):
        if num_rows % 2:
            median[columns] = ordered[middle]
        else:
            np.add(ordered[middle - 1], ordered[middle], out=median[columns], dtype=np.float64)
            median[columns] /= 2
    return median


def trimmed_mean(stack: FloatArray, *, num_trimmed: int, block_columns: int | None = None) -> tuple[Float64Array, IntArray]:
    """Compute the coordinate-wise trimmed mean and how many coordinates each row kept.

    Per coordinate, the num_trimmed smallest and largest values are dropped and
    the other n - 2 * num_trimmed are summed in float64, in ascending order,
    and divided. Among values equal to a cut value, the ones kept are those a
    stable sort puts in the middle: at the lower cut the higher rows, at the
    upper cut the lower rows.

    Args:
        stack: (n_clients, n_params) finite values.
        num_trimmed: values cut from each end, with n_clients - 2 * num_trimmed >= 1.
        block_columns: override of the column block width (tests).

    Returns:
        (mean, kept_counts): the (n_params,) float64 trimmed mean, which is
        inf when the float64 sum overflows, and the (n_clients,) number of
        coordinates at which each row was kept.
    """
    num_rows, num_params = stack.shape
    num_kept = num_rows - 2 * num_trimmed
    mean = np.empty(num_params)
    trimmed_counts = np.zeros(num_rows, dtype=np.int64)
    for columns, ordered in _sorted_column_blocks(stack, block_columns=block_columns):
        # Summing in sorted order, even with nothing trimmed, makes the rounding independent of the row order.
        with np.errstate(over="ignore"):
            np.add.reduce(ordered[num_trimmed : num_rows - num_trimmed], axis=0, dtype=np.float64, out=mean[columns])
        if num_trimmed:
            trimmed_counts += _count_trimmed(stack[:, columns], ordered, num_trimmed=num_trimmed)
    mean /= num_kept
    return mean, num_params - trimmed_counts


def _count_trimmed(block: FloatArray, ordered: FloatArray, *, num_trimmed: int) -> IntArray:
    """Count, per row of `block`, the coordinates at which its value was trimmed.

    `ordered` is `block` sorted along axis 0. Where the values just inside and
    just outside a cut differ, the trimmed values are exactly those below the
    lowest kept value or above the highest, and comparisons in the block's
    own layout count them. A tie at a cut leaves the choice to the stable
    sort of the few tied columns.
    """
    num_rows = block.shape[0]
    lowest_kept = ordered[num_trimmed]
    highest_kept = ordered[num_rows - num_trimmed - 1]
    is_tied = (ordered[num_trimmed - 1] == lowest_kept) | (ordered[num_rows - num_trimmed] == highest_kept)
    is_below = np.less(block, np.where(is_tied, -np.inf, lowest_kept))
    is_trimmed = np.greater(block, np.where(is_tied, np.inf, highest_kept))
    np.logical_or(is_trimmed, is_below, out=is_trimmed)
    # Summing the bytes of the bool array took 0.7 times as long as np.count_nonzero along axis 1 (numpy 2.4.6, 100 rows).
    trimmed_counts = np.add.reduce(is_trimmed.view(np.uint8), axis=1, dtype=np.int64)

    tied = np.flatnonzero(is_tied)
    if tied.size:
        order = np.argsort(block[:, tied], axis=0, kind="stable")
        trimmed_rows = np.concatenate([order[:num_trimmed], order[num_rows - num_trimmed :]])
        trimmed_counts += np.bincount(trimmed_rows.ravel(), minlength=num_rows)
    return trimmed_counts


def _sorted_column_blocks(stack: FloatArray, *, block_columns: int | None) -> Iterator[tuple[slice, FloatArray]]:
    """Yield (columns, ordered) per column block, where ordered is the (n_clients, width) block sorted along axis 0.

    `ordered` is a view of a buffer that the next block overwrites.
    """
    num_rows, num_params = stack.shape
    blocks = column_blocks(num_rows, num_params, itemsize=stack.itemsize, block_bytes=COLUMN_BLOCK_BYTES, block_columns=block_columns)
    if num_rows <= SORTING_NETWORK_MAX_ROWS:
        yield from _network_sorted_blocks(stack, blocks)
        return
    buffer = np.empty((0, num_rows), dtype=stack.dtype)
    for columns in blocks:
        width = columns.stop - columns.start
        if buffer.shape[0] < width:
            buffer = np.empty((width, num_rows), dtype=stack.dtype)
        rows = buffer[:width]
        np.copyto(rows, stack[:, columns].T)
        rows.sort(axis=1)
        yield columns, rows.T


def _network_sorted_blocks(stack: FloatArray, blocks: Iterator[slice]) -> Iterator[tuple[slice, FloatArray]]:
    num_rows = stack.shape[0]
    comparators = sorting_network(num_rows)
    buffer = np.empty((0, 0), dtype=stack.dtype)
    for columns in blocks:
        width = columns.stop - columns.start
        if buffer.shape[1] < width:
            # num_rows working rows, one spare row and num_rows rows for the sorted result.
            buffer = np.empty((2 * num_rows + 1, width), dtype=stack.dtype)
        rows = [buffer[index, :width] for index in range(num_rows + 1)]
        np.copyto(buffer[:num_rows, :width], stack[:, columns])
        spare = rows[num_rows]
        for low, high in comparators:
            np.minimum(rows[low], rows[high], out=spare)
            np.maximum(rows[low], rows[high], out=rows[high])
            # The minimum now lives in the spare row, so the two swap roles instead of copying.
            rows[low], spare = spare, rows[low]
        ordered = buffer[num_rows + 1 :, :width]
        np.stack(rows[:num_rows], out=ordered)
        yield columns, ordered


@functools.cache
def sorting_network(num_inputs: int) -> tuple[tuple[int, int], ...]:
    """Return Batcher's odd-even merge sorting network for `num_inputs` inputs.

    Each (low, high) pair, low < high, is a comparator that puts the smaller
    of the two values at `low`. Applied in order, the pairs sort any input.
    For a count that is not a power of two the network is the power-of-two
    network with the comparators that touch the missing inputs removed,
    which sorts because those inputs would be +inf and never move.
    """
    comparators = []
    merge_size = 1
    while merge_size < num_inputs:
        distance = merge_size
        while distance >= 1:
            for start in range(distance % merge_size, num_inputs - distance, 2 * distance):
                for offset in range(min(distance, num_inputs - start - distance)):
                    low = start + offset
                    # Compare only inside one merge of two sorted runs of merge_size.
                    if low // (2 * merge_size) == (low + distance) // (2 * merge_size):
                        comparators.append((low, low + distance))
            distance //= 2
        merge_size *= 2
    return tuple(comparators)


def closest_to_median_mean(stack: FloatArray, *, rows: IntArray, num_closest: int, block_columns: int | None = None) -> tuple[Float64Array, IntArray]:
    """Average, per coordinate, the `num_closest` values of `rows` nearest their coordinate-wise median.

    Among values equally far from the median the one from the lower row is taken first.

    Args:
        stack: (n_clients, n_params); only `rows` are read, and they are finite.
        rows: (n_selected,) ascending row indices.
        num_closest: from 1 to n_selected.

    Returns:
        (mean, averaged_counts): the (n_params,) float64 mean and, per entry of
        `rows`, the number of coordinates at which its value was averaged.
    """
    num_selected = rows.size
    num_params = stack.shape[1]
    mean = np.empty(num_params)
    averaged_counts = np.zeros(num_selected, dtype=np.int64)
    for columns in column_blocks(num_selected, num_params, itemsize=8, block_columns=block_columns):
        values = np.ascontiguousarray(stack[rows, columns].T, dtype=np.float64)
        median = np.median(values, axis=1, keepdims=True)
        order = np.argsort(np.abs(values - median), axis=1, kind="stable")[:, :num_closest]
        mean[columns] = np.take_along_axis(values, order, axis=1).mean(axis=1)
        averaged_counts += np.bincount(order.ravel(), minlength=num_selected)
    return mean, averaged_counts
