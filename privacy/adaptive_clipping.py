"""Adaptive clip norm for DP-FedAvg: track a quantile of the update norms with a noised count.

Pure module: numpy only. It implements the geometric update of Andrew,
Thakkar, McMahan and Ramaswamy 2021, "Differentially Private Learning with
Adaptive Clipping" (NeurIPS, arXiv:1905.03871), Section 2, Algorithm 1.

Symbols:
    C        clip norm of the current round
    gamma    target quantile, the fraction of updates that should be unclipped
    eta_C    learning rate of the clip norm
    sigma_b  standard deviation of the noise on the centred count of unclipped updates
    m        expected cohort size, q * N
    z_delta  noise multiplier of the update sum
    z        noise multiplier of the update sum and count as one mechanism

Each round, with the pre-clip norms of the k updates in the cohort:

    b_i   = 1 if ||u_i|| <= C else 0
    b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2, limited to [0, 1]
    C    <- C * exp(-eta_C * (b_bar - gamma))

Limiting b_bar to [0, 1] is post-processing, so it costs no privacy. It
keeps one round's change within a factor of exp(eta_C) when noise pushes the
fraction out of range, as TensorFlow Federated's QuantileEstimatorQuery does.

Privacy: the noised count is released in the same round as the noised
update sum. Adding or removing one user changes the sum by at most C in L2
norm. Because each bit is centred at 1/2, the same change moves the centred
count by at most 1/2, half the sensitivity of the plain count sum_i b_i.
The pair then is as private as one Gaussian release with noise multiplier
z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2). To reach a target z, the update sum
needs z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), which exists only when
2 sigma_b > z. The factor 2 holds only for the centred count. Noising the
plain count instead would give (z_delta^-2 + sigma_b^-2)^(-1/2). With k = m
both estimates of b_bar agree. The paper recommends gamma = 0.5,
eta_C = 0.2 and sigma_b = m / 20, and with that sigma_b and z near 1 the
update sum needs only slightly more noise than without adaptation.
TensorFlow Federated's `adaptive_clip_noise_params` uses the same formula
and defaults, and its QuantileEstimatorQuery centres the bits the same way.
"""

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from privacy.noise import gaussian_noise, require_finite_real, require_non_negative_finite


@dataclass(frozen=True, kw_only=True)
class AdaptiveClippingConfig:
    """Settings of the adaptive clip norm.

    Attributes:
        count_noise_multiplier: sigma_b, standard deviation of the Gaussian
            noise on the centred count of unclipped updates, in updates, at
            least 0. The centred count has sensitivity 1/2, so its noise
            multiplier is 2 sigma_b. The paper recommends m / 20 for an
            expected cohort of m updates.
            With 0 the count is released exactly, which voids the guarantee.
        target_quantile: gamma, fraction of updates that should be left
            unclipped, in [0, 1]. 0.5 tracks the median norm.
        learning_rate: eta_C, at least 0. One round changes the clip norm by a
            factor of at most exp(eta_C).
    """

    count_noise_multiplier: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        count_noise_multiplier = require_non_negative_finite("count_noise_multiplier", self.count_noise_multiplier)
        target_quantile = require_finite_real("target_quantile", self.target_quantile)
        if not 0.0 <= target_quantile <= 1.0:
            raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}.")
        learning_rate = require_non_negative_finite("learning_rate", self.learning_rate)
        object.__setattr__(self, "count_noise_multiplier", count_noise_multiplier)
        object.__setattr__(self, "target_quantile", target_quantile)
        object.__setattr__(self, "learning_rate", learning_rate)


