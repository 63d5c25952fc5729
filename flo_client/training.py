"""Local training on a device: minibatch SGD, or DP-SGD with record-level privacy.

A training plan comes from the server as JSON (`TrainingPlan.from_dict`). A
device runs `train_locally` from the global weights of the round and sends
`compute_update(new_weights, global_weights)`, the model delta. With a
positive `proximal_mu`, either kind of training adds FedProx's proximal term.
"""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flo_client.models import (
    DenseGradientFactors,
    FloatArray,
    IntArray,
    Weights,
    backpropagate,
    compute_per_example_gradient_norms,
    sum_gradients,
    validate_examples,
    validate_model_spec,
    validate_weights,
)

# Lower bound on a gradient norm before dividing by it. A zero gradient then
# gets the scale clip_norm / _MIN_NORM, which is harmless because it multiplies zero.
_MIN_NORM = 1e-12


@dataclass(frozen=True)
class LocalDpConfig:
    """Parameters of DP-SGD on one device.

    The privacy cost of one `train_locally` call is `local_steps` compositions
    of the Poisson-subsampled Gaussian mechanism with sampling rate q =
    `sampling_rate` and noise multiplier sigma = `noise_multiplier`.

    Attributes:
        clip_norm: Maximum L2 norm C of one example's gradient, over all tensors jointly.
        noise_multiplier: Ratio sigma of the noise standard deviation to clip_norm.
        sampling_rate: Probability q with which each local example joins a step's batch, in (0, 1].
        local_steps: Number of DP-SGD steps per call, at least 1.
    """

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    local_steps: int

    def __post_init__(self) -> None:
        clip_norm = _require_finite_real("clip_norm", self.clip_norm)
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}.")
        noise_multiplier = _require_finite_real("noise_multiplier", self.noise_multiplier)
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be at least 0, got {noise_multiplier}.")
        sampling_rate = _require_finite_real("sampling_rate", self.sampling_rate)
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
        local_steps = _require_positive_int("local_steps", self.local_steps)
        object.__setattr__(self, "clip_norm", clip_norm)
        object.__setattr__(self, "noise_multiplier", noise_multiplier)
        object.__setattr__(self, "sampling_rate", sampling_rate)
        object.__setattr__(self, "local_steps", local_steps)


