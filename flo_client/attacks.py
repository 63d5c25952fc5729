"""Model-poisoning attacks that simulated devices run, to test robust aggregation.

Pure module: numpy and scipy, no Django and no I/O. An attacking device trains like an honest
one (on flipped labels for "label_flip") and then sends `craft_update`
instead of its honest update:

- "sign_flip": -scale times the honest update.
- "boost": +scale times the honest update.
- "gaussian_noise": independent N(0, noise_std^2) noise in every coordinate,
  replacing the update.
- "label_flip": the honest update of training on labels y -> C - 1 - y.
- "little_is_enough": the colluding attackers' per-coordinate mean minus z
  standard deviations (Baruch, Baruch and Goldberg 2019, "A Little Is Enough:
  Circumventing Defenses For Distributed Learning", NeurIPS, Section 3).
"""

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from flo_client.models import FloatArray, IntArray, Weights

ATTACK_NAMES = ("sign_flip", "gaussian_noise", "boost", "label_flip", "little_is_enough")


@dataclass(frozen=True)
class AttackConfig:
    """Attack that a simulated device runs.

    Attributes:
        name: One of ATTACK_NAMES.
        scale: Factor applied to the honest update, positive. "sign_flip" sends
            -scale times the update and "boost" +scale times it.
        noise_std: Standard deviation of every coordinate that "gaussian_noise"
            sends, positive.
    """

    name: str
    scale: float = 10.0
    noise_std: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in ATTACK_NAMES:
            raise ValueError(f"name must be one of {', '.join(ATTACK_NAMES)}, got {self.name!r}.")
        for field_name in ("scale", "noise_std"):
            value = _require_finite_real(field_name, getattr(self, field_name))
            if value <= 0:
                raise ValueError(f"{field_name} must be positive, got {value}.")
            object.__setattr__(self, field_name, value)