def update_clip_norm(
    *,
    clip_norm: float,
    norms: npt.ArrayLike,
    config: AdaptiveClippingConfig,
    expected_participants: float,
    rng: np.random.Generator,
) -> float:
    """Compute next round's clip norm from this round's update norms with the geometric update.

    Call it once per round, after `privacy.central_dp.dp_fedavg_aggregate`
    or `dp_fedavg_aggregate_stack`, with that call's `clip_norm` and its
    `norms`. An empty cohort still
    draws the count noise. Its noised fraction is then 1/2 plus noise, so the
    clip norm changes by about exp(-eta_C * (1/2 - gamma)).

    Args:
        clip_norm: C of the round that produced `norms`, positive.
        norms: Pre-clip L2 norms of the round's updates, shape (k,), k >= 0, finite and >= 0.
        config: Target quantile, learning rate and count noise.
        expected_participants: Expected cohort size m = q * N, positive.
            The noised count is divided by m, not by k, for the same reason
            as the update sum: k depends on who was sampled.
        rng: Source of the count noise.

    Returns:
        The clip norm for the next round, positive.

    Raises:
        ValueError: if an argument is outside the ranges above, or the new
            clip norm underflows to 0 or overflows.
    """
    clip_norm = require_finite_real("clip_norm", clip_norm)
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}.")
    expected_participants = require_finite_real("expected_participants", expected_participants)
    if expected_participants <= 0:
        raise ValueError(f"expected_participants must be positive, got {expected_participants}.")
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 1:
        raise ValueError(f"norms must have shape (k,), got shape {norms.shape}.")
    if not np.all(np.isfinite(norms)) or np.any(norms < 0):
        raise ValueError("norms must be finite and at least 0.")

    centred_count = np.count_nonzero(norms <= clip_norm) - 0.5 * norms.size
    noised_centred_count = centred_count + float(gaussian_noise((), std=config.count_noise_multiplier, rng=rng))
    unclipped_fraction = min(1.0, max(0.0, noised_centred_count / expected_participants + 0.5))
    new_clip_norm = clip_norm * math.exp(-config.learning_rate * (unclipped_fraction - config.target_quantile))
    if not (math.isfinite(new_clip_norm) and new_clip_norm > 0):
        raise ValueError(
            f"The clip norm left the float64 range ({clip_norm} became {new_clip_norm}). "
            f"Lower learning_rate (now {config.learning_rate})."
        )
    return new_clip_norm


def combined_noise_multiplier(*, update_noise_multiplier: float, count_noise_multiplier: float) -> float:
    """Compute the noise multiplier z of the update sum and the noised count released together.

    z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2), from the privacy analysis of
    Andrew et al. 2021, Section 2. Account for each round of DP-FedAvg with
    adaptive clipping as one Gaussian release with this z.

    Args:
        update_noise_multiplier: z_delta of the update sum, at least 0.
        count_noise_multiplier: sigma_b of the count, at least 0.

    Returns:
        z >= 0. It is 0 when either input is 0, because a release without
        noise has no finite guarantee.

    Raises:
        ValueError: if an input is negative or not finite.
    """
    update_noise_multiplier = require_non_negative_finite("update_noise_multiplier", update_noise_multiplier)
    count_noise_multiplier = require_non_negative_finite("count_noise_multiplier", count_noise_multiplier)
    if update_noise_multiplier == 0.0 or count_noise_multiplier == 0.0:
        return 0.0
    return (update_noise_multiplier**-2 + (2.0 * count_noise_multiplier) ** -2) ** -0.5


def update_noise_multiplier_for(*, target_noise_multiplier: float, count_noise_multiplier: float) -> float:
    """Compute the z_delta of the update sum that makes the pair with the count as private as z.

    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), the inverse of
    `combined_noise_multiplier`. It is always larger than z.

    Args:
        target_noise_multiplier: z that the accountant is charged with, positive.
        count_noise_multiplier: sigma_b of the count, greater than z / 2.

    Returns:
        z_delta > z.

    Raises:
        ValueError: if an input is not finite or z is not positive, or if
            sigma_b <= z / 2, where the count alone would use the whole budget.
    """
    target_noise_multiplier = require_finite_real("target_noise_multiplier", target_noise_multiplier)
    if target_noise_multiplier <= 0:
        raise ValueError(f"target_noise_multiplier must be positive, got {target_noise_multiplier}.")
    count_noise_multiplier = require_non_negative_finite("count_noise_multiplier", count_noise_multiplier)
    if 2.0 * count_noise_multiplier <= target_noise_multiplier:
        raise ValueError(
            f"count_noise_multiplier {count_noise_multiplier} is too small for target_noise_multiplier "
            f"{target_noise_multiplier}: it must exceed {target_noise_multiplier / 2}. Raise it, for example "
            f"to expected_participants / 20, or lower the target."
        )
    return (target_noise_multiplier**-2 - (2.0 * count_noise_multiplier) ** -2) ** -0.5
