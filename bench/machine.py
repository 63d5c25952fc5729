"""Measure the machine facts that bound the aggregation kernels: read bandwidth, sort speed and transposition.

The aggregation tables in BENCHMARKS.md depend on properties of the
machine that differ between CPUs of the same size:

- how fast one and two threads read a float32 (n, d) array: FedAvg is a
  single read, so its speed-up over Flower is bounded by this bandwidth;
- how fast numpy sorts rows of n float32 values, and how fast column
  blocks of the stack are transposed into such rows: the median and the
  trimmed mean spend most of their time on these two steps.

For n = 100, d = 1e6 the script times, in one process:

- one read of the array with np.add.reduce, on one thread and split
  into two column halves on two threads (numpy releases the GIL inside
  the reduction);
- np.sort and np.partition (at the middle index) of 10,000 rows of n
  float32, int32 and float64 values, per value, and of int32 keys made
  from float32 values (the bits of each value, with the lower 31 flipped
  in negative values, which sort in the order of the values), with the
  time of that conversion;
- transposing the array's column blocks, as the median does, with
  `order_statistics.TRANSPOSE_TILE_ROWS` rows per copy and with whole blocks;
- drawing the central DP noise of a d-parameter model (`privacy.noise.gaussian_noise`
  with `secure_generator`), which DP-FedAvg adds to its two reads.

Each time is the median of --repeats calls, with BLAS on one thread.

Usage:
    .venv/bin/python bench/machine.py --output bench/results/machine.json
"""

import argparse
import json
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from bench.arguments import output_file, positive_count  # noqa: E402
from bench.timing import median_seconds  # noqa: E402
from federation.aggregation.order_statistics import SORT_BLOCK_BYTES, TRANSPOSE_TILE_ROWS  # noqa: E402
from privacy.noise import gaussian_noise, secure_generator  # noqa: E402

NUM_CLIENTS = 100
NUM_PARAMS = 1_000_000
# Rows of NUM_CLIENTS values sorted per timing.
SORTED_ROWS = 10_000


def read_times(stack: np.ndarray, repeats: int) -> dict[str, float]:
    """Time one read of `stack` on one thread and on two threads, each summing half of the columns."""
    half = stack.shape[1] // 2
    halves = [stack[:, :half], stack[:, half:]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {
            "one_thread_ms": 1e3 * median_seconds(lambda: np.add.reduce(stack, axis=0), repeats),
            "two_threads_ms": 1e3 * median_seconds(lambda: list(pool.map(lambda part: np.add.reduce(part, axis=0), halves)), repeats),
        }


def sort_rates(rng: np.random.Generator, repeats: int) -> dict[str, dict[str, float]]:
    """Return ns per value of np.sort and np.partition on SORTED_ROWS rows of NUM_CLIENTS values, per dtype."""
    rates = {}
    for dtype in (np.float32, np.int32, np.float64):
        values = (rng.standard_normal((SORTED_ROWS, NUM_CLIENTS)) * 1e6).astype(dtype)
        rates[np.dtype(dtype).name] = _row_sort_rates(values, repeats)
    bits = rng.standard_normal((SORTED_ROWS, NUM_CLIENTS), dtype=np.float32).view(np.int32)
    keys = np.empty_like(bits)
    mask = np.empty_like(bits)

    def to_keys() -> None:
        np.right_shift(bits, 31, out=mask)
        np.bitwise_and(mask, 0x7FFFFFFF, out=mask)
        np.bitwise_xor(bits, mask, out=keys)

    to_keys()
    rates["float32_int32_keys"] = {**_row_sort_rates(keys, repeats), "conversion_ns_per_value": 1e9 * median_seconds(to_keys, repeats) / bits.size}
    return rates


def _row_sort_rates(values: np.ndarray, repeats: int) -> dict[str, float]:
    """Time sorting and partitioning a copy of every row of `values`, less the time of the copy."""
    work = np.empty_like(values)

    def sort() -> None:
        np.copyto(work, values)
        work.sort(axis=1)

    def partition() -> None:
        np.copyto(work, values)
        work.partition(values.shape[1] // 2, axis=1)

    copy_seconds = median_seconds(lambda: np.copyto(work, values), repeats)
    return {
        "sort_ns_per_value": 1e9 * (median_seconds(sort, repeats) - copy_seconds) / values.size,
        "partition_ns_per_value": 1e9 * (median_seconds(partition, repeats) - copy_seconds) / values.size,
    }


def transpose_times(stack: np.ndarray, repeats: int) -> dict[str, float]:
    """Time transposing every column block of `stack`, TRANSPOSE_TILE_ROWS rows per copy and whole blocks."""
    num_rows, num_params = stack.shape
    width = SORT_BLOCK_BYTES // (num_rows * stack.itemsize)
    buffer = np.empty((width, num_rows), dtype=stack.dtype)

    def transpose(tile_rows: int) -> None:
        for start in range(0, num_params, width):
            columns = slice(start, min(num_params, start + width))
            rows = buffer[: columns.stop - columns.start]
            for first in range(0, num_rows, tile_rows):
                np.copyto(rows[:, first : first + tile_rows], stack[first : first + tile_rows, columns].T)

    return {
        f"tiles_of_{TRANSPOSE_TILE_ROWS}_rows_ms": 1e3 * median_seconds(lambda: transpose(TRANSPOSE_TILE_ROWS), repeats),
        "whole_blocks_ms": 1e3 * median_seconds(lambda: transpose(num_rows), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_count, default=5, help="calls per timing, of which the median is reported (default 5)")
    parser.add_argument("--output", type=output_file, default=BASE_DIR / "bench" / "results" / "machine.json", help="JSON results file")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    noise_generator = secure_generator()
    stack = rng.standard_normal((NUM_CLIENTS, NUM_PARAMS), dtype=np.float32)
    with threadpool_limits(1):
        reads = read_times(stack, args.repeats)
        rates = sort_rates(rng, args.repeats)
        transposes = transpose_times(stack, args.repeats)
        noise_ms = 1e3 * median_seconds(lambda: gaussian_noise((NUM_PARAMS,), std=1.0, rng=noise_generator), args.repeats)
        blas = threadpool_info()
    stack_bytes = stack.nbytes
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {**_cpu_facts(), "cpus": os.cpu_count(), "numpy": np.__version__, "blas": blas},
        "load_average": os.getloadavg(),
        "read": {
            **reads,
            "one_thread_gb_per_second": stack_bytes / reads["one_thread_ms"] / 1e6,
            "two_threads_gb_per_second": stack_bytes / reads["two_threads_ms"] / 1e6,
        },
        "values_per_sorted_row": NUM_CLIENTS,
        "sort": rates,
        "transpose_one_thread": transposes,
        "gaussian_noise_ms": noise_ms,
    }
    print(json.dumps(report, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


def _cpu_facts() -> dict[str, object]:
    """Return the first CPU's model name, family and model numbers, and whether it has AVX2 and AVX-512, from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name") or platform.processor() or "unknown",
        "cpu_family": fields.get("cpu family"),
        "cpu_model_number": fields.get("model"),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
    }


if __name__ == "__main__":
    main()
