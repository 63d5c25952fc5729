"""Noise schedules that spread a node's epsilon allocation over its planned participations.

Pure module: no Django. Participation k (0-based, of K planned) uses noise
multiplier s * shape_k, with s the smallest scale whose composed epsilon
meets the allocation:

- "even": shape_k = 1, so every participation costs the same;
- "front_loaded": shape_k = 1 + k / (K - 1), so noise doubles from the
  first participation to the last and early rounds, where the model
  changes most, get the larger share of the budget.
"""

import math
from functools import lru_cache

from privacy.accounting import DpSgdEvent, compose_epsilon

SCHEDULES = ("even", "front_loaded")
# Bisection stops when the scale is known to this relative precision.
SCALE_RELATIVE_TOLERANCE = 1e-4
MAX_NOISE_MULTIPLIER = 1e4


@lru_cache(maxsize=1024)
def noise_schedule(*, epsilon: float, delta: float, sampling_rate: float, steps: int, participations: int, schedule: str) -> tuple[float, ...]:
    """Return the noise multiplier of each planned participation.

    Args:
        epsilon: the node's allocation, spent exactly (up to the tolerance,
            never above) after all `participations`.
        delta: the federation's delta.
        sampling_rate: DP-SGD's Poisson sampling rate q on the device.
        steps: DP-SGD steps per participation.
        participations: K, the number of planned participations.
        schedule: "even" or "front_loaded".

    Raises:
        ValueError: on an unknown schedule, invalid numbers, or an allocation
            too small to meet even with the largest supported noise.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}.")
    if participations < 1:
        raise ValueError(f"participations must be at least 1, got {participations}.")
    shapes = _shapes(schedule, participations)

    def epsilon_at(scale: float) -> float:
        events = [DpSgdEvent(noise_multiplier=scale * shape, sampling_rate=sampling_rate, steps=steps) for shape in shapes]
        return compose_epsilon(events, delta=delta)

    low, high = 1e-3, 1.0
    while epsilon_at(high) > epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"An allocation of epsilon {epsilon} cannot cover {participations} participations even with noise multiplier {MAX_NOISE_MULTIPLIER}.")
    # Invariant: epsilon_at(high) <= epsilon; bisect towards the smallest such scale.
    while (high - low) / high > SCALE_RELATIVE_TOLERANCE:
        middle = (low + high) / 2
        if epsilon_at(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return tuple(high * shape for shape in shapes)


def _shapes(schedule: str, participations: int) -> tuple[float, ...]:
    if schedule == "even" or participations == 1:
        return (1.0,) * participations
    return tuple(1.0 + index / (participations - 1) for index in range(participations))
