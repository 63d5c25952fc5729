"""Coordinate-wise order statistics over a stack of flattened updates, (n_clients, n_params).

Pure module: numpy only. The median, the trimmed mean and Bulyan's
closest-to-median mean sort or select the n_clients values of every
coordinate. They work on column blocks of about SORT_BLOCK_BYTES, so
their extra memory is bounded whatever the number of parameters, and they
never copy or modify the stack. Sorting is compute-bound and the columns
are independent, so the column range is split into spans that threads
sort in parallel (`kernels.map_column_spans`). The results do not depend
on the number of threads.

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
from typing import Literal

import numpy as np
import numpy.typing as npt

from federation.aggregation.kernels import Float64Array, FloatArray, IntArray, RowStack, Stack, block_width, column_blocks, map_column_spans

# Largest number of rows sorted by a network. The network makes O(n log^2 n)
# passes over a block and the transposed sort a fixed two, so the network wins
# for small n only. With numpy 2.4.6 on a 2-core virtual machine,
# d = 1e6 float32, the network took 52 ms and the transposed sort 63 ms at
# n = 24, and 75 ms against 50 ms at n = 32.
SORTING_NETWORK_MAX_ROWS = 24
# Bytes of the stack in one sorted column block, measured on the AMD EPYC
# (Zen 3) virtual machine with 100 float32 rows of 1e6 values on two
# threads. The median took 193 to 246 ms with 1 MiB blocks, 184 to 216 ms
# with 2 MiB and 246 ms with 4 MiB. The trimmed mean took 290 to 334 ms,
# 247 to 308 ms and 322 ms.
SORT_BLOCK_BYTES = 2 << 20
# Rows of the stack transposed by one np.copyto call. For 100 rows of 1e6
# float32 values, numpy 2.4.6 transposed the column blocks in 64 ms 16 rows
# at a time, against 75 ms for whole blocks and 140 ms 4 rows at a time.
TRANSPOSE_TILE_ROWS = 16


def coordinate_median(stack: Stack, *, block_columns: int | None = None, threads: int | None = None) -> Float64Array:
    """Compute the coordinate-wise median, as np.median(stack, axis=0) in float64.

    For an even count the median is the mean of the two middle values,
    added in float64 as np.median adds them.

    Args:
        stack: (n_clients, n_params), n_clients >= 1.
        block_columns: override of the column block width (tests).
        threads: most threads sorting column spans (see `map_column_spans`).

    Returns:
        (n_params,) float64, NaN at every coordinate where a row holds a NaN
        or an infinity, so callers can check the result instead of the stack.
    """
    num_rows, num_params = stack.shape
    middle = num_rows // 2
    median = np.empty(num_params)

    def median_of_span(span: slice) -> None:
        for columns, ordered, _ in _sorted_column_blocks(stack, span=span, block_columns=block_columns):
            if num_rows % 2:
                median[columns] = ordered[middle]
            else:
                np.add(ordered[middle - 1], ordered[middle], out=median[columns], dtype=np.float64)
                median[columns] /= 2
            _mark_non_finite_columns(median[columns], ordered)

    map_column_spans(median_of_span, num_rows=num_rows, num_columns=num_params, span_multiple=_sort_block_width(stack, block_columns), threads=threads)
    return median


def trimmed_mean(stack: Stack, *, num_trimmed: int, block_columns: int | None = None, threads: int | None = None) -> tuple[Float64Array, IntArray]:
    """Compute the coordinate-wise trimmed mean and how many coordinates each row kept.

    Per coordinate, the num_trimmed smallest and largest values are dropped and
    the other n - 2 * num_trimmed are summed in float64 and divided. Among
    values equal to a cut value, the ones kept are those a stable sort puts
    in the middle: at the lower cut the higher rows, at the upper cut the
    lower rows.

    Args:
        stack: (n_clients, n_params), with n_clients - 2 * num_trimmed >= 1.
        num_trimmed: values cut from each end.
        block_columns: override of the column block width (tests).
        threads: most threads sorting column spans (see `map_column_spans`).

    Returns:
        (mean, kept_counts): the (n_params,) float64 trimmed mean, which is
        inf when the float64 sum overflows and NaN at every coordinate where
        a row holds a NaN or an infinity, and the (n_clients,) number of
        coordinates at which each row was kept.
    """
    num_rows, num_params = stack.shape
    num_kept = num_rows - 2 * num_trimmed
    mean = np.empty(num_params)

    def trim_span(span: slice) -> IntArray:
        ones = np.ones(num_kept)
        kept_values = np.empty(0)
        counter = _OutsideCounter(num_rows)
        for columns, ordered, unsorted in _sorted_column_blocks(stack, span=span, block_columns=block_columns, keep_unsorted=num_trimmed > 0):
            kept = ordered[num_trimmed : num_rows - num_trimmed]
            if kept_values.size < kept.size:
                kept_values = np.empty(kept.size)
            # The float64 copy keeps the layout of `kept`, so the cast reads it in
            # memory order. Cast and summed by a BLAS matrix-vector product, the
            # kept values of 100 float32 rows of 1e6 values took 27 ms against
            # 45 ms for np.add.reduce with dtype=float64 (numpy 2.4.6).
            cast = _float64_like(kept, kept_values)
            np.copyto(cast, kept)
            block_mean = mean[columns]
            # The values are sorted, so the order of the additions, and the rounding, do not depend on the order of the rows.
            with np.errstate(over="ignore", invalid="ignore"):
                np.matmul(ones, cast, out=block_mean)
            _mark_non_finite_columns(block_mean, ordered)
            if unsorted is not None:
                _count_trimmed(counter, unsorted, ordered, num_trimmed)
        return counter.totals()

    spans = map_column_spans(trim_span, num_rows=num_rows, num_columns=num_params, span_multiple=_sort_block_width(stack, block_columns), threads=threads)
    trimmed_counts = np.sum(spans, axis=0)
    mean /= num_kept
    return mean, num_params - trimmed_counts


def _float64_like(values: FloatArray, buffer: Float64Array) -> Float64Array:
    """Return a float64 view of `buffer` with the shape of the 2-D `values` and the same axis order in memory."""
    rows, width = values.shape
    if values.strides[0] < values.strides[1]:
        return buffer[: rows * width].reshape(width, rows).T
    return buffer[: rows * width].reshape(rows, width)


def _mark_non_finite_columns(result: Float64Array, ordered: FloatArray) -> None:
    """Set NaN in `result` where a column of the sorted block holds a NaN or an infinity.

    Both sorts put every NaN at the end and infinities at the ends, so the
    first and last rows show every non-finite column. In the sorting
    network, np.minimum and np.maximum carry a NaN to every output it
    reaches, the first and last included.
    """
    is_finite = np.isfinite(ordered[0])
    np.logical_and(is_finite, np.isfinite(ordered[-1]), out=is_finite)
    if not is_finite.all():
        result[~is_finite] = np.nan


class _OutsideCounter:
    """Count, per row, the coordinates at which its value lies outside a range, one column block at a time.

    The values outside [lowest, highest] of each column are found by
    comparisons in the block's own layout and added into an (n_clients,
    width) uint8 tally, which is summed into int64 totals before it can
    wrap. For the trimmed mean of 100 rows of 1e6 float32 values this took
    40 ms, against 150 ms for or-ing the two comparisons and summing each
    block's bytes into int64 (numpy 2.4.6). Columns that the caller marks
    as ambiguous, such as ties at a cut, are skipped here and their rows
    counted by `count_rows`.
    """

    # Each block adds at most 1 to a tally cell, so 255 blocks fit in uint8.
    BLOCKS_PER_TALLY = 255

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.counts = np.zeros(num_rows, dtype=np.int64)
        self.tally = np.zeros((num_rows, 0), dtype=np.uint8)
        self.is_below = np.empty((num_rows, 0), dtype=bool)
        self.is_above = np.empty((num_rows, 0), dtype=bool)
        self.blocks_in_tally = 0

    def count_outside(self, block: FloatArray, lowest: FloatArray, highest: FloatArray, skipped: npt.NDArray[np.bool_]) -> None:
        """Count the values of `block` (n_clients, width) below `lowest` or above `highest` (width,), except in `skipped` columns."""
        num_rows, width = block.shape
        if self.tally.shape[1] < width:
            self.flush()
            # The tallies follow the block's layout, so every comparison reads and writes in memory order.
            order: Literal["C", "F"] = "F" if block.strides[0] < block.strides[1] else "C"
            self.tally = np.zeros((num_rows, width), dtype=np.uint8, order=order)
            self.is_below = np.empty((num_rows, width), dtype=bool, order=order)
            self.is_above = np.empty((num_rows, width), dtype=bool, order=order)
        is_below, is_above, tally = self.is_below[:, :width], self.is_above[:, :width], self.tally[:, :width]
        np.less(block, np.where(skipped, -np.inf, lowest), out=is_below)
        np.greater(block, np.where(skipped, np.inf, highest), out=is_above)
        np.add(tally, is_below.view(np.uint8), out=tally)
        np.add(tally, is_above.view(np.uint8), out=tally)
        self.blocks_in_tally += 1
        if self.blocks_in_tally == self.BLOCKS_PER_TALLY:
            self.flush()

    def count_rows(self, rows: IntArray) -> None:
        """Count one coordinate per entry of `rows`, the row numbers of values outside their column's range."""
        self.counts += np.bincount(rows.ravel(), minlength=self.num_rows)

    def flush(self) -> None:
        """Move the uint8 tally into the int64 totals."""
        if self.blocks_in_tally:
            self.counts += np.add.reduce(self.tally, axis=1, dtype=np.int64)
            self.tally.fill(0)
            self.blocks_in_tally = 0

    def totals(self) -> IntArray:
        """Return the (n_clients,) number of coordinates counted per row."""
        self.flush()
        return self.counts


