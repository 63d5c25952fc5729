"""Coordinate-wise order statistics over a stack of flattened updates, (n_clients, n_params).

Pure module: numpy only. The median, the trimmed mean and Bulyan's
closest-to-median mean sort or select the n_clients values of every
coordinate. They work on column blocks of about COLUMN_BLOCK_BYTES, so their
extra memory is bounded whatever the number of parameters, and never copy
or modify the stack.
"""

import numpy as np

from federation.aggregation.kernels import Float64Array, FloatArray, IntArray, column_blocks


def coordinate_median(stack: FloatArray, *, block_columns: int | None = None) -> Float64Array:
    """Compute the coordinate-wise median, as np.median(stack, axis=0) in float64.

    Each column block is transposed into a (block, n_clients) copy so that
    np.partition selects along contiguous rows, where numpy 2 uses its SIMD
    selection. Extra memory is two blocks. For an even count the median is the
    mean of the two middle values, the lower of which is the largest value
    left of the partition point.

    Args:
        stack: (n_clients, n_params) finite values, n_clients >= 1.

    Returns:
        (n_params,) float64.
    """
    num_rows, num_params = stack.shape
    middle = num_rows // 2
    median = np.empty(num_params)
    for columns in column_blocks(num_rows, num_params, itemsize=stack.itemsize, block_columns=block_columns):
        values = np.ascontiguousarray(stack[:, columns].T)
        values.partition(middle, axis=1)
        upper = values[:, middle].astype(np.float64)
        if num_rows % 2:
            median[columns] = upper
        else:
            median[columns] = (values[:, :middle].max(axis=1).astype(np.float64) + upper) / 2
    return median


def trimmed_mean(stack: FloatArray, *, num_trimmed: int, block_columns: int | None = None) -> tuple[Float64Array, IntArray]:
    """Compute the coordinate-wise trimmed mean and how many coordinates each row kept.

    Per coordinate, the num_trimmed smallest and largest values are dropped and
    the other n - 2 * num_trimmed are summed in float64 and divided. Values
    equal to a boundary are kept in ascending row order, as a stable sort would.

    Args:
        stack: (n_clients, n_params) finite values.
        num_trimmed: values cut from each end, with n_clients - 2 * num_trimmed >= 1.

    Returns:
        (mean, kept_counts): the (n_params,) float64 trimmed mean, which is
        inf when the float64 sum overflows, and the (n_clients,) number of
        coordinates at which each row was kept.
    """
    num_rows, num_params = stack.shape
    num_kept = num_rows - 2 * num_trimmed
    mean = np.empty(num_params)
    kept_counts = np.zeros(num_rows, dtype=np.int64)
    for columns in column_blocks(num_rows, num_params, itemsize=stack.itemsize, block_columns=block_columns):
        values = np.ascontiguousarray(stack[:, columns].T)
        # Summing in sorted order, even with nothing trimmed, makes the rounding independent of the row order.
        ordered = np.sort(values, axis=1)
        with np.errstate(over="ignore"):
            mean[columns] = ordered[:, num_trimmed : num_rows - num_trimmed].sum(axis=1, dtype=np.float64) / num_kept
        if num_trimmed:
            kept_counts += _count_kept(values, ordered, num_trimmed=num_trimmed)
        else:
            kept_counts += values.shape[0]
    return mean, kept_counts


def _count_kept(values: FloatArray, ordered: FloatArray, *, num_trimmed: int) -> IntArray:
    """Count, per row of the stack, the coordinates of this block at which its value was kept."""
    num_rows = values.shape[1]
    lowest = ordered[:, num_trimmed : num_trimmed + 1]
    highest = ordered[:, num_rows - num_trimmed - 1 : num_rows - num_trimmed]
    is_kept = (values >= lowest) & (values <= highest)
    # With a tie at a boundary more values than n - 2k fall inside it; those
    # coordinates are settled by a stable sort, which keeps lower rows first.
    tied = np.flatnonzero(np.count_nonzero(is_kept, axis=1) != num_rows - 2 * num_trimmed)
    if tied.size:
        order = np.argsort(values[tied], axis=1, kind="stable")[:, num_trimmed : num_rows - num_trimmed]
        fixed = np.zeros((tied.size, num_rows), dtype=bool)
        np.put_along_axis(fixed, order, True, axis=1)
        is_kept[tied] = fixed
    return np.count_nonzero(is_kept, axis=0)


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
