"""The median timing of the benchmark scripts."""

import time

from bench.timing import median_seconds


def test_median_seconds_calls_repeats_times():
    calls = []

    median_seconds(lambda: calls.append(1), 5)

    assert len(calls) == 5


def test_median_seconds_stops_after_slow_call():
    calls = []

    def slow() -> None:
        calls.append(1)
        time.sleep(0.02)

    median_seconds(slow, 5, stop_after_seconds=0.01)

    assert len(calls) == 1


def test_median_seconds_returns_median_of_calls():
    delays = iter([0.0, 0.05, 0.0])

    seconds = median_seconds(lambda: time.sleep(next(delays)), 3)

    assert seconds < 0.04