def _count_trimmed(counter: _OutsideCounter, block: FloatArray, ordered: FloatArray, num_trimmed: int) -> None:
    """Count the trimmed values of `block`, whose columns `ordered` contains sorted along axis 0.

    Where the values just inside and just outside a cut differ, the trimmed
    values are exactly those below the lowest kept value or above the
    highest. A tie at a cut leaves the choice to a stable sort of the few
    tied columns.
    """
    num_rows = block.shape[0]
    lowest_kept = ordered[num_trimmed]
    highest_kept = ordered[num_rows - num_trimmed - 1]
    is_tied = (ordered[num_trimmed - 1] == lowest_kept) | (ordered[num_rows - num_trimmed] == highest_kept)
    counter.count_outside(block, lowest_kept, highest_kept, is_tied)
    tied = np.flatnonzero(is_tied)
    if tied.size:
        tied_order = np.argsort(block[:, tied], axis=0, kind="stable")
        counter.count_rows(np.concatenate([tied_order[:num_trimmed], tied_order[num_rows - num_trimmed :]]))


def _sort_block_width(stack: Stack, block_columns: int | None) -> int:
    """Columns of the blocks that `_sorted_column_blocks` reads."""
    return block_width(stack.shape[0], itemsize=stack.itemsize, block_bytes=SORT_BLOCK_BYTES, block_columns=block_columns)


