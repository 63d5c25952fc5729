"""User-level DP-FedAvg: clip each client's update, sum, add Gaussian noise once, divide by a fixed denominator.

Pure module: numpy only. It implements the server side of DP-FedAvg from
McMahan, Ramage, Talwar and Zhang 2018, "Learning Differentially Private
Recurrent Language Models" (ICLR, arXiv:1710.06963), Algorithm 1 with the
fixed-denominator estimator and uniform user weights. Andrew, Thakkar,
McMahan and Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS, arXiv:1905.03871) use the same aggregate with a clip
norm that adapts each round, which `privacy.adaptive_clipping` computes.

Neighbouring datasets differ by adding or removing all data of one user.
Each user is sampled into a round's cohort independently with probability
q (Poisson sampling), so the cohort has q * N users on average, where N is
the population. One round with noise multiplier z is then
dp_accounting's PoissonSampledDpEvent(q, GaussianDpEvent(z)).

Why the noise is sized for the sum and the division comes last: adding or
removing one user changes the sum of clipped updates by at most C in L2
norm. N(0, (z C)^2) noise on each coordinate of the sum is therefore the
Gaussian mechanism with noise multiplier z. Dividing the noisy sum by the public
constant m = q * N afterwards is post-processing, which costs no privacy,
and leaves noise of standard deviation z C / m on the mean. Dividing first
and then adding noise sized for the sum gives the mean m times more noise
than the accountant assumes, which costs accuracy and buys no privacy. An
example script of jax_privacy (examples/jax_api_example.py) was reported in
2026 to have this bug. The reverse mistake,
noise of z C / m added to the sum, breaks the guarantee.

Why the denominator is fixed: dividing by the realised cohort size k would
let one user's presence rescale every other user's contribution, so the
sensitivity of the mean would no longer be C / m.
"""

import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from federation.aggregation.fedavg import AggregationError
from federation.aggregation.kernels import (
    PARALLEL_MIN_VALUES,
    RowStack,
    Stack,
    add_scaled_inplace,
    available_cpus,
    row_squared_norms,
    squared_norm,
    weighted_sum,
)
from privacy.noise import gaussian_noise, require_finite_real, require_non_negative_finite

Float64Array = npt.NDArray[np.float64]
TensorShapes = Mapping[str, tuple[int, ...]]

# Array dtype kinds accepted in updates: floating point, signed and unsigned integers.
_REAL_DTYPE_KINDS = "fiu"


@dataclass(frozen=True, eq=False)
class DpAggregate:
    """One noised release of DP-FedAvg and the server-side statistics behind it.

    Only `mean` is differentially private. `num_updates`, `num_clipped` and
    `norms` describe the raw cohort, so keep them on the server. The
    unclipped count may leave it only through
    `privacy.adaptive_clipping.update_clip_norm`, which adds its own noise.

    Attributes:
        mean: Tensor name -> (sum of clipped updates + noise) / expected_participants,
            float32, with the shapes of `tensor_shapes`.
        num_updates: Number of updates received, k >= 0.
        num_clipped: Number of updates whose L2 norm exceeded the clip norm.
        norms: L2 norm of each update before clipping, over all tensors
            jointly, in arrival order, shape (k,), float64.
        noise_std_of_sum: Standard deviation of the noise in each coordinate of
            the sum before the division, in update units. It is
            noise_multiplier * clip_norm server-side, and
            noise_multiplier * clip_norm * sqrt(k / expected_participants)
            with client-side noise.
    """

    mean: dict[str, np.ndarray]
    num_updates: int
    num_clipped: int
    norms: Float64Array
    noise_std_of_sum: float


