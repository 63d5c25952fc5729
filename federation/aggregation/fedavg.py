"""Example-weighted FedAvg (McMahan et al. 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", Algorithm 1).

Pure module: numpy only. The aggregate of updates u_k with example counts
n_k is sum_k (n_k / N) u_k with N = sum_k n_k, taken over the updates that
were actually received (not over every registered node).
"""

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from federation.aggregation.kernels import add_scaled_inplace, all_finite, narrow_to_float32_in_place

FloatArray = npt.NDArray[np.floating]
TensorDict = Mapping[str, FloatArray]


class AggregationError(ValueError):
    """The updates cannot be aggregated into a usable model; the round must fail."""


def weighted_average(
    updates: Iterable[tuple[TensorDict, int]],
    *,
    tensor_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Average named tensors weighted by example counts, one update at a time.

    Reads each update once and keeps only a float64 running sum, so memory
    is O(model size) whatever the number of updates: the sum, whose buffer
    then contains the float32 result, and small block buffers. Counts are summed as Python integers,
    which cannot overflow.

    Args:
        updates: (tensors, num_examples) pairs; every update carries exactly
            `tensor_names`, with equal shapes across updates.
        tensor_names: names of the tensors to average.

    Returns:
        name -> float32 array, the weighted mean.

    Raises:
        AggregationError: no updates, a negative count, a total weight of
            zero, mismatched tensors, or a non-finite input or result.
    """
    sums: dict[str, np.ndarray] | None = None
    total_examples = 0
    for index, (tensors, num_examples) in enumerate(updates):
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
            raise AggregationError(f"Update {index} has example count {num_examples!r}; counts must be non-negative integers.")
        if set(tensors) != set(tensor_names):
            raise AggregationError(f"Update {index} has tensors {sorted(tensors)}, expected {sorted(tensor_names)}.")
        if sums is None:
            sums = {name: np.zeros(np.shape(tensors[name]), dtype=np.float64) for name in tensor_names}
        for name in tensor_names:
            values = np.asarray(tensors[name])
            if values.shape != sums[name].shape:
                raise AggregationError(f"Update {index} has tensor {name!r} of shape {values.shape}, expected {sums[name].shape}.")
            _require_finite(values, index=index, name=name)
            # sums += n_k * u_k in float64, in blocks, so no float64 copy of u_k is made.
            add_scaled_inplace(sums[name], values, float(num_examples))
        total_examples += int(num_examples)

    if sums is None:
        raise AggregationError("No updates to aggregate.")
    if total_examples == 0:
        raise AggregationError("The total weight is zero: every update reported 0 examples.")

    result = {}
    for name in tensor_names:
        # Divided and cast in place, so the peak is the float64 sum and the
        # float32 mean shares its buffer.
        np.divide(sums[name], total_examples, out=sums[name])
        # Checked after the cast: a finite float64 mean can overflow float32.
        mean = narrow_to_float32_in_place(sums[name])
        sums[name] = mean
        if not np.all(np.isfinite(mean)):
            raise AggregationError(f"The average of tensor {name!r} is not finite in float32.")
        result[name] = mean
    return result


def _require_finite(values: np.ndarray, *, index: int, name: str) -> None:
    if not all_finite(values):
        raise AggregationError(f"Update {index} has non-finite values in tensor {name!r}.")


def apply_update(base: TensorDict, delta: TensorDict) -> dict[str, np.ndarray]:
    """Return base + delta per tensor as float32, refusing a non-finite result.

    Raises:
        AggregationError: when the tensors differ or the sum is not finite.
    """
    if set(base) != set(delta):
        raise AggregationError(f"Base tensors {sorted(base)} differ from update tensors {sorted(delta)}.")
    result = {}
    for name, base_values in base.items():
        base_array, delta_array = np.asarray(base_values), np.asarray(delta[name])
        with np.errstate(over="ignore"):
            if base_array.dtype == np.float32 and delta_array.dtype == np.float32:
                # The float32 sum, rounded once, equals the float64 sum rounded
                # to float32, because float64 has at least 2 * 24 + 2 significand bits.
                summed = np.add(base_array, delta_array)
            else:
                summed = (base_array.astype(np.float64) + delta_array.astype(np.float64)).astype(np.float32)
        if not all_finite(summed):
            raise AggregationError(f"The new model has non-finite values in tensor {name!r}.")
        result[name] = summed
    return result