def _sorted_column_blocks(stack: Stack, *, span: slice, block_columns: int | None, keep_unsorted: bool = False) -> Iterator[tuple[slice, FloatArray, FloatArray | None]]:
    """Yield (columns, ordered, unsorted) per column block of the columns in `span`.

    `ordered` is the (n_clients, width) block sorted along axis 0.
    `unsorted`, given only with `keep_unsorted`, contains the block's values
    in stack order. On the network route it is the stack's own block,
    gathered once more from a RowStack. On the transposed route it is the
    stack's own block when the stack is one array, which the transposition
    has just brought into cache, and a transposed copy for a RowStack,
    because reading its block again would gather it again. Copies and
    gathered blocks are views of buffers that the next block overwrites. On
    two threads, the trimmed mean of 100 float32 rows of 1e6 values took
    250 ms reading the array's block and 288 ms reading a copy (numpy 2.4.6).
    """
    num_rows = stack.shape[0]
    blocks = column_blocks(num_rows, span.stop, itemsize=stack.itemsize, block_columns=_sort_block_width(stack, block_columns), first=span.start)
    if num_rows <= SORTING_NETWORK_MAX_ROWS:
        for columns, ordered in _network_sorted_blocks(stack, blocks):
            yield columns, ordered, stack[:, columns] if keep_unsorted else None
        return
    copies_unsorted = keep_unsorted and isinstance(stack, RowStack)
    buffer = np.empty((0, num_rows), dtype=stack.dtype)
    copy = np.empty((0, num_rows), dtype=stack.dtype)
    for columns in blocks:
        width = columns.stop - columns.start
        if buffer.shape[0] < width:
            buffer = np.empty((width, num_rows), dtype=stack.dtype)
            copy = np.empty((width, num_rows), dtype=stack.dtype) if copies_unsorted else copy
        rows = buffer[:width]
        for start in range(0, num_rows, TRANSPOSE_TILE_ROWS):
            tile = slice(start, start + TRANSPOSE_TILE_ROWS)
            np.copyto(rows[:, tile], stack[tile, columns].T)
        unsorted = None
        if copies_unsorted:
            np.copyto(copy[:width], rows)
            unsorted = copy[:width].T
        elif keep_unsorted:
            unsorted = stack[:, columns]
        rows.sort(axis=1)
        yield columns, rows.T, unsorted