def clip_update(tensors: Mapping[str, npt.ArrayLike], *, clip_norm: float) -> tuple[dict[str, Float64Array], float]:
    """Scale an update by min(1, C / ||u||), with the L2 norm over all tensors jointly.

    Args:
        tensors: Tensor name -> array of any shape, real and finite. Not modified.
        clip_norm: Maximum L2 norm C, positive and finite.

    Returns:
        (clipped, norm): the clipped update as new float64 arrays with the
        input's names and shapes, and ||u||, the L2 norm before clipping.
        An update with ||u|| <= C comes back with equal values.

    Raises:
        ValueError: if clip_norm is not positive and finite, or a tensor is
            not a real numeric array or has NaN or infinite values.
    """
    clip_norm = _require_positive_finite("clip_norm", clip_norm)
    values = {}
    for name, array in tensors.items():
        values[name] = _as_finite_float64(array, description=f"Tensor {name!r}")
    return _clip(values, clip_norm)


def dp_fedavg_aggregate(
    updates: Iterable[Mapping[str, npt.ArrayLike]],
    *,
    tensor_shapes: TensorShapes,
    clip_norm: float,
    noise_multiplier: float,
    expected_participants: float,
    rng: np.random.Generator,
    client_side_noise: bool = False,
) -> DpAggregate:
    """Clip each update to L2 norm C, sum, add N(0, (z C)^2) once and divide by m.

    Reads the updates one at a time and keeps a float64 running sum, so memory
    is O(model size) whatever the cohort size. Each update is read twice, for
    its norm and for the sum, in float64 blocks and without a float64 copy. The division is always by
    m = `expected_participants`, never by the number of updates received.

    An empty cohort still releases noise / m. Poisson sampling makes empty
    cohorts possible, and the accountant charges every round whatever its
    cohort, so every call is one noised release and one accountant step.

    Client-side noise models distributed DP: each client adds
    N(0, (z C)^2 / m) to its clipped update and the server adds nothing.
    NOTE: the sum then carries noise of standard deviation z C only when at
    least m clients report. With k < m reports it has z C sqrt(k / m), a
    weaker guarantee than the accountant assumes, and an empty cohort
    releases exact zeros. Under Poisson sampling k < m in about half of all
    rounds, so compare `noise_std_of_sum` with z C to find the rounds whose
    guarantee is weaker than the accountant records. The configuration also
    needs secure aggregation. Without it, the server receives each noisy
    update, which carries only noise multiplier z / sqrt(m).

    Args:
        updates: Each client's model delta, tensor name -> array with exactly
            the names and shapes of `tensor_shapes`, real and finite. Not modified.
        tensor_shapes: Tensor name -> expected shape. The result and the
            noise follow this order.
        clip_norm: Clip norm C, positive, in update units.
        noise_multiplier: Noise multiplier z, at least 0. Pass the noise
            multiplier of the update sum (z_delta when the clip norm adapts).
        expected_participants: Expected cohort size m = q * N, positive.
        rng: Source of the noise. Use `privacy.noise.secure_generator()` for real users.
        client_side_noise: Whether each client adds its share of the noise
            instead of the server adding all of it.

    Returns:
        The noised mean and the cohort statistics, see DpAggregate.

    Raises:
        ValueError: if clip_norm or expected_participants is not positive and
            finite, noise_multiplier is negative or not finite, or
            tensor_shapes is empty or has an invalid shape.
        AggregationError: if an update has missing or extra tensors, a wrong
            shape, a non-numeric dtype or a NaN or infinite value, or the
            mean overflows float32.
    """
    shapes = _validate_tensor_shapes(tensor_shapes)
    clip_norm = _require_positive_finite("clip_norm", clip_norm)
    noise_multiplier = require_non_negative_finite("noise_multiplier", noise_multiplier)
    expected_participants = _require_positive_finite("expected_participants", expected_participants)
    if not isinstance(client_side_noise, bool):
        raise ValueError(f"client_side_noise must be True or False, got {client_side_noise!r}.")

    full_noise_std = noise_multiplier * clip_norm
    # Per-client share: m independent N(0, s^2 / m) draws sum to N(0, s^2).
    client_noise_std = full_noise_std / math.sqrt(expected_participants)

    sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
    norms: list[float] = []
    for index, update in enumerate(updates):
        values = _checked_update(index, update, shapes)
        norm = _joint_l2_norm_of_update(index, values)
        norms.append(norm)
        # min(1, C / ||u||), applied while adding, so the clipped update is never materialised.
        scale = 1.0 if norm <= clip_norm else clip_norm / norm
        for name, shape in shapes.items():
            add_scaled_inplace(sums[name], values[name], scale)
            if client_side_noise:
                sums[name] += gaussian_noise(shape, std=client_noise_std, rng=rng)

    if client_side_noise:
        noise_std_of_sum = client_noise_std * math.sqrt(len(norms))
    else:
        noise_std_of_sum = full_noise_std
        for name, shape in shapes.items():
            sums[name] += gaussian_noise(shape, std=full_noise_std, rng=rng)

    norms_array = np.asarray(norms, dtype=np.float64)
    return DpAggregate(
        mean=_divide_to_float32(sums, expected_participants),
        num_updates=len(norms),
        num_clipped=int(np.count_nonzero(norms_array > clip_norm)),
        norms=norms_array,
        noise_std_of_sum=noise_std_of_sum,
    )


