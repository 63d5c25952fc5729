"""Byzantine-robust aggregation rules on flattened client updates.

Pure module: numpy only. Each rule maps the round's updates, an
(n_clients, n_params) array, to one (n_params,) float64 aggregate. The
passes over the updates are the memory-bound kernels of
`federation.aggregation.kernels`, which read a float32 or float64 array as it
is and keep their extra memory to O(n_params) or to a column block:

- "fedavg": example-weighted mean (McMahan et al. 2017).
- "median", "trimmed_mean": coordinate-wise median and trimmed mean (Yin,
  Chen, Ramchandran and Bartlett 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML).
- "krum", "multi_krum": Blanchard, El Mhamdi, Guerraoui and Stainer 2017,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"
  (NeurIPS).
- "bulyan": El Mhamdi, Guerraoui and Rouault 2018, "The Hidden Vulnerability
  of Distributed Learning in Byzantium" (ICML).
- "norm_bounding": Sun, Kairouz, Suresh and McMahan 2019, "Can You Really
  Backdoor Federated Learning?".
- "centered_clipping": Karimireddy, He and Jaggi 2021, "Learning from
  History for Byzantine Robust Optimization" (ICML).

The formula of each rule is in the docstring of its `_aggregate_*` function.
Flower 1.42.0's `flwr.server.strategy.aggregate` implements fedavg, median,
trimmed_mean, krum, multi_krum and bulyan. It runs Krum on fewer updates than
the rule needs (n = 3 with f = 1), which `check_preconditions` rejects, and
it does not leave out non-finite updates. On finite inputs that both accept,
the results agree to float64 rounding (tests/test_robust_against_flower.py).
"""

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from federation.aggregation.fedavg import AggregationError, FloatArray
from federation.aggregation.kernels import Float64Array, RowStack, Stack, find_non_finite_rows, squared_distances_to, weighted_mean_and_distances, weighted_sum
from federation.aggregation.krum import (
    IntArray,
    average_closest_to_median,
    pairwise_squared_distances,
    score_updates,
    select_bulyan,
    select_multi_krum,
)
from federation.aggregation.order_statistics import coordinate_median, trimmed_mean
from federation.aggregation.validation import check_config_keys, require_finite_real, require_integer

RULE_NAMES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "norm_bounding", "centered_clipping")
_RULE_LABELS = {
    "fedavg": "FedAvg",
    "median": "Coordinate-wise median",
    "trimmed_mean": "Trimmed mean",
    "krum": "Krum",
    "multi_krum": "Multi-Krum",
    "bulyan": "Bulyan",
    "norm_bounding": "Norm bounding",
    "centered_clipping": "Centered clipping",
}
# The parameters each rule reads; from_dict rejects the others, so a setting never goes silently unused.
RULE_PARAMETERS = {
    "fedavg": (),
    "median": (),
    "trimmed_mean": ("trim_fraction",),
    "krum": ("num_byzantine",),
    "multi_krum": ("num_byzantine", "num_selected"),
    "bulyan": ("num_byzantine",),
    "norm_bounding": ("norm_bound_multiplier",),
    "centered_clipping": ("clipping_radius", "clipping_iterations"),
}
# Krum, Multi-Krum and Bulyan rank updates by Krum score, so they can leave out a non-finite update instead of failing.
_SELECTING_RULES = ("krum", "multi_krum", "bulyan")
# A weighted sum turns any NaN or infinity in its inputs into a non-finite
# aggregate, and the median and trimmed mean set NaN wherever a column contains
# one, so these rules check their inputs only when the aggregate is not
# finite and save a pass over the updates.
_PROPAGATING_RULES = ("fedavg", "median", "trimmed_mean")


class RulePreconditionError(AggregationError):
    """The round has too few updates for the configured rule and f."""