def flip_labels(labels: IntArray, *, num_classes: int) -> IntArray:
    """Map every class id y to num_classes - 1 - y, which the "label_flip" attack trains on.

    Args:
        labels: Class ids of shape (n,), an integer dtype, each in [0, num_classes).
        num_classes: Number of classes C, at least 2.

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: if num_classes is not an integer of at least 2, or a label
            is not an integer in [0, num_classes).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}.")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Labels must have an integer dtype, got {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Labels range from {labels.min()} to {labels.max()}, outside [0, {num_classes}).")
    return (int(num_classes) - 1 - labels).astype(labels.dtype)


def little_is_enough_z(*, num_devices: int, num_attackers: int) -> float:
    """Compute the number of standard deviations z by which "little_is_enough" shifts the mean.

    Baruch, Baruch and Goldberg 2019, Section 3: with n devices of which f
    attack, the attackers need s = floor(n / 2 + 1) - f honest devices whose
    updates lie further from the mean than theirs, and take
    z = Phi^{-1}((n - s) / n), where Phi is the standard normal CDF.

    With 1 <= f the ratio (n - s) / n is at least 0.5. It is exactly 0.5, so
    z = 0 and the crafted update is the attackers' mean, only for an even n
    and f = 1.

    Args:
        num_devices: Number n of devices whose updates the server aggregates.
        num_attackers: Number f of attackers among them, 0 < f < n.

    Raises:
        ValueError: if the counts are not integers with 0 < f < n, or if
            f >= floor(n / 2) + 1. Then s <= 0, the attackers already form a
            majority, and Phi^{-1} of (n - s) / n >= 1 is not finite.
    """
    for label, value in (("num_devices", num_devices), ("num_attackers", num_attackers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{label} must be an integer, got {value!r}.")
    if not 0 < num_attackers < num_devices:
        raise ValueError(f"num_attackers must be in (0, num_devices) = (0, {num_devices}), got {num_attackers}.")

    supporters = num_devices // 2 + 1 - num_attackers
    if supporters <= 0:
        raise ValueError(
            f"{num_attackers} attackers among {num_devices} devices already form a majority, so little_is_enough "
            f"has no finite z. Use at most {num_devices // 2} attackers."
        )
    return float(norm.ppf((num_devices - supporters) / num_devices))


def craft_update(
    config: AttackConfig,
    honest_update: Mapping[str, FloatArray],
    *,
    colluding_updates: Sequence[Mapping[str, FloatArray]],
    num_devices: int,
    num_attackers: int,
    rng: np.random.Generator,
) -> Weights:
    """Compute the update that an attacking device sends in place of its honest one.

    "little_is_enough" uses only the names and shapes of `honest_update`. It
    takes each coordinate's mean mu and standard deviation sigma (population,
    ddof = 0) over `colluding_updates` and returns mu - z * sigma, with z from
    `little_is_enough_z`. Attackers that cannot see honest devices' updates
    estimate mu and sigma from their own honestly trained updates, and the
    simulator passes those as `colluding_updates`. With a single colluding
    update sigma = 0, so the attacker sends that update unchanged.

    Args:
        config: The attack.
        honest_update: The attacker's honestly trained update, tensor name -> array.
        colluding_updates: Honest updates of the colluding attackers, including
            this one, each with the names and shapes of `honest_update`. Only
            "little_is_enough" reads them, and it needs at least one.
        num_devices: Number n of devices whose updates are aggregated, read
            only by "little_is_enough".
        num_attackers: Number f of attackers among them, read only by "little_is_enough".
        rng: Source of the "gaussian_noise" noise.

    Returns:
        Tensor name -> float32 array with the names and shapes of `honest_update`.
        The inputs are not modified.

    Raises:
        ValueError: if "little_is_enough" gets no colluding updates, updates
            whose tensors differ from `honest_update`, or invalid counts.
    """
    if config.name == "little_is_enough":
        return _craft_little_is_enough(honest_update, colluding_updates, num_devices=num_devices, num_attackers=num_attackers)

    crafted = {}
    for name, values in honest_update.items():
        honest = np.asarray(values, dtype=np.float64)
        if config.name == "sign_flip":
            crafted[name] = -config.scale * honest
        elif config.name == "boost":
            crafted[name] = config.scale * honest
        elif config.name == "gaussian_noise":
            crafted[name] = rng.normal(0.0, config.noise_std, size=honest.shape)
        else:
            # label_flip poisoned the training data, so its update goes out unchanged.
            crafted[name] = honest
    return {name: values.astype(np.float32) for name, values in crafted.items()}


def _craft_little_is_enough(
    honest_update: Mapping[str, FloatArray],
    colluding_updates: Sequence[Mapping[str, FloatArray]],
    *,
    num_devices: int,
    num_attackers: int,
) -> Weights:
    z = little_is_enough_z(num_devices=num_devices, num_attackers=num_attackers)
    if not colluding_updates:
        raise ValueError("little_is_enough needs at least one colluding update. Pass the attackers' honest updates.")
    for index, update in enumerate(colluding_updates):
        if set(update) != set(honest_update):
            raise ValueError(f"Colluding update {index} has tensors {sorted(update)}, expected {sorted(honest_update)}.")
        for name, values in honest_update.items():
            if np.shape(update[name]) != np.shape(values):
                raise ValueError(f"Colluding update {index} has tensor {name!r} of shape {np.shape(update[name])}, expected {np.shape(values)}.")

    crafted = {}
    for name in honest_update:
        # Shape (num_colluders, *tensor shape).
        stacked = np.stack([np.asarray(update[name], dtype=np.float64) for update in colluding_updates])
        crafted[name] = (stacked.mean(axis=0) - z * stacked.std(axis=0)).astype(np.float32)
    return crafted


def _require_finite_real(name: str, value: object) -> float:
    # bool is a subclass of int, so True would otherwise pass as 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)
