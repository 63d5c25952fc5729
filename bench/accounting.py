"""Accounting numbers and timings: the DP-SGD MNIST setting, composition and calibration.

    .venv/bin/python bench/accounting.py

Prints one JSON object. Each timing is the best of three runs on cold
caches of FLO's accountant (privacy.accounting), beside dp-accounting's own
RDP and PLD accountants for the same events.
"""

import json
import sys
import time
from pathlib import Path

import dp_accounting

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privacy import accounting  # noqa: E402
from privacy.accounting import DpSgdEvent, calibrate_noise_multiplier, compose_epsilon  # noqa: E402

# Abadi et al. 2016: batch 256 of 60,000 examples, noise 1.1, 60 epochs, delta 1e-5.
MNIST = {"noise_multiplier": 1.1, "sampling_rate": 256 / 60000, "steps": round(60 * 60000 / 256), "delta": 1e-5}


def best_seconds(function, repeats: int = 3) -> float:
    timings = []
    for _ in range(repeats):
        accounting._epsilon_for_counts.cache_clear()
        accounting._rdp_per_step.cache_clear()
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return min(timings)


def dp_accounting_epsilon(accountant) -> float:
    event = dp_accounting.PoissonSampledDpEvent(MNIST["sampling_rate"], dp_accounting.GaussianDpEvent(MNIST["noise_multiplier"]))
    accountant.compose(event, MNIST["steps"])
    return accountant.get_epsilon(MNIST["delta"])


def main() -> int:
    mnist_event = [DpSgdEvent(MNIST["noise_multiplier"], MNIST["sampling_rate"], MNIST["steps"])]
    distinct_events = [DpSgdEvent(1.0 + index / 100, 0.05, 10) for index in range(100)]
    result = {
        "mnist": {
            **MNIST,
            "flo_rdp_epsilon": compose_epsilon(mnist_event, delta=MNIST["delta"], accountant="rdp"),
            "flo_pld_epsilon": compose_epsilon(mnist_event, delta=MNIST["delta"], accountant="pld"),
            "dp_accounting_rdp_epsilon": dp_accounting_epsilon(dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))),
            "dp_accounting_pld_epsilon": dp_accounting_epsilon(dp_accounting.pld.PLDAccountant()),
        },
        "seconds": {
            "rdp_1000_identical_events": best_seconds(lambda: compose_epsilon([DpSgdEvent(1.1, 0.01, 1)] * 1000, delta=1e-5)),
            "rdp_100_distinct_events": best_seconds(lambda: compose_epsilon(distinct_events, delta=1e-5)),
            "pld_mnist": best_seconds(lambda: compose_epsilon(mnist_event, delta=1e-5, accountant="pld")),
            "rdp_calibration_mnist_epsilon_3": best_seconds(
                lambda: calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sampling_rate=MNIST["sampling_rate"], steps=MNIST["steps"])
            ),
            "pld_calibration_1000_users_epsilon_3": best_seconds(
                lambda: calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sampling_rate=0.3, steps=100, accountant="pld")
            ),
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