def dp_fedavg_aggregate_stack(
    updates: Stack,
    *,
    tensor_shapes: TensorShapes,
    clip_norm: float,
    noise_multiplier: float,
    expected_participants: float,
    rng: np.random.Generator,
) -> DpAggregate:
    """Release the server-side-noise DP-FedAvg mean of updates already stacked as rows.

    Gives the release of `dp_fedavg_aggregate` with client_side_noise=False
    for the same updates and generator state: the same norms, clipping and
    noise draws, in the same tensor order. Instead of two passes per update,
    it makes one pass for all the L2 norms and then computes sum_i c_i u_i,
    with c_i = min(1, C / ||u_i||), as one weighted sum
    (`kernels.weighted_sum`: matrix-vector products for an array, row by
    row for a RowStack), which sums float32 rows in float32 chunks of
    `kernels.FLOAT32_TERMS` before adding them in float64.

    Float32 rows of at least `kernels.FLOAT32_NORM_TERMS` values get their
    norms from float32 partial sums (`kernels.row_squared_norms`), within
    a relative 8e-6 of the float64 norm. Such a row is clipped as if its
    norm were at the top of that interval, and every float32 row as if its
    norm were 1.2e-7 larger, which covers the float32 rounding of its
    scale. So a row at the clip norm can be scaled by 1 - 8.1e-6 more than
    the streamed path scales it, and `num_clipped` counts it.

    On a stack of at least `kernels.PARALLEL_MIN_VALUES` values the
    noise of every tensor is drawn on another thread while the updates are
    read. Each tensor's noise is freed once added, and the sums are divided
    in place, so the peak is 4 float32 model copies: the float64 sum and
    the float64 noise. Such a stack draws the noise from `rng` even when an
    update is then rejected.

    Args:
        updates: (k, n_params) float32 or float64 array, or a `RowStack`,
            each row an update flattened in the order of `tensor_shapes`,
            finite. Not modified.
        tensor_shapes: Tensor name -> shape, sizes summing to n_params.
        clip_norm: Clip norm C, positive, in update units.
        noise_multiplier: Noise multiplier z, at least 0.
        expected_participants: Expected cohort size m = q * N, positive.
        rng: Source of the noise. Use `privacy.noise.secure_generator()` for real users.

    Returns:
        The noised mean and the cohort statistics, see DpAggregate.

    Raises:
        ValueError: as `dp_fedavg_aggregate` for the parameters, or
            noise_multiplier * clip_norm overflows.
        AggregationError: `updates` is not a 2-D float32 or float64 array
            of n_params columns, a row has a NaN or infinite value, or the
            mean overflows float32.
    """
    shapes = _validate_tensor_shapes(tensor_shapes)
    clip_norm = _require_positive_finite("clip_norm", clip_norm)
    noise_multiplier = require_non_negative_finite("noise_multiplier", noise_multiplier)
    expected_participants = _require_positive_finite("expected_participants", expected_participants)
    stack = updates if isinstance(updates, RowStack) else np.asarray(updates)
    sizes = [math.prod(shape) for shape in shapes.values()]
    if stack.ndim != 2 or stack.shape[1] != sum(sizes) or stack.dtype not in (np.float32, np.float64):
        raise AggregationError(f"Expected float32 or float64 updates of shape (k, {sum(sizes)}), got shape {stack.shape} and dtype {stack.dtype}.")
    noise_std_of_sum = noise_multiplier * clip_norm
    if not math.isfinite(noise_std_of_sum):
        raise ValueError(f"noise_multiplier * clip_norm must be finite, got {noise_multiplier} * {clip_norm}.")

    def draw_noise() -> list[Float64Array]:
        return [gaussian_noise(shape, std=noise_std_of_sum, rng=rng) for shape in shapes.values()]

    if stack.shape[0] * stack.shape[1] < PARALLEL_MIN_VALUES or available_cpus() == 1:
        total, norms, bounds = _clipped_sum(stack, clip_norm)
        draws = draw_noise()
    else:
        # The noise does not depend on the updates, so it is drawn on another
        # thread while the updates are read. For 100 float32 rows of 1e6
        # values the call took 68 to 80 ms against 74 to 93 ms drawing
        # afterwards, on the Intel machine of BENCHMARKS.md. Only that thread uses `rng`,
        # in tensor order, so the draws are those of the other branch. An error in the updates leaves the block, whose exit
        # waits for the draws, so no thread uses `rng` after the return.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flo-dp-noise") as pool:
            noise = pool.submit(draw_noise)
            total, norms, bounds = _clipped_sum(stack, clip_norm)
            draws = noise.result()
    sums = {}
    for (name, shape), piece in zip(shapes.items(), np.split(total, np.cumsum(sizes)[:-1]), strict=True):
        sums[name] = piece.reshape(shape)
        # Each draw leaves the list as it is added, so none is held during the division.
        sums[name] += draws.pop(0)
    return DpAggregate(
        mean=_divide_to_float32(sums, expected_participants),
        num_updates=stack.shape[0],
        num_clipped=int(np.count_nonzero(bounds > clip_norm)),
        norms=norms,
        noise_std_of_sum=noise_std_of_sum,
    )