@dataclass(frozen=True)
class RuleConfig:
    """Aggregation rule and its parameters.

    Each rule reads only its own fields.

    Attributes:
        name: One of RULE_NAMES.
        num_byzantine: f, the number of Byzantine updates that krum,
            multi_krum and bulyan tolerate, >= 0.
        trim_fraction: beta of trimmed_mean, the fraction of values cut from
            each side of every coordinate, in [0, 0.5).
        num_selected: m of multi_krum, >= 1, or None for n - f. Only
            multi_krum accepts a value.
        norm_bound_multiplier: norm_bounding clips each update to this
            multiple of the median update norm of the round, > 0.
        clipping_radius: tau of centered_clipping, > 0, in the units of the updates.
        clipping_iterations: L of centered_clipping, >= 1.
    """

    name: str = "fedavg"
    num_byzantine: int = 0
    trim_fraction: float = 0.1
    num_selected: int | None = None
    norm_bound_multiplier: float = 1.0
    clipping_radius: float = 1.0
    clipping_iterations: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in RULE_NAMES:
            raise ValueError(f"name must be one of {', '.join(RULE_NAMES)}, got {self.name!r}.")
        object.__setattr__(self, "num_byzantine", require_integer("num_byzantine", self.num_byzantine, minimum=0))
        trim_fraction = require_finite_real("trim_fraction", self.trim_fraction)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}.")
        object.__setattr__(self, "trim_fraction", trim_fraction)
        if self.num_selected is not None:
            if self.name != "multi_krum":
                raise ValueError(f"num_selected applies only to multi_krum, got {self.num_selected!r} for {self.name}.")
            object.__setattr__(self, "num_selected", require_integer("num_selected", self.num_selected, minimum=1))
        for field_name in ("norm_bound_multiplier", "clipping_radius"):
            value = require_finite_real(field_name, getattr(self, field_name))
            if value <= 0:
                raise ValueError(f"{field_name} must be positive, got {value}.")
            object.__setattr__(self, field_name, value)
        object.__setattr__(self, "clipping_iterations", require_integer("clipping_iterations", self.clipping_iterations, minimum=1))

    @classmethod
    def from_dict(cls, data: Mapping) -> "RuleConfig":
        """Build a config from its JSON form. Missing keys take their defaults.

        Raises:
            ValueError: on a non-mapping, an unknown key or an invalid value, naming it.
        """
        check_config_keys(data, label="Aggregation rule config", allowed=[field.name for field in fields(cls)])
        name = data.get("name", cls.name)
        if name in RULE_PARAMETERS:
            unused = sorted(str(key) for key in data if key != "name" and key not in RULE_PARAMETERS[name])
            if unused:
                accepted = ", ".join(RULE_PARAMETERS[name]) or "none"
                raise ValueError(f"{name} does not use {', '.join(unused)}; its parameters are: {accepted}.")
        return cls(**data)

    def to_dict(self) -> dict:
        """Return the JSON-safe form of the config: the name and the parameters the rule reads."""
        return {"name": self.name, **self.parameters()}

    def parameters(self) -> dict:
        """Return the fields the rule reads, without the name: what an operator needs to see and store."""
        return {name: getattr(self, name) for name in RULE_PARAMETERS[self.name]}


@dataclass(frozen=True, eq=False)
class RobustResult:
    """Aggregate of one round and how much of each client's update entered it.

    Compared by identity, because equality of numpy arrays is elementwise.

    Attributes:
        aggregate: (n_params,) float64.
        kept_fraction: (n_clients,) float64 in [0, 1], the share of each
            client's update that entered the aggregate at full weight. It is
            1 for a selected and 0 for a rejected client in krum and
            multi_krum. In bulyan it is the fraction of coordinates where the
            client was among the beta values averaged, and 0 outside the
            selection set. In trimmed_mean it is the fraction of coordinates
            not trimmed. In norm_bounding and centered_clipping it is the
            clip scale min(1, bound / norm), from the last iteration. It is
            all ones for fedavg and None for median, because the median is
            in general a vector no client sent, so no client can be credited with it.
        selected_indices: ascending indices of the selected clients for
            krum, multi_krum and bulyan; None for the other rules.
    """

    aggregate: FloatArray
    kept_fraction: FloatArray | None
    selected_indices: tuple[int, ...] | None = None


def min_updates_for(config: RuleConfig) -> int:
    """Return the smallest number of updates the configured rule accepts.

    krum and multi_krum need n >= 2f + 3, so that each update is scored by
    n - f - 2 >= f + 1 neighbours. multi_krum with m set also needs
    m <= n - f. bulyan needs n >= 4f + 3. Every other rule needs one update,
    because trimmed_mean keeps n - 2 * floor(beta * n) >= 1 values already
    at n = 1 when beta < 0.5.
    """
    num_byzantine = config.num_byzantine
    if config.name == "krum":
        return 2 * num_byzantine + 3
    if config.name == "multi_krum":
        selected_bound = 0 if config.num_selected is None else config.num_selected + num_byzantine
        return max(2 * num_byzantine + 3, selected_bound)
    if config.name == "bulyan":
        return 4 * num_byzantine + 3
    return 1


