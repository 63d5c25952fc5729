"""Privacy accounting for DP-SGD and DP-FedAvg events with RDP or PLD.

Pure module: no Django. A node's spend is the composition of all its DP-SGD
events, converted to (epsilon, delta) once at the end. Adding up per-round
epsilons would overstate the loss, and resetting them would hide it.

Each event is `steps` applications of the Poisson-subsampled Gaussian
mechanism (sampling rate q, noise multiplier sigma), as in Abadi et al. 2016,
"Deep Learning with Differential Privacy". Two accountants are available:

- "rdp" sums the exact RDP of privacy/rdp.py (Mironov, Talwar and Zhang
  2019) over events at every order of RDP_ORDERS and converts it with
  dp-accounting's compute_epsilon, the bound of Proposition 12 of
  arXiv:2004.00010 as dp-accounting 0.6.0 cites it. It is fast and never
  below the true epsilon.
- "pld" composes privacy loss distributions with dp-accounting's
  PLDAccountant (connect-the-dots discretization, pessimistic estimate).
  It is tighter: about 2.38 instead of 2.60 for the MNIST DP-SGD setting.
"""

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from privacy.rdp import FloatArray, compute_rdp_sampled_gaussian

# Orders at which the RDP is evaluated. Epsilon is the best conversion over all of them.
# For a Gaussian-like spend the optimal order is near 1 + log(1/delta) /
# epsilon when epsilon is large and grows as epsilon shrinks. At delta = 1e-5
# that gives these estimated ranges:
# - 1.01 to 1.99 in steps of 0.01 for epsilon above about 20. dp-accounting's
#   conversion uses orders up to 1.01 only to detect an RDP near 0, so 1.02
#   is the lowest order that bounds a large epsilon (up to about 575).
# - every integer from 2 to 128 for epsilon from about 0.2 to 20.
# - 160 to 8192, roughly geometric, for smaller spends (few steps, much
#   noise or a small q).
FRACTIONAL_ORDERS = tuple(round(1 + hundredths / 100, 2) for hundredths in range(1, 100))
INTEGER_ORDERS = tuple(range(2, 129))
LARGE_ORDERS = (160, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192)
# TODO: add tenths between 2 and 12 (dp-accounting's default set has them);
# without them the RDP epsilon can be up to about 1% above the RdpAccountant's
# default, e.g. 2.998 against 2.966 for sigma 0.868, q 0.01, 1,000 steps.
RDP_ORDERS: tuple[float, ...] = FRACTIONAL_ORDERS + INTEGER_ORDERS + LARGE_ORDERS

ACCOUNTANTS = ("rdp", "pld")

# Largest accepted delta (exclusive). Delta is the probability that the
# epsilon bound fails, so 0.1 or more makes the guarantee vacuous, and for
# small spends the RDP conversion then reports epsilon 0 (its bound through
# the KL divergence). Such a value is most likely a percentage or an
# epsilon passed as delta, so it is rejected.
MAX_DELTA = 0.1
# Smallest accepted delta. Below it dp-accounting's PLD truncates the loss
# distribution so that epsilon becomes infinite or stops being monotone in
# the number of steps; no deployment needs a delta this small.
MIN_DELTA = 1e-12

# PLD discretization. dp-accounting's pessimistic estimate converges about
# like h^2 in the value discretization interval h (measured for the MNIST
# setting: the error shrinks about 100 times per tenfold finer interval), so
# halving h changes epsilon by about 3/4 of the remaining error.
# The interval starts at PLD_START_INTERVAL, or at
# PLD_START_INTERVAL_PER_EPSILON times the RDP epsilon if that is larger,
# capped at PLD_MAX_START_INTERVAL. A huge epsilon needs no fine grid, and a
# fine grid over its range would not fit in memory.
# The interval then halves until epsilon changes by at most
# PLD_RELATIVE_CHANGE, which leaves an error near a third of that, and never
# goes below dp-accounting's default interval, 1e-4.
PLD_START_INTERVAL = 1e-2
PLD_START_INTERVAL_PER_EPSILON = 1e-4
PLD_MAX_START_INTERVAL = 1.0
PLD_MIN_INTERVAL = 1e-4
PLD_RELATIVE_CHANGE = 1e-3

# Above this RDP epsilon the "pld" accountant reports the RDP epsilon: the
# loss distribution would span more values than fit in memory, and an
# epsilon this large protects nothing whichever bound is used.
PLD_MAX_EPSILON = 1e5

# Noise multipliers searched by calibrate_noise_multiplier.
MIN_NOISE_MULTIPLIER = 1e-3
MAX_NOISE_MULTIPLIER = 1e6

