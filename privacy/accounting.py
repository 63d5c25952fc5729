"""Privacy accounting for record-level DP-SGD with Google's dp-accounting.

Pure module: no Django. A node's spend is the RDP composition of all its
DP-SGD events, converted to (epsilon, delta) once at the end; adding up
per-round epsilons would overstate the loss, and resetting them would hide it.

Each event is `steps` applications of the Poisson-subsampled Gaussian
mechanism (sampling rate q, noise multiplier sigma), as in Abadi et al. 2016,
"Deep Learning with Differential Privacy", and Mironov et al. 2019,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism".
"""

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import dp_accounting

# Integer orders are computed exactly by dp-accounting (its fractional-order
# series can fail to converge near 1 and is then dropped). The large orders
# matter for small total noise, where the optimal order is high.
RDP_ORDERS = tuple(range(2, 129)) + (160, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class DpSgdEvent:
    """`steps` steps of DP-SGD with Poisson sampling rate q and noise multiplier sigma."""

    noise_multiplier: float
    sampling_rate: float
    steps: int

    def __post_init__(self):
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}.")
        if not (0 < self.sampling_rate <= 1):
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}.")


def compose_epsilon(events: Iterable[DpSgdEvent], *, delta: float) -> float:
    """Return epsilon at `delta` of all events composed by the RDP accountant.

    Args:
        events: every DP-SGD event of one node, in any order.
        delta: target delta, 0 < delta < 1.

    Returns:
        Epsilon >= 0; 0.0 for no events.

    Raises:
        ValueError: on an invalid delta.
    """
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    steps_by_mechanism: Counter[tuple[float, float]] = Counter()
    for event in events:
        steps_by_mechanism[(event.noise_multiplier, event.sampling_rate)] += event.steps
    if not steps_by_mechanism:
        return 0.0
    return _epsilon_for_counts(tuple(sorted(steps_by_mechanism.items())), delta)


@lru_cache(maxsize=4096)
def _epsilon_for_counts(counts: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    # Events with identical parameters compose as one self-composed event,
    # so the cost is one RDP evaluation per distinct (sigma, q), and nodes
    # with the same history share a cached result.
    accountant = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    for (noise_multiplier, sampling_rate), steps in counts:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        event = gaussian if sampling_rate == 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
        accountant.compose(event, steps)
    return max(float(accountant.get_epsilon(delta)), 0.0)