def _clipped_sum(stack: Stack, clip_norm: float) -> tuple[Float64Array, Float64Array, Float64Array]:
    """Return (sum_i c_i u_i, the rows' L2 norms, the upper bounds of the norms that set c_i) for c_i = min(1, C / bound_i)."""
    squared_norms, relative_error = row_squared_norms(stack)
    norms = np.sqrt(squared_norms)
    for index in np.flatnonzero(~np.isfinite(squared_norms)):
        if not np.all(np.isfinite(stack[index])):
            raise AggregationError(f"Update {int(index)} contains NaN or infinite values.")
        # A finite row whose squares overflow float64.
        norms[index] = _joint_l2_norm([stack[index].astype(np.float64)])
    # Clipping uses an upper bound of each norm, so no clipped update can
    # exceed C through the rounding of a float32 partial sum. For float32
    # rows, weighted_sum also rounds each scale to float32, which 2**-22
    # more in the squared norm covers.
    if stack.dtype == np.float32:
        relative_error += 2.0**-22
    bounds = norms * math.sqrt(1.0 + relative_error)
    # min(1, C / ||u||), written so that a zero norm (never above C) needs no division.
    scales = np.ones_like(norms)
    np.divide(clip_norm, bounds, out=scales, where=bounds > clip_norm)
    with np.errstate(over="ignore", invalid="ignore"):
        return weighted_sum(stack, scales), norms, bounds


def _clip(values: dict[str, Float64Array], clip_norm: float) -> tuple[dict[str, Float64Array], float]:
    norm = _joint_l2_norm(values.values())
    if norm <= clip_norm:
        return values, norm
    scale = clip_norm / norm
    return {name: array * scale for name, array in values.items()}, norm


def _joint_l2_norm(arrays: Iterable[Float64Array]) -> float:
    arrays = list(arrays)
    with np.errstate(over="ignore"):
        squared_norm = math.fsum(float(np.dot(array.ravel(), array.ravel())) for array in arrays)
    if math.isfinite(squared_norm):
        return math.sqrt(squared_norm)
    # Squares of finite values above about 1e154 overflow float64. Then use
    # ||u|| = s * ||u / s|| with s = max |u_i|, whose terms are all <= 1.
    largest = max(float(np.max(np.abs(array), initial=0.0)) for array in arrays)
    scaled_squared_norm = math.fsum(float(np.dot(array.ravel() / largest, array.ravel() / largest)) for array in arrays)
    return largest * math.sqrt(scaled_squared_norm)