# dp-accounting's closed-form Gaussian epsilon is a root found by scipy's
# brentq to within this absolute tolerance plus 4 float64 epsilons relative
# (brentq's default rtol). Adding both back keeps the result an upper bound.
_GAUSSIAN_ROOT_TOLERANCE = 1e-12
_GAUSSIAN_ROOT_RELATIVE_TOLERANCE = 4 * float(np.finfo(np.float64).eps)

Mechanism = tuple[float, float]  # (noise_multiplier, sampling_rate)
StepCounts = tuple[tuple[Mechanism, int], ...]


@dataclass(frozen=True)
class DpSgdEvent:
    """`steps` steps of DP-SGD with Poisson sampling rate q and noise multiplier sigma."""

    noise_multiplier: float
    sampling_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}.")
        if not (0 < self.sampling_rate <= 1):
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}.")


def compose_epsilon(events: Iterable[DpSgdEvent], *, delta: float, accountant: str = "rdp") -> float:
    """Compose events and return epsilon at `delta`.

    Events with the same (noise_multiplier, sampling_rate) compose as one
    self-composed event, so the cost is one evaluation per distinct
    mechanism, and identical histories share a cached result.

    Args:
        events: every event of one node or federation, in any order.
        delta: target delta, 0 < delta < MAX_DELTA.
        accountant: "rdp" reports the RDP bound: the exact RDP of each
            event (privacy/rdp.py), summed per order over RDP_ORDERS and
            converted with dp-accounting's compute_epsilon. "pld" reports
            dp-accounting's pessimistic PLD estimate, an upper bound on the
            epsilon of the discretized loss distributions, at the interval
            chosen as PLD_START_INTERVAL describes. Events with q = 1
            compose exactly as one Gaussian (closed form when all events
            have q = 1). Above an RDP epsilon of PLD_MAX_EPSILON "pld"
            reports the RDP bound.

    Returns:
        Epsilon >= 0; 0.0 for no events. It is inf only for a noise
        multiplier below privacy.rdp.MIN_FINITE_NOISE_MULTIPLIER (1e-150).

    Raises:
        ValueError: on a delta outside (0, MAX_DELTA), an unknown
            accountant, or a noise multiplier above
            privacy.rdp.MAX_NOISE_MULTIPLIER (1e150).
    """
    _check_delta(delta)
    _check_accountant(accountant)
    steps_by_mechanism: Counter[Mechanism] = Counter()
    for event in events:
        steps_by_mechanism[(event.noise_multiplier, event.sampling_rate)] += event.steps
    if not steps_by_mechanism:
        return 0.0
    return _epsilon_for_counts(tuple(sorted(steps_by_mechanism.items())), delta, accountant)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 1e-3,
) -> float:
    """Find the smallest noise multiplier whose epsilon meets a target, by bisection.

    The result sigma satisfies compose_epsilon([DpSgdEvent(sigma, q, steps)])
    <= target_epsilon, and sigma * (1 - tolerance) does not.

    Args:
        target_epsilon: epsilon to meet at `delta`, > 0.
        delta: target delta, 0 < delta < MAX_DELTA.
        sampling_rate: Poisson sampling rate q of every step, in (0, 1].
        steps: number of steps, a positive integer.
        accountant: "rdp" or "pld", as in compose_epsilon.
        tolerance: relative precision of the result, in (0, 0.1].

    Returns:
        The noise multiplier, between MIN_NOISE_MULTIPLIER and MAX_NOISE_MULTIPLIER.

    Raises:
        ValueError: on an invalid argument, a target that even
            MAX_NOISE_MULTIPLIER cannot meet, or one that
            MIN_NOISE_MULTIPLIER already meets (the smallest noise
            multiplier then lies below the searched range).
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}.")
    if not (0 < tolerance <= 0.1):
        raise ValueError(f"tolerance must be in (0, 0.1], got {tolerance}.")
    _check_delta(delta)
    _check_accountant(accountant)
    DpSgdEvent(1.0, sampling_rate, steps)  # validates sampling_rate and steps

    def epsilon_at(noise_multiplier: float) -> float:
        return compose_epsilon([DpSgdEvent(noise_multiplier, sampling_rate, steps)], delta=delta, accountant=accountant)

    def meets_target(noise_multiplier: float) -> bool:
        return epsilon_at(noise_multiplier) <= target_epsilon

    low, high = _bracket_noise_multiplier(meets_target, target_epsilon, epsilon_at)
    # Invariant: epsilon(low) > target >= epsilon(high). Stopping at half the
    # tolerance leaves high * (1 - tolerance) strictly below low.
    while high - low > tolerance * high / 2:
        middle = (low + high) / 2
        if meets_target(middle):
            high = middle
        else:
            low = middle
    # The PLD estimate is not exactly monotone in sigma because its interval
    # adapts, so the promise about high * (1 - tolerance) is checked here.
    while meets_target(high * (1 - tolerance)):
        high *= 1 - tolerance
    return high


def _bracket_noise_multiplier(meets_target: Callable[[float], bool], target_epsilon: float, epsilon_at: Callable[[float], float]) -> tuple[float, float]:
    """Return (low, high) with epsilon(low) > target >= epsilon(high), by doubling or halving from 1."""
    high = 1.0
    while not meets_target(high):
        if high >= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon} is unreachable: noise_multiplier {MAX_NOISE_MULTIPLIER:g} still gives epsilon {epsilon_at(high):.6g}."
            )
        high = min(2 * high, MAX_NOISE_MULTIPLIER)
    low = high / 2
    while meets_target(low):
        if low <= MIN_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon} is too large to calibrate: noise_multiplier {MIN_NOISE_MULTIPLIER:g} already gives "
                f"epsilon {epsilon_at(low):.6g}, so the smallest noise multiplier lies below the searched range."
            )
        high = low
        low = max(low / 2, MIN_NOISE_MULTIPLIER)
    return low, high


def _check_delta(delta: float) -> None:
    if not (MIN_DELTA <= delta < MAX_DELTA):
        raise ValueError(f"delta must be in [{MIN_DELTA}, {MAX_DELTA}), got {delta}; typical values are below 1 / (number of records).")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}.")


@lru_cache(maxsize=4096)
def _epsilon_for_counts(counts: StepCounts, delta: float, accountant: str) -> float:
    if accountant == "pld":
        return _pld_epsilon(counts, delta)
    return _rdp_epsilon(counts, delta)


# --- RDP -------------------------------------------------------------------


def _rdp_epsilon(counts: StepCounts, delta: float) -> float:
    total_rdp = np.zeros(len(RDP_ORDERS))
    for (noise_multiplier, sampling_rate), steps in counts:
        total_rdp += steps * _rdp_per_step(noise_multiplier, sampling_rate)
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, total_rdp.tolist(), delta)
    return max(float(epsilon), 0.0)


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sampling_rate: float) -> FloatArray:
    rdp = compute_rdp_sampled_gaussian(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, orders=RDP_ORDERS)
    rdp.setflags(write=False)  # shared through the cache
    return rdp


# --- PLD -------------------------------------------------------------------


def _pld_epsilon(counts: StepCounts, delta: float) -> float:
    # Gaussians compose exactly: k steps at sigma_i act as one Gaussian with
    # 1 / sigma^2 = sum_i k_i / sigma_i^2.
    gaussian_precision = sum(steps / noise_multiplier**2 for (noise_multiplier, sampling_rate), steps in counts if sampling_rate == 1)
    subsampled = [(mechanism, steps) for mechanism, steps in counts if mechanism[1] < 1]
    gaussian_noise_multiplier = 1 / math.sqrt(gaussian_precision) if gaussian_precision > 0 else None
    if not subsampled and gaussian_noise_multiplier is not None:
        epsilon = float(dp_accounting.get_epsilon_gaussian(gaussian_noise_multiplier, delta, tol=_GAUSSIAN_ROOT_TOLERANCE))
        return max(epsilon * (1 + _GAUSSIAN_ROOT_RELATIVE_TOLERANCE) + _GAUSSIAN_ROOT_TOLERANCE, 0.0)

    # NOTE: the interval depends on the events, so adding an event can lower
    # the PLD epsilon by up to about PLD_RELATIVE_CHANGE / 3 of its value when
    # the refinement stops at a finer interval. Callers comparing PLD
    # epsilons across calls need that much slack, which RDP does not need.
    rdp_epsilon = _rdp_epsilon(counts, delta)
    if rdp_epsilon > PLD_MAX_EPSILON:
        return rdp_epsilon
    interval = min(max(PLD_START_INTERVAL, PLD_START_INTERVAL_PER_EPSILON * rdp_epsilon), PLD_MAX_START_INTERVAL)
    epsilon = _pld_epsilon_at_interval(subsampled, gaussian_noise_multiplier, delta, interval)
    while interval > PLD_MIN_INTERVAL:
        interval = max(interval / 2, PLD_MIN_INTERVAL)
        finer = _pld_epsilon_at_interval(subsampled, gaussian_noise_multiplier, delta, interval)
        is_settled = abs(epsilon - finer) <= PLD_RELATIVE_CHANGE * finer
        epsilon = finer
        if is_settled:
            break
    return max(epsilon, 0.0)


def _pld_epsilon_at_interval(subsampled: list[tuple[Mechanism, int]], gaussian_noise_multiplier: float | None, delta: float, interval: float) -> float:
    pld_accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    if gaussian_noise_multiplier is not None:
        pld_accountant.compose(dp_accounting.GaussianDpEvent(gaussian_noise_multiplier))
    for (noise_multiplier, sampling_rate), steps in subsampled:
        pld_accountant.compose(dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    return float(pld_accountant.get_epsilon(delta))