def _network_sorted_blocks(stack: Stack, blocks: Iterator[slice]) -> Iterator[tuple[slice, FloatArray]]:
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


def closest_to_median_mean(stack: Stack, *, rows: IntArray, num_closest: int, block_columns: int | None = None, threads: int | None = None) -> tuple[Float64Array, IntArray]:
    """Average, per coordinate, the `num_closest` values of `rows` nearest their coordinate-wise median.

    Among values equally far from the median the one from the lower row is
    taken first, as a stable sort of the distances would take them.

    The nearest values of a column are a window of its sorted values, so
    each column block is sorted as for the median (`_sorted_column_blocks`)
    and the window found by comparing the distances of the values that can
    leave it at either end. Where the window's values are strictly nearer
    than every value outside it, which is true unless distances tie at its
    ends, it is the result. The few tied columns are averaged from a stable
    sort of their distances. For 80 float32 rows of 1e6 values on a 2-core
    AMD EPYC (Zen 4) virtual machine, a stable argsort of every column's
    distances took 1.85 s.

    NOTE: the window is summed in sorted order, so float64 values near the
    float64 maximum can overflow to inf where the mean is finite. float32
    stacks cannot overflow here.

    Args:
        stack: (n_clients, n_params); only `rows` are read, and they are finite.
        rows: (n_selected,) ascending row indices.
        num_closest: from 1 to n_selected.
        block_columns: override of the column block width (tests).
        threads: most threads working on column spans (see `map_column_spans`).

    Returns:
        (mean, averaged_counts): the (n_params,) float64 mean and, per entry of
        `rows`, the number of coordinates at which its value was averaged.
    """
    num_selected = rows.size
    num_params = stack.shape[1]
    selected = RowStack([stack[int(row)] for row in rows])
    mean = np.empty(num_params)

    def average_span(span: slice) -> IntArray:
        counter = _OutsideCounter(num_selected)
        window = _ClosestWindow(num_selected, num_closest)
        for columns, ordered, unsorted in _sorted_column_blocks(selected, span=span, block_columns=block_columns, keep_unsorted=True):
            # keep_unsorted=True always yields the unsorted block; the assert tells the type checker.
            assert unsorted is not None
            lowest, highest, is_tied = window.average(ordered, out=mean[columns])
            counter.count_outside(unsorted, lowest, highest, is_tied)
            tied = np.flatnonzero(is_tied)
            if tied.size:
                values = unsorted[:, tied].astype(np.float64)
                median = np.median(values, axis=0)
                order = np.argsort(np.abs(values - median), axis=0, kind="stable")
                mean[columns][tied] = np.take_along_axis(values, order[:num_closest], axis=0).mean(axis=0)
                counter.count_rows(order[num_closest:])
        return counter.totals()

    spans = map_column_spans(average_span, num_rows=num_selected, num_columns=num_params, span_multiple=_sort_block_width(selected, block_columns), threads=threads)
    outside_counts = np.sum(spans, axis=0)
    return mean, num_params - outside_counts