def check_preconditions(config: RuleConfig, num_updates: int) -> None:
    """Check that the configured rule is defined for `num_updates` updates.

    A count for which the rule's definition does not hold is rejected, not
    run with fewer neighbours. Flower 1.42.0's `aggregate_krum`, for example,
    scores with max(1, n - f - 2) neighbours and so runs with n = 3 and f = 1.

    Raises:
        RulePreconditionError: the sentence names the rule, the number of
            updates n and, for krum, multi_krum and bulyan, f.
        ValueError: `num_updates` is not a non-negative integer.
    """
    num_updates = require_integer("num_updates", num_updates, minimum=0)
    label = _RULE_LABELS[config.name]
    num_byzantine = config.num_byzantine
    if config.name in ("krum", "multi_krum") and num_updates < 2 * num_byzantine + 3:
        raise RulePreconditionError(f"{label} needs more than 2f+2 updates, so at least {2 * num_byzantine + 3} (got {num_updates}, f={num_byzantine}).")
    if config.name == "multi_krum" and num_updates < min_updates_for(config):
        raise RulePreconditionError(
            f"Multi-Krum with m={config.num_selected} needs at least m+f={min_updates_for(config)} updates "
            f"(got {num_updates}, f={num_byzantine}). Lower num_selected."
        )
    if config.name == "bulyan" and num_updates < 4 * num_byzantine + 3:
        raise RulePreconditionError(f"Bulyan needs at least 4f+3={4 * num_byzantine + 3} updates (got {num_updates}, f={num_byzantine}).")
    if num_updates < 1:
        raise RulePreconditionError(f"{label} needs at least 1 update (got {num_updates}).")
    if config.name == "trimmed_mean" and num_updates - 2 * _num_trimmed(config.trim_fraction, num_updates) < 1:
        raise RulePreconditionError(f"Trimmed mean with trim_fraction={config.trim_fraction} keeps no value of {num_updates} updates.")


def krum_scores(updates: FloatArray, *, num_byzantine: int) -> FloatArray:
    """Compute the Krum score of every update (Blanchard et al. 2017).

    score_i = sum of the squared L2 distances from update i to its
    n - f - 2 nearest other updates. Krum selects the lowest score.

    Args:
        updates: (n_clients, n_params), n_clients >= 2f + 3.
        num_byzantine: f, >= 0.

    Returns:
        (n_clients,) float64, with inf for an update that has a non-finite value.

    Raises:
        RulePreconditionError: n_clients < 2f + 3.
        AggregationError: `updates` is not a 2-D real array.
        ValueError: `num_byzantine` is not a non-negative integer.
    """
    points = _read_updates(updates)
    num_clients = points.shape[0]
    check_preconditions(RuleConfig(name="krum", num_byzantine=num_byzantine), num_clients)
    return score_updates(pairwise_squared_distances(points), num_neighbours=num_clients - num_byzantine - 2)


def aggregate_updates(
    updates: Stack,
    *,
    num_examples: Sequence[int] | IntArray,
    config: RuleConfig,
    reference: FloatArray | None = None,
) -> RobustResult:
    """Aggregate one round's updates with the configured rule.

    Inputs are not modified. float64 updates are aggregated in float64, and
    other integer or float dtypes are converted to float64. float32 updates
    are read without a float64 copy. Their matrix products sum at most
    `kernels.FLOAT32_TERMS` rows or `kernels.FLOAT32_GRAM_COLUMNS` columns in
    float32 before the partial results are combined in float64. Norms,
    medians, sorted sums and the distances from the Gram matrix are float64.

    Args:
        updates: (n_clients, n_params) real array, or a `kernels.RowStack`
            of float32 or float64 rows, which every rule reads by column
            blocks without copying it whole.
        num_examples: (n_clients,) positive integer example counts. Only
            fedavg, multi_krum and norm_bounding weight by them.
        config: rule and parameters.
        reference: (n_params,) starting point v_0 of centered_clipping,
            usually the previous round's aggregate, or zeros when None.

    Returns:
        The aggregate with per-client kept fractions and selected indices.

    Raises:
        TypeError: `config` is not a RuleConfig.
        RulePreconditionError: too few updates for the rule (`check_preconditions`).
        AggregationError: shapes or counts do not match, an update has a
            non-finite value under a rule other than krum, multi_krum and
            bulyan, too few finite updates remain to fill a selection, or
            the aggregate overflows float64.
    """
    if not isinstance(config, RuleConfig):
        raise TypeError(f"config must be a RuleConfig, got {type(config).__name__}. Build one from a dict with RuleConfig.from_dict.")
    points = _read_updates(updates)
    num_clients, num_params = points.shape
    counts = _read_counts(num_examples, num_clients=num_clients)
    start = _read_reference(reference, num_params=num_params)
    check_preconditions(config, num_clients)
    if config.name not in _SELECTING_RULES and config.name not in _PROPAGATING_RULES:
        _require_finite_updates(points, rule_label=_RULE_LABELS[config.name])

    # Overflow shows up as inf or NaN in the aggregate, which the check below rejects.
    with np.errstate(over="ignore", invalid="ignore"):
        result = _RULES[config.name](points, counts, config, start)

    _require_finite_aggregate(result.aggregate, points, rule_name=config.name)
    return result


