"""Wall-clock timing shared by the benchmark scripts."""

import math
import statistics
import time
from collections.abc import Callable


def median_seconds(call: Callable[[], object], repeats: int, *, stop_after_seconds: float = math.inf) -> float:
    """Return the median wall time of `repeats` calls of `call`, in seconds.

    Stops early once a call takes longer than `stop_after_seconds`, so a slow
    call is timed once instead of `repeats` times.
    """
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
        if times[-1] > stop_after_seconds:
            break
    return statistics.median(times)