def _checked_update(index: int, update: Mapping[str, npt.ArrayLike], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Check names, dtypes and shapes of one update and return its arrays as they are (no copy)."""
    if not isinstance(update, Mapping):
        raise AggregationError(f"Update {index} is a {type(update).__name__}, expected a mapping from tensor name to array.")
    if set(update) != set(shapes):
        missing = sorted(set(shapes) - set(update))
        extra = sorted(str(name) for name in set(update) - set(shapes))
        raise AggregationError(f"Update {index} has the wrong tensors: {missing} are missing and {extra} are unexpected.")
    values = {}
    for name, shape in shapes.items():
        array = np.asarray(update[name])
        description = f"Update {index} tensor {name!r}"
        if array.dtype.kind not in _REAL_DTYPE_KINDS:
            raise AggregationError(f"{description} has dtype {array.dtype}, expected a real floating-point or integer dtype.")
        if array.shape != shape:
            raise AggregationError(f"{description} has shape {array.shape}, expected {shape}.")
        values[name] = array
    return values


def _joint_l2_norm_of_update(index: int, values: dict[str, np.ndarray]) -> float:
    """Return the L2 norm over all tensors in float64, raising if a value is NaN or infinite."""
    squared_norm_total = math.fsum(squared_norm(array) for array in values.values())
    if math.isfinite(squared_norm_total):
        # A NaN or infinity would have made the sum of squares non-finite.
        return math.sqrt(squared_norm_total)
    for name, array in values.items():
        if not np.all(np.isfinite(array)):
            raise AggregationError(f"Update {index} tensor {name!r} contains NaN or infinite values.")
    return _joint_l2_norm([np.asarray(array, dtype=np.float64) for array in values.values()])


def _as_finite_float64(array_like: npt.ArrayLike, *, description: str) -> Float64Array:
    array = np.asarray(array_like)
    if array.dtype.kind not in _REAL_DTYPE_KINDS:
        raise ValueError(f"{description} has dtype {array.dtype}, expected a real floating-point or integer dtype.")
    # np.array copies, so the caller's arrays are never modified.
    values = np.array(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{description} contains NaN or infinite values.")
    return values


def _divide_to_float32(sums: dict[str, Float64Array], denominator: float) -> dict[str, np.ndarray]:
    """Return the float32 quotients of the sums, which are divided in place, so no float64 temporary is made."""
    result = {}
    for name, total in sums.items():
        # Checked after the cast: a finite float64 mean can overflow float32.
        with np.errstate(over="ignore"):
            np.divide(total, denominator, out=total)
            mean = total.astype(np.float32)
        if not np.all(np.isfinite(mean)):
            raise AggregationError(f"The noised mean of tensor {name!r} is not finite in float32.")
        result[name] = mean
    return result


def _validate_tensor_shapes(tensor_shapes: TensorShapes) -> dict[str, tuple[int, ...]]:
    if not isinstance(tensor_shapes, Mapping) or not tensor_shapes:
        raise ValueError(f"tensor_shapes must be a non-empty mapping from tensor name to shape, got {tensor_shapes!r}.")
    shapes = {}
    for name, shape in tensor_shapes.items():
        try:
            dimensions = tuple(int(size) for size in shape)
        except (TypeError, ValueError):
            raise ValueError(f"tensor_shapes[{name!r}] must be a tuple of integers, got {shape!r}.") from None
        if any(size < 0 for size in dimensions) or dimensions != tuple(shape):
            raise ValueError(f"tensor_shapes[{name!r}] must contain non-negative integers, got {shape!r}.")
        shapes[name] = dimensions
    return shapes


def _require_positive_finite(name: str, value: object) -> float:
    value = require_finite_real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    return value