def fedavg_with_distances(updates: Stack, *, num_examples: Sequence[int] | IntArray) -> tuple[RobustResult, Float64Array]:
    """FedAvg as `aggregate_updates` computes it, and each update's squared L2 distance to the average rounded to float32.

    Reputation scoring needs the distances. The stack is read twice, for
    the average and then row by row for the distances, and never gathered
    (`kernels.weighted_mean_and_distances`). The distances are within a
    relative 2e-5 of the exact distances to the average rounded to float32.
    Rounding moves the average by up to 2**-24 of its magnitude, so where
    the updates differ by little more than that, the distances to the exact
    average can differ from these by much more than 2e-5 relative.

    Raises:
        AggregationError: as `aggregate_updates` for FedAvg.
    """
    points = _read_updates(updates)
    counts = _read_counts(num_examples, num_clients=points.shape[0])
    check_preconditions(RuleConfig(name="fedavg"), points.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):
        aggregate, squared_distances, _ = weighted_mean_and_distances(points, _weights(counts))
    _require_finite_aggregate(aggregate, points, rule_name="fedavg")
    return RobustResult(aggregate=aggregate, kept_fraction=np.ones(points.shape[0])), squared_distances


def flatten_tensors(tensors: Mapping[str, FloatArray], names: Sequence[str]) -> FloatArray:
    """Concatenate named tensors into one float64 vector, in the order of `names`.

    Raises:
        AggregationError: the tensor names differ from `names` or repeat.
    """
    if len(set(names)) != len(names) or set(tensors) != set(names):
        raise AggregationError(f"Expected tensors {sorted(names)} once each, got {sorted(tensors)}.")
    if not names:
        return np.zeros(0)
    return np.concatenate([np.asarray(tensors[name], dtype=np.float64).ravel() for name in names])