class _ClosestWindow:
    """The window of `num_closest` sorted values nearest the median of each column of a sorted block.

    Sorted values v_0 <= ... <= v_(n-1) lie ever nearer the median m up to
    it and ever farther after it, so the nearest ones form a window
    v_s..v_(s+k-1) of k = num_closest values. Moving the window up by one
    trades v_j for v_(j+k), which pays while |v_j - m| > |v_(j+k) - m|.
    Where the distances at the window's ends differ from those just outside
    it, that is true for j < s and false from s on, so s counts the pairs
    (v_j, v_(j+k)), j < n - k, whose lower value is farther. Otherwise the
    count may miss the window, and `average` reports the column as tied.

    With k > n / 2, as for Bulyan with n > 6f, every window contains
    v_(n-k)..v_(k-1) and, of each pair, the upper value where the lower is
    farther and the lower value otherwise, so the window's sum takes one
    pass over the n - k pairs and a matrix-vector product over the rest.
    Smaller windows are summed through a mask of every sorted value.
    """

    def __init__(self, num_rows: int, num_closest: int) -> None:
        if not 1 <= num_closest <= num_rows:
            raise ValueError(f"num_closest must be from 1 to the {num_rows} rows, got {num_closest}.")
        self.num_rows = num_rows
        self.num_closest = num_closest
        self.num_pairs = num_rows - num_closest
        self.positions = np.arange(num_rows)[:, None]

    def average(self, ordered: FloatArray, *, out: Float64Array) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
        """Write the mean of each column's window into `out` and return its lowest and highest values and the tied columns.

        A column is tied when a value outside its window is no farther from
        the median than the farthest value inside. Its window may not be
        the one a stable sort of the distances picks, and its bounds may
        not tell its rows apart, so the caller averages and counts it again.
        """
        num_rows, num_closest, num_pairs = self.num_rows, self.num_closest, self.num_pairs
        median = np.add(ordered[(num_rows - 1) // 2], ordered[num_rows // 2], dtype=np.float64)
        median /= 2
        lower, upper = ordered[:num_pairs], ordered[num_closest:]
        with np.errstate(over="ignore", invalid="ignore"):
            moves_up = np.abs(lower - median) > np.abs(upper - median)
            starts = np.count_nonzero(moves_up, axis=0)
            if 2 * num_closest > num_rows:
                np.matmul(np.ones(num_closest - num_pairs), ordered[num_pairs:num_closest], out=out)
                out += np.where(moves_up, upper, lower).sum(axis=0, dtype=np.float64)
            else:
                inside = (self.positions >= starts) & (self.positions < starts + num_closest)
                np.sum(np.where(inside, ordered, 0), axis=0, dtype=np.float64, out=out)
            out /= num_closest
            lowest = np.take_along_axis(ordered, starts[None, :], axis=0)[0]
            highest = np.take_along_axis(ordered, (starts + num_closest - 1)[None, :], axis=0)[0]
            below = np.take_along_axis(ordered, np.maximum(starts - 1, 0)[None, :], axis=0)[0]
            above = np.take_along_axis(ordered, np.minimum(starts + num_closest, num_rows - 1)[None, :], axis=0)[0]
            # Distances grow away from the median, so the window's ends are its farthest values and their neighbours the nearest outside it.
            farthest_inside = np.maximum(np.abs(lowest - median), np.abs(highest - median))
            nearest_outside = np.minimum(
                np.where(starts > 0, np.abs(below - median), np.inf), np.where(starts < num_pairs, np.abs(above - median), np.inf)
            )
        return lowest, highest, ~(farthest_inside < nearest_outside)