@dataclass(frozen=True)
class TrainingPlan:
    """Local training settings that the server sends to devices for a round.

    Attributes:
        learning_rate: SGD step size, positive.
        batch_size: Minibatch size of plain SGD, at least 1. DP-SGD ignores it
            and samples batches with `dp.sampling_rate`.
        local_epochs: Passes over the local data in plain SGD, at least 1.
            DP-SGD ignores it and runs `dp.local_steps` steps.
        dp: DP-SGD parameters, or None for plain SGD.
        proximal_mu: FedProx's mu, at least 0. A positive mu adds
            (mu / 2) * ||w - w_global||^2 to the local objective, which keeps
            the local weights near the round's global weights. 0, the default,
            turns FedProx off. learning_rate * proximal_mu must be below 2,
            because each step multiplies w - w_global by 1 - learning_rate * mu,
            which shrinks it only while its magnitude is below 1.
    """

    learning_rate: float
    batch_size: int
    local_epochs: int
    dp: LocalDpConfig | None = None
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        learning_rate = _require_finite_real("learning_rate", self.learning_rate)
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
        object.__setattr__(self, "learning_rate", learning_rate)
        object.__setattr__(self, "batch_size", _require_positive_int("batch_size", self.batch_size))
        object.__setattr__(self, "local_epochs", _require_positive_int("local_epochs", self.local_epochs))
        if self.dp is not None and not isinstance(self.dp, LocalDpConfig):
            raise ValueError(f"dp must be a LocalDpConfig or None, got {type(self.dp).__name__}.")
        proximal_mu = _require_finite_real("proximal_mu", self.proximal_mu)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be at least 0, got {proximal_mu}.")
        if learning_rate * proximal_mu >= 2:
            raise ValueError(
                f"learning_rate * proximal_mu is {learning_rate} * {proximal_mu} = {learning_rate * proximal_mu}, "
                "but local training is unstable unless it is below 2. Lower learning_rate or proximal_mu."
            )
        object.__setattr__(self, "proximal_mu", proximal_mu)

    @classmethod
    def from_dict(cls, data: Mapping) -> "TrainingPlan":
        """Build a plan from its JSON form, as produced by `to_dict`.

        Raises:
            ValueError: on a missing, unknown or invalid key, naming it.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"Training plan must be a mapping, got {type(data).__name__}.")
        _check_keys("Training plan", data, required=("learning_rate", "batch_size", "local_epochs"), optional=("dp", "proximal_mu"))
        dp_data = data.get("dp")
        dp = None
        if dp_data is not None:
            if not isinstance(dp_data, Mapping):
                raise ValueError(f"Training plan 'dp' must be a mapping or null, got {type(dp_data).__name__}.")
            dp_fields = ("clip_norm", "noise_multiplier", "sampling_rate", "local_steps")
            _check_keys("Training plan 'dp'", dp_data, required=dp_fields, optional=())
            dp = LocalDpConfig(**{field: dp_data[field] for field in dp_fields})
        return cls(
            learning_rate=data["learning_rate"],
            batch_size=data["batch_size"],
            local_epochs=data["local_epochs"],
            dp=dp,
            proximal_mu=data.get("proximal_mu", 0.0),
        )

    def to_dict(self) -> dict:
        """Return the JSON-safe form of the plan, with "dp" set to None (JSON null) without DP.

        "proximal_mu" appears only when it is positive, so that devices whose
        SDK predates FedProx, and rejects unknown keys, can still read plans without it.
        """
        dp = None
        if self.dp is not None:
            dp = {
                "clip_norm": self.dp.clip_norm,
                "noise_multiplier": self.dp.noise_multiplier,
                "sampling_rate": self.dp.sampling_rate,
                "local_steps": self.dp.local_steps,
            }
        data = {
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "local_epochs": self.local_epochs,
            "dp": dp,
        }
        if self.proximal_mu > 0:
            data["proximal_mu"] = self.proximal_mu
        return data


def train_locally(
    spec: Mapping,
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    plan: TrainingPlan,
    *,
    rng: np.random.Generator,
) -> Weights:
    """Train a copy of the weights on the local examples and return it.

    Without `plan.dp`, this runs `plan.local_epochs` epochs of minibatch SGD
    on the mean softmax cross-entropy. Each epoch visits the examples in a new
    random order, in batches of `plan.batch_size` (the last batch may be smaller).

    With `plan.dp`, this runs DP-SGD as in Abadi et al. 2016, "Deep Learning
    with Differential Privacy" (arXiv:1607.00133), Algorithm 1, with Poisson
    sampling. Each of the `local_steps` steps:

    1. Sample each local example independently with probability q.
    2. Clip each sampled example's gradient to L2 norm C (all tensors jointly).
    3. Sum the clipped gradients and add N(0, (sigma * C)^2) to every coordinate.
    4. Divide by the expected batch size q * n. Dividing by the realised batch
       size would let one example rescale every other example's contribution,
       which the sensitivity bound of C does not cover.
    5. Take an SGD step with `plan.learning_rate`.

    An empty batch still adds noise and counts as a step. Each call then
    satisfies the guarantee of `local_steps` compositions of the
    Poisson-subsampled Gaussian mechanism for add-or-remove-one-example
    neighbours, which dp_accounting's PoissonSampledDpEvent(q,
    GaussianDpEvent(sigma)) accounts for.

    With `plan.proximal_mu` = mu > 0, both kinds of training minimise
    F_k(w) + (mu / 2) * ||w - w_global||^2 instead of the local loss F_k
    alone, as in FedProx (Li et al. 2020, "Federated Optimization in
    Heterogeneous Networks", MLSys, equation 2), where w_global is `weights`.
    Every step adds the proximal gradient mu * (w - w_global) to the step's
    gradient estimate. That gradient is 0 in the first step, which starts at w_global.

    NOTE: the example count n is treated as public. The scale 1 / (q * n)
    depends on it, and example-weighted FedAvg sends it to the server anyway.
    The noise is ordinary floating-point Gaussian sampling from `rng`, so on a
    device pass an unseeded `np.random.default_rng()` to keep it unpredictable.

    Args:
        spec: Model spec.
        weights: Starting weights, which are not modified.
        features: Shape (n, F), n >= 1.
        labels: Shape (n,), class ids in [0, C).
        plan: Training plan.
        rng: Source of the shuffling, the Poisson sampling and the noise.

    Returns:
        New float32 weights with the same names and shapes.

    Raises:
        ValueError: if the spec, weights or examples are invalid, if there are
            no examples, or if training diverges to non-finite weights.
    """
    spec = validate_model_spec(spec)
    validate_weights(spec, weights)
    features, labels = validate_examples(spec, features, labels)
    if labels.size == 0:
        raise ValueError("Cannot train on zero local examples. Leave devices without data out of the round.")

    parameters: dict[str, FloatArray] = {name: np.array(array, dtype=np.float64) for name, array in weights.items()}
    global_parameters: dict[str, FloatArray] = {name: np.array(array, dtype=np.float64) for name, array in weights.items()}
    if plan.dp is None:
        _run_sgd_inplace(spec, parameters, global_parameters, features, labels, plan, rng=rng)
    else:
        _run_dp_sgd_inplace(spec, parameters, global_parameters, features, labels, plan.learning_rate, plan.dp, proximal_mu=plan.proximal_mu, rng=rng)

    if not all(np.all(np.isfinite(array)) for array in parameters.values()):
        raise ValueError(
            f"Local training diverged to NaN or infinite weights. Lower learning_rate (now {plan.learning_rate})."
        )
    return {name: array.astype(np.float32) for name, array in parameters.items()}


def clip_and_sum_gradients(factors: list[DenseGradientFactors], *, clip_norm: float) -> Weights:
    """Clip each example's gradient to L2 norm `clip_norm` and sum the clipped gradients.

    Example i is scaled by min(1, clip_norm / ||g_i||), where ||g_i|| is the
    norm over all tensors jointly, so each example adds at most `clip_norm` to the sum.

    Args:
        factors: Output of `compute_gradient_factors` or `backpropagate` for n examples, n may be 0.
        clip_norm: Maximum L2 norm C, positive.

    Returns:
        Tensor name -> summed clipped gradient, float64.
    """
    norms = compute_per_example_gradient_norms(factors)
    scales = np.minimum(1.0, clip_norm / np.maximum(norms, _MIN_NORM))
    return sum_gradients(factors, example_scales=scales)


def compute_update(new_weights: Mapping[str, np.ndarray], base_weights: Mapping[str, np.ndarray]) -> Weights:
    """Compute the model delta `new - base` that a device sends, per tensor, as float32.

    The subtraction runs in float64 before the single cast to float32.

    Raises:
        ValueError: if the tensor names or shapes differ.
    """
    if set(new_weights) != set(base_weights):
        raise ValueError(
            f"New weights have tensors {sorted(new_weights)} but base weights have {sorted(base_weights)}."
        )
    update = {}
    for name, base in base_weights.items():
        new = np.asarray(new_weights[name], dtype=np.float64)
        base = np.asarray(base, dtype=np.float64)
        if new.shape != base.shape:
            raise ValueError(f"Tensor {name!r} has shape {new.shape} in the new weights but {base.shape} in the base.")
        update[name] = (new - base).astype(np.float32)
    return update


def _run_sgd_inplace(
    spec: dict,
    parameters: dict[str, FloatArray],
    global_parameters: Mapping[str, FloatArray],
    features: FloatArray,
    labels: IntArray,
    plan: TrainingPlan,
    *,
    rng: np.random.Generator,
) -> None:
    num_examples = labels.size
    for _ in range(plan.local_epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, plan.batch_size):
            batch = order[start : start + plan.batch_size]
            factors = backpropagate(spec, parameters, features[batch], labels[batch])
            gradients = sum_gradients(factors)
            for name, gradient in gradients.items():
                step = (plan.learning_rate / batch.size) * gradient
                if plan.proximal_mu > 0:
                    step += plan.learning_rate * plan.proximal_mu * (parameters[name] - global_parameters[name])
                parameters[name] -= step


def _run_dp_sgd_inplace(
    spec: dict,
    parameters: dict[str, FloatArray],
    global_parameters: Mapping[str, FloatArray],
    features: FloatArray,
    labels: IntArray,
    learning_rate: float,
    dp: LocalDpConfig,
    *,
    proximal_mu: float,
    rng: np.random.Generator,
) -> None:
    num_examples = labels.size
    expected_batch_size = dp.sampling_rate * num_examples
    noise_std = dp.noise_multiplier * dp.clip_norm
    for _ in range(dp.local_steps):
        is_sampled = rng.random(num_examples) < dp.sampling_rate
        batch = np.flatnonzero(is_sampled)
        factors = backpropagate(spec, parameters, features[batch], labels[batch])
        clipped_sum = clip_and_sum_gradients(factors, clip_norm=dp.clip_norm)
        for name, gradient_sum in clipped_sum.items():
            noisy_sum = gradient_sum + rng.normal(0.0, noise_std, size=gradient_sum.shape)
            step = (learning_rate / expected_batch_size) * noisy_sum
            # The proximal gradient depends only on the weights, not on any
            # example, so it goes outside the clipped and noised sum and costs no privacy.
            if proximal_mu > 0:
                step += learning_rate * proximal_mu * (parameters[name] - global_parameters[name])
            parameters[name] -= step


def _check_keys(label: str, data: Mapping, *, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    unknown = sorted(str(key) for key in data if key not in required and key not in optional)
    if unknown:
        raise ValueError(f"{label} has unknown keys {unknown}. Allowed keys are {', '.join(required + optional)}.")
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{label} is missing the keys {missing}.")


def _require_finite_real(name: str, value: object) -> float:
    # bool is a subclass of int, so True would otherwise pass as 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)


def _require_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
    return int(value)