def unflatten_vector(vector: FloatArray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split a flat vector into float32 tensors, in the order of `shapes`.

    Raises:
        AggregationError: the vector is not 1-D, its size differs from the
            total size of `shapes`, or a value is not finite in float32.
    """
    values = np.asarray(vector)
    sizes = [math.prod(shape) for shape in shapes.values()]
    if values.ndim != 1 or values.size != sum(sizes):
        raise AggregationError(f"Expected a vector of shape ({sum(sizes)},) for tensors {list(shapes)}, got shape {values.shape}.")

    # The finiteness check below catches what overflows in the cast.
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)
    ends = np.cumsum(sizes, dtype=np.int64)
    bad = np.flatnonzero(~np.isfinite(single))
    if bad.size:
        name = list(shapes)[int(np.searchsorted(ends, bad[0], side="right"))]
        raise AggregationError(f"Tensor {name!r} has values that are not finite in float32.")

    pieces = np.split(single, ends[:-1]) if shapes else []
    return {name: piece.reshape(shape) for (name, shape), piece in zip(shapes.items(), pieces, strict=True)}


def _aggregate_fedavg(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """FedAvg: sum_k n_k u_k / sum_k n_k (McMahan et al. 2017, Algorithm 1)."""
    aggregate = weighted_sum(points, _weights(counts))
    return RobustResult(aggregate=aggregate, kept_fraction=np.ones(points.shape[0]))


def _aggregate_median(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """Coordinate-wise median, unweighted (Yin et al. 2018).

    For an even n it is the mean of the two middle values. It does not depend
    on the order of the clients.
    """
    return RobustResult(aggregate=coordinate_median(points), kept_fraction=None)


def _aggregate_trimmed_mean(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """Coordinate-wise trimmed mean, unweighted (Yin et al. 2018).

    Per coordinate, sort the n values, drop k = floor(beta * n) from each end
    and average the other n - 2k. k is computed as in `scipy.stats.trim_mean`
    and Flower's `aggregate_trimmed_avg`. Among equal values the one from the
    lower client index is kept first, which only affects kept_fraction.
    """
    num_trimmed = _num_trimmed(config.trim_fraction, points.shape[0])
    aggregate, kept_counts = trimmed_mean(points, num_trimmed=num_trimmed)
    return RobustResult(aggregate=aggregate, kept_fraction=kept_counts / points.shape[1])


def _aggregate_krum(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """Krum: the update with the lowest Krum score (see `krum_scores`). Ties go to the lowest index."""
    selected = select_multi_krum(points, num_byzantine=config.num_byzantine, num_selected=1, rule_label="Krum")
    return _selection_result(points[selected[0]].astype(np.float64), selected, num_clients=points.shape[0])


def _aggregate_multi_krum(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """Multi-Krum: the example-weighted mean of the m updates with the lowest Krum scores.

    Blanchard et al. 2017 introduce Multi-Krum in their experiments. The
    scores are computed once, as in Flower's `aggregate_krum` with
    to_keep = m. m defaults to n - f.
    """
    num_selected = points.shape[0] - config.num_byzantine if config.num_selected is None else config.num_selected
    selected = select_multi_krum(points, num_byzantine=config.num_byzantine, num_selected=num_selected, rule_label="Multi-Krum")
    aggregate = weighted_sum(points, _weights([counts[index] for index in selected]), rows=selected)
    return _selection_result(aggregate, selected, num_clients=points.shape[0])


def _aggregate_bulyan(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """Bulyan with Krum (El Mhamdi et al. 2018).

    Select theta = n - 2f updates by applying Krum repeatedly
    (`select_bulyan`), then per coordinate average, unweighted, the
    beta = theta - 2f selected values closest to the coordinate-wise median
    of the selection set.
    """
    selected = select_bulyan(points, num_byzantine=config.num_byzantine)
    num_closest = len(selected) - 2 * config.num_byzantine
    aggregate, averaged_fraction = average_closest_to_median(points, rows=selected, num_closest=num_closest)

    return _selection_result(aggregate, selected, num_clients=points.shape[0], kept_of_selected=averaged_fraction)


def _aggregate_norm_bounding(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """Norm bounding (Sun et al. 2019), then FedAvg.

    bound = multiplier * median_k ||u_k||. Each update is scaled by
    min(1, bound / ||u_k||) and the scaled updates are averaged with weights
    n_k / sum n_k. Using the round's median norm keeps the bound in the units
    of the updates without a fixed threshold.
    """
    # An overflowing norm is inf and scales its update to 0.
    norms = np.sqrt(squared_distances_to(points))
    bound = config.norm_bound_multiplier * float(np.median(norms))
    scales = _clip_scales(norms, bound)
    aggregate = weighted_sum(points, _weights(counts) * scales)
    return RobustResult(aggregate=aggregate, kept_fraction=scales)


def _aggregate_centered_clipping(points: Stack, counts: list[int], config: RuleConfig, reference: FloatArray | None) -> RobustResult:
    """Centered clipping, unweighted (Karimireddy, He and Jaggi 2021).

    v_0 = reference and, for l = 0 .. L - 1,
    v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) min(1, tau / ||x_i - v_l||).
    The result is v_L.
    """
    num_clients = points.shape[0]
    centre = np.zeros(points.shape[1]) if reference is None else reference.copy()
    scales: FloatArray = np.ones(num_clients)
    for _ in range(config.clipping_iterations):
        scales = _clip_scales(np.sqrt(squared_distances_to(points, centre)), config.clipping_radius)
        # sum_i s_i (x_i - v) = sum_i s_i x_i - (sum_i s_i) v, so no (n_clients, n_params) offsets are built.
        centre = centre + (weighted_sum(points, scales) - scales.sum() * centre) / num_clients
    return RobustResult(aggregate=centre, kept_fraction=scales)


_RULES: dict[str, Callable[[Stack, list[int], RuleConfig, FloatArray | None], RobustResult]] = {
    "fedavg": _aggregate_fedavg,
    "median": _aggregate_median,
    "trimmed_mean": _aggregate_trimmed_mean,
    "krum": _aggregate_krum,
    "multi_krum": _aggregate_multi_krum,
    "bulyan": _aggregate_bulyan,
    "norm_bounding": _aggregate_norm_bounding,
    "centered_clipping": _aggregate_centered_clipping,
}


def _selection_result(aggregate: FloatArray, selected: IntArray, *, num_clients: int, kept_of_selected: FloatArray | float = 1.0) -> RobustResult:
    kept = np.zeros(num_clients)
    kept[selected] = kept_of_selected
    return RobustResult(aggregate=aggregate, kept_fraction=kept, selected_indices=tuple(int(index) for index in selected))


def _clip_scales(norms: FloatArray, bound: float) -> FloatArray:
    # min(1, bound / norm), written so that a zero norm (never above the bound) needs no division.
    scales = np.ones_like(norms)
    np.divide(bound, norms, out=scales, where=norms > bound)
    return scales


def _weights(counts: list[int]) -> FloatArray:
    # Python integers sum without overflow, and int / int rounds once to the nearest float64.
    total = sum(counts)
    return np.array([count / total for count in counts], dtype=np.float64)


def _num_trimmed(trim_fraction: float, num_updates: int) -> int:
    return int(trim_fraction * num_updates)


def _read_updates(updates: Stack) -> Stack:
    if isinstance(updates, RowStack):
        if updates.shape[1] == 0:
            raise AggregationError(f"Expected updates of shape (n_clients, n_params) with n_params >= 1, got shape {updates.shape}.")
        return updates
    array = np.asarray(updates)
    if array.ndim != 2 or array.shape[1] == 0:
        raise AggregationError(f"Expected updates of shape (n_clients, n_params) with n_params >= 1, got shape {array.shape}.")
    if array.dtype.kind not in "fiu":
        raise AggregationError(f"Expected real-valued updates, got dtype {array.dtype}.")
    # The kernels never write to their input and read each row as one run of
    # values, so float32 and float64 arrays whose rows are contiguous, such
    # as the first columns of a wider array, are used without a copy.
    if array.dtype in (np.float32, np.float64):
        return array if array.strides[1] == array.itemsize else np.ascontiguousarray(array)
    return array.astype(np.float64)


def _read_counts(num_examples: Sequence[int] | IntArray, *, num_clients: int) -> list[int]:
    values = num_examples.tolist() if isinstance(num_examples, np.ndarray) else list(num_examples)
    if len(values) != num_clients:
        raise AggregationError(f"Expected {num_clients} example counts, one per update, got {len(values)}.")
    for index, count in enumerate(values):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise AggregationError(f"Update {index} has example count {count!r}. Counts must be positive integers.")
    return [int(count) for count in values]


def _read_reference(reference: FloatArray | None, *, num_params: int) -> FloatArray | None:
    # None stays None, so rules other than centered_clipping allocate no (n_params,) zeros.
    if reference is None:
        return None
    array = np.asarray(reference)
    if array.shape != (num_params,) or array.dtype.kind not in "fiu":
        raise AggregationError(f"Expected a real reference of shape ({num_params},), got shape {array.shape} and dtype {array.dtype}.")
    if not np.all(np.isfinite(array)):
        raise AggregationError("The reference has non-finite values.")
    return array.astype(np.float64)


def _require_finite_aggregate(aggregate: FloatArray, points: Stack, *, rule_name: str) -> None:
    """Raise AggregationError for a non-finite aggregate, naming the first non-finite update when the rule propagates one."""
    if np.all(np.isfinite(aggregate)):
        return
    if rule_name in _PROPAGATING_RULES:
        _require_finite_updates(points, rule_label=_RULE_LABELS[rule_name])
    raise AggregationError(f"The {_RULE_LABELS[rule_name]} aggregate is not finite because the updates overflow float64.")


def _require_finite_updates(points: Stack, *, rule_label: str) -> None:
    bad = find_non_finite_rows(points)
    if bad.size:
        raise AggregationError(
            f"Update {int(bad[0])} has non-finite values, which {rule_label} cannot aggregate. Reject the update or choose krum, multi_krum or bulyan."
        )
