"""Time FLO's aggregation rules against Flower 1.42.0's and against one read of the updates.

For each (n clients, d parameters) case the script builds one float32
(n, d) array of N(0, 1) updates and, in the same process and run, times:

- the read floor: np.add.reduce over the array, one pass over its bytes;
- each FLO rule through its public entry point. That is `aggregate_updates`
  on the array, and for the `_rows` rules on a `RowStack` of its rows, the
  way the server reads stored updates. FedAvg streamed one update at a time
  uses `weighted_average`. DP-FedAvg uses `dp_fedavg_aggregate` fed one row
  at a time, and `dp_fedavg_aggregate_stack` on the array, which the server
  runs on a `RowStack`;
- Flower's function for the same rule (`flwr.server.strategy.aggregate`, and
  for DP-FedAvg the per-client `compute_clip_model_update`, `aggregate` and
  `add_gaussian_noise_inplace` that Flower's DifferentialPrivacyServerSideFixedClipping
  runs), given each update as a one-layer list without copying it.

Times are medians over --repeats calls (one call when a call takes more than
--rerun-limit-seconds). The JSON gives per rule `vs_floor`, FLO's time over
the floor's (lower is faster), and `vs_flower`, Flower's time over FLO's
(higher is faster), absent where Flower's call was skipped (null in
`ratios`). Peak extra memory is measured in a separate call with
tracemalloc, which sees numpy's allocations; the (n, d) input is not counted.
Cases whose input or Flower's copies would pass --max-gib, and Flower calls
whose estimated time passes --flower-limit-seconds, are skipped and listed
with the reason.

Flower's rules allocate a scaled or stacked copy of every update, and
their time depends on whether glibc's malloc hands them memory it kept
from earlier calls or new pages that the kernel must fault in: Flower's
`aggregate` at n = 100, d = 1e6 took about 70 ms with reused memory and
600 to 700 ms with new pages on a 2-core AMD EPYC machine, and between
the two, depending on earlier allocations, with glibc's defaults.
--malloc fixes the regime for the whole run by restarting the script with
GLIBC_TUNABLES set: "reuse" (the default) keeps freed memory for later
calls, which is Flower's fastest case; "fresh" maps every allocation of
128 KiB or more anew; "system" keeps the environment as it is.

FLO's sorts (median, trimmed mean, Bulyan) and its sums, norms and
distances on large stacks run on one thread per CPU the process may use
(at most kernels.MAX_SPAN_THREADS); Flower's rules run on one thread.
--cpus 1 pins every thread of the process to one CPU, so both run on one.

NOTE: Flower's FedAvg strategy calls `aggregate_inplace` by default
(inplace=True), which scales and adds each deserialized update in place
instead of making a scaled copy. This script times `aggregate`, the
function FedAvg calls with inplace=False, because the comparison it
reproduces was stated against it. `aggregate_inplace` is not timed.

Usage:
    .venv/bin/python bench/aggregation.py            # all sizes that fit
    .venv/bin/python bench/aggregation.py --quick    # n in {10, 100}, d in {1e5, 1e6}; about 1 minute on an idle machine
    .venv/bin/python bench/aggregation.py --quick --json
"""

import argparse
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))

import numpy as np  # noqa: E402

try:
    from flwr.server.strategy.aggregate import aggregate, aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_clip_model_update, compute_stdv
except ImportError as error:
    sys.exit(f"bench/aggregation.py cannot import Flower (flwr): {error}. Install it with `make .venv/.test-installed`.")
from threadpoolctl import threadpool_info  # noqa: E402

from bench.arguments import output_file, positive_count, positive_number  # noqa: E402
from bench.timing import median_seconds  # noqa: E402
from federation.aggregation.fedavg import weighted_average  # noqa: E402
from federation.aggregation.kernels import MAX_SPAN_THREADS, RowStack, available_cpus  # noqa: E402
from federation.aggregation.robust import RuleConfig, RulePreconditionError, aggregate_updates  # noqa: E402
from privacy.central_dp import dp_fedavg_aggregate, dp_fedavg_aggregate_stack  # noqa: E402

RESULTS_DIR = BASE_DIR / "bench" / "results"
# GLIBC_TUNABLES per --malloc regime. A fixed mmap threshold turns off
# glibc's dynamic threshold. "reuse" serves every allocation below 32 MiB,
# the maximum glibc allows, from the heap and never trims the heap.
# "fresh" maps every allocation of 128 KiB or more and unmaps it when freed.
MALLOC_TUNABLES = {
    "reuse": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184",
    "fresh": "glibc.malloc.mmap_threshold=131072",
}
NUM_CLIENTS = (10, 100, 1000)
NUM_PARAMS = (100_000, 1_000_000, 10_000_000)
QUICK_NUM_CLIENTS = (10, 100)
QUICK_NUM_PARAMS = (100_000, 1_000_000)
# The order in which a run times the rules, whatever order --rules gives.
RULES = ("fedavg", "fedavg_rows", "fedavg_stream", "dp_fedavg_stack", "dp_fedavg", "median", "median_rows", "trimmed_mean", "krum", "multi_krum", "bulyan")
# Rules run on a RowStack of the array's rows, as the server reads stored updates, and the rule they repeat.
ROW_STACK_RULES = {"fedavg_rows": "fedavg", "median_rows": "median"}
# Rules that Flower runs as the same function as an earlier rule of RULES,
# whose Flower time they reuse: the RowStack rules, which read the array's
# rows as the server reads stored updates, and FLO's one-update-at-a-time
# paths. Timing the same Flower call twice in one case gave two rows
# different Flower times: with --quick, a slow first call was timed once.
SAME_FLOWER_CALL = {"fedavg_rows": "fedavg", "fedavg_stream": "fedavg", "median_rows": "median", "dp_fedavg": "dp_fedavg_stack"}
TRIM_FRACTION = 0.1
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
RERUN_LIMIT_SECONDS = 5.0
# --quick times a call once when it takes longer than this. The slow calls are
# Flower's robust rules and FLO's Bulyan, and their spread between calls is small next to their ratios.
QUICK_RERUN_LIMIT_SECONDS = 1.0
# Seconds per float32 element that Flower's pairwise loop touches, an
# estimate: its Krum took about 1.7 ns per element at n = 100, d = 1e6 on the
# loaded 2-core virtual machine.
FLOWER_SECONDS_PER_PAIR_ELEMENT = 1.5e-9
# Full (n, d) copies each Flower rule allocates besides its input.
FLOWER_COPIES = {"fedavg": 1, "fedavg_rows": 1, "median_rows": 2, "fedavg_stream": 1, "dp_fedavg": 2, "dp_fedavg_stack": 2, "median": 2, "trimmed_mean": 2, "krum": 1, "multi_krum": 2, "bulyan": 2}


def num_byzantine(rule: str, num_clients: int) -> int:
    """f for the Krum family: a tenth of the clients, within each rule's precondition."""
    if rule == "bulyan":
        return max(0, min(num_clients // 10, (num_clients - 3) // 4))
    return max(0, min(num_clients // 10, (num_clients - 3) // 2))


def flo_call(rule: str, stack: np.ndarray, counts: list[int]) -> Callable[[], object]:
    """Return a call of FLO's entry point for `rule` on `stack`."""
    num_clients, num_params = stack.shape
    if rule in ROW_STACK_RULES:
        rows = RowStack(list(stack))
        row_config = RuleConfig(name=ROW_STACK_RULES[rule])
        return lambda: aggregate_updates(rows, num_examples=counts, config=row_config)
    if rule == "fedavg_stream":
        return lambda: weighted_average((({"w": row}, count) for row, count in zip(stack, counts, strict=True)), tensor_names=["w"])
    if rule == "dp_fedavg":
        return lambda: dp_fedavg_aggregate(
            ({"w": row} for row in stack),
            tensor_shapes={"w": (num_params,)},
            clip_norm=CLIP_NORM,
            noise_multiplier=NOISE_MULTIPLIER,
            expected_participants=num_clients,
            rng=np.random.default_rng(0),
        )
    if rule == "dp_fedavg_stack":
        return lambda: dp_fedavg_aggregate_stack(
            stack,
            tensor_shapes={"w": (num_params,)},
            clip_norm=CLIP_NORM,
            noise_multiplier=NOISE_MULTIPLIER,
            expected_participants=num_clients,
            rng=np.random.default_rng(0),
        )
    config = {
        "fedavg": RuleConfig(name="fedavg"),
        "median": RuleConfig(name="median"),
        "trimmed_mean": RuleConfig(name="trimmed_mean", trim_fraction=TRIM_FRACTION),
        "krum": RuleConfig(name="krum", num_byzantine=num_byzantine("krum", num_clients)),
        "multi_krum": RuleConfig(name="multi_krum", num_byzantine=num_byzantine("multi_krum", num_clients)),
        "bulyan": RuleConfig(name="bulyan", num_byzantine=num_byzantine("bulyan", num_clients)),
    }[rule]
    return lambda: aggregate_updates(stack, num_examples=counts, config=config)


def flower_call(rule: str, stack: np.ndarray, counts: list[int]) -> Callable[[], object]:
    """Return a call of Flower's function for `rule`; each update is a one-layer list viewing a row of `stack`."""
    num_clients = stack.shape[0]
    results = [([row], count) for row, count in zip(stack, counts, strict=True)]
    rule = ROW_STACK_RULES.get(rule, rule)
    if rule in ("fedavg", "fedavg_stream"):
        return lambda: aggregate(results)
    if rule in ("dp_fedavg", "dp_fedavg_stack"):
        return lambda: flower_dp_fedavg(results, num_params=stack.shape[1])
    if rule == "median":
        return lambda: aggregate_median(results)
    if rule == "trimmed_mean":
        return lambda: aggregate_trimmed_avg(results, proportiontocut=TRIM_FRACTION)
    if rule == "krum":
        return lambda: aggregate_krum(results, num_malicious=num_byzantine("krum", num_clients), to_keep=0)
    if rule == "multi_krum":
        f = num_byzantine("multi_krum", num_clients)
        return lambda: aggregate_krum(results, num_malicious=f, to_keep=num_clients - f)
    # aggregate_bulyan removes the selected pairs from the list it is given, so each call gets a copy of the list.
    return lambda: aggregate_bulyan(list(results), num_malicious=num_byzantine("bulyan", num_clients), aggregation_rule=aggregate_krum, to_keep=0)


def flower_dp_fedavg(results: list, *, num_params: int) -> list:
    """Run the arithmetic of Flower 1.42.0's DifferentialPrivacyServerSideFixedClipping.aggregate_fit, without its serialisation.

    Each client's parameters are clipped against the current model (zeros
    here, so the update is the parameters), averaged with `aggregate` and
    noised with std z C / n. The wrapped FedAvg averages with `aggregate`
    only with inplace=False (see the module's NOTE).
    """
    current = [np.zeros(num_params, dtype=np.float32)]
    clipped = []
    for layers, count in results:
        parameters = list(layers)
        compute_clip_model_update(parameters, current, CLIP_NORM)
        clipped.append((parameters, count))
    averaged = aggregate(clipped)
    add_gaussian_noise_inplace(averaged, compute_stdv(NOISE_MULTIPLIER, CLIP_NORM, len(results)))
    return averaged


def estimated_flower_seconds(rule: str, num_clients: int, num_params: int) -> float:
    """Estimate Flower's time for the rules whose pairwise loop is O(n^2 d); 0 for the others."""
    if rule in ("krum", "multi_krum"):
        return num_clients**2 * num_params * FLOWER_SECONDS_PER_PAIR_ELEMENT
    if rule == "bulyan":
        # theta = n - 2f Krum calls on a shrinking list: about theta * n^2 / 3 pairs.
        theta = num_clients - 2 * num_byzantine("bulyan", num_clients)
        return theta * num_clients**2 / 3 * num_params * FLOWER_SECONDS_PER_PAIR_ELEMENT
    return 0.0


def peak_extra_bytes(call: Callable[[], object]) -> int:
    """Return the peak memory that `call` allocates, as tracemalloc records it, including its result."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - baseline


def run_case(num_clients: int, num_params: int, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """Time every rule on one (num_clients, num_params) case and return its record."""
    stack_bytes = num_clients * num_params * 4
    max_bytes = args.max_gib * 2**30
    record: dict = {"num_clients": num_clients, "num_params": num_params, "stack_mib": stack_bytes / 2**20, "rules": {}, "skipped": []}
    if stack_bytes > max_bytes:
        record["skipped"].append({"what": "case", "reason": f"the input alone needs {stack_bytes / 2**30:.1f} GiB, over --max-gib {args.max_gib}"})
        return record

    rng = np.random.default_rng(num_clients * 7 + num_params)
    stack = rng.standard_normal((num_clients, num_params), dtype=np.float32)
    counts = [int(count) for count in rng.integers(1, 500, size=num_clients)]
    floor_seconds = median_seconds(lambda: np.add.reduce(stack, axis=0), max(args.repeats, 5), stop_after_seconds=args.rerun_limit_seconds)
    record["floor_seconds"] = floor_seconds
    record["floor_gb_per_second"] = stack_bytes / floor_seconds / 1e9
    model_bytes = num_params * 4

    for rule in args.rules:
        entry: dict = {}
        flo = flo_call(rule, stack, counts)
        try:
            entry["flo_seconds"] = median_seconds(flo, args.repeats, stop_after_seconds=args.rerun_limit_seconds)
        except RulePreconditionError as error:
            # Too few clients for the rule, such as Krum with n < 3.
            record["skipped"].append({"what": rule, "reason": str(error)})
            continue
        entry["flo_peak_mib"] = peak_extra_bytes(flo) / 2**20
        entry["flo_peak_model_copies"] = entry["flo_peak_mib"] * 2**20 / model_bytes
        entry["gb_per_second"] = stack_bytes / entry["flo_seconds"] / 1e9
        entry["vs_floor"] = entry["flo_seconds"] / floor_seconds

        flower_estimate = estimated_flower_seconds(rule, num_clients, num_params)
        flower_bytes = stack_bytes * (1 + FLOWER_COPIES[rule])
        same_flower = record["rules"].get(SAME_FLOWER_CALL.get(rule, ""), {})
        if "flower_seconds" in same_flower:
            entry.update({key: value for key, value in same_flower.items() if key.startswith("flower_")})
            entry["vs_flower"] = entry["flower_seconds"] / entry["flo_seconds"]
        elif flower_estimate > args.flower_limit_seconds:
            record["skipped"].append({"what": f"flower {rule}", "reason": f"estimated {flower_estimate:.0f} s, over --flower-limit-seconds {args.flower_limit_seconds}"})
        elif flower_bytes > max_bytes:
            record["skipped"].append({"what": f"flower {rule}", "reason": f"its copies need about {flower_bytes / 2**30:.1f} GiB, over --max-gib {args.max_gib}"})
        else:
            flower = flower_call(rule, stack, counts)
            entry["flower_seconds"] = median_seconds(flower, args.repeats, stop_after_seconds=args.rerun_limit_seconds)
            if not args.skip_flower_memory:
                entry["flower_peak_mib"] = peak_extra_bytes(flower) / 2**20
                entry["flower_peak_model_copies"] = entry["flower_peak_mib"] * 2**20 / model_bytes
            entry["vs_flower"] = entry["flower_seconds"] / entry["flo_seconds"]
        record["rules"][rule] = entry
        log(format_row(num_clients, num_params, rule, entry))
    return record


def format_row(num_clients: int, num_params: int, rule: str, entry: dict) -> str:
    flower = f"{entry['flower_seconds'] * 1000:10.1f} | {entry['vs_flower']:7.1f}x" if "vs_flower" in entry else f"{'skipped':>10} | {'-':>8}"
    flower_memory = f"{entry['flower_peak_mib']:9.1f}" if "flower_peak_mib" in entry else f"{'-':>9}"
    return (
        f"| {num_clients:5d} | {num_params:9.3g} | {rule:15s} | {entry['flo_seconds'] * 1000:9.1f} | {entry['gb_per_second']:6.2f} | "
        f"{entry['vs_floor']:6.2f}x | {flower} | {entry['flo_peak_mib']:8.1f} | {flower_memory} |"
    )


def restart_with_malloc_regime(regime: str) -> None:
    """Replace this process by the same command with GLIBC_TUNABLES set for `regime`, unless it is set already."""
    tunables = MALLOC_TUNABLES.get(regime)
    if tunables is None or os.environ.get("GLIBC_TUNABLES") == tunables:
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables})


def describe_machine() -> dict:
    """Return the CPU model, core count, memory, and numpy and BLAS versions."""
    cpu_model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory_gib = round(total_kib / 2**20, 1)
    blas = [{key: library.get(key) for key in ("internal_api", "version", "architecture", "num_threads")} for library in threadpool_info() if library.get("user_api") == "blas"]
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        # Threads of FLO's sorts, sums, norms and distances on large stacks (kernels.map_column_spans, map_row_spans).
        # Krum's Gram matrix and the one-update-at-a-time paths use one.
        "flo_threads": min(MAX_SPAN_THREADS, available_cpus()),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "load_average": os.getloadavg(),
    }


def pin_threads(cpus: list[int]) -> None:
    """Restrict every thread of this process to `cpus`, BLAS threads started at numpy's import included."""
    task_dir = Path("/proc/self/task")
    thread_ids = [int(name) for name in os.listdir(task_dir)] if task_dir.is_dir() else [0]
    for thread_id in thread_ids:
        os.sched_setaffinity(thread_id, cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run n in {10, 100} and d in {1e5, 1e6} only, timing calls over 1 s once")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, and the table on stderr")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES), help="rules to time, in the order of the choices (default: all)")
    parser.add_argument("--clients", nargs="+", type=positive_count, help="numbers of clients n (default: 10 100 1000)")
    parser.add_argument("--params", nargs="+", type=positive_count, help="numbers of parameters d, such as 1e6 (default: 1e5 1e6 1e7)")
    parser.add_argument("--repeats", type=positive_count, default=5, help="calls per timing; the median is reported (default 5)")
    parser.add_argument("--rerun-limit-seconds", type=positive_number, default=RERUN_LIMIT_SECONDS, help="time a call once if it takes longer, in seconds (default 5)")
    parser.add_argument("--max-gib", type=positive_number, default=8.0, help="memory for the input plus Flower's copies, in GiB (default 8)")
    parser.add_argument("--flower-limit-seconds", type=positive_number, default=60.0, help="skip Flower calls estimated to take longer, in seconds (default 60; at most 20 with --quick)")
    parser.add_argument("--skip-flower-memory", action="store_true", help="do not measure Flower's peak memory, which repeats each Flower call once")
    parser.add_argument("--cpus", type=int, help="run on this many of the CPUs the process may use, to time FLO's sorting threads (default: all)")
    parser.add_argument("--malloc", choices=["reuse", "fresh", "system"], default="reuse", help="glibc malloc regime for the run (default: reuse)")
    parser.add_argument("--output", type=output_file, help="JSON results file (default: bench/results/aggregation[-quick].json)")
    args = parser.parse_args()
    restart_with_malloc_regime(args.malloc)
    if args.cpus is not None:
        allowed = sorted(os.sched_getaffinity(0))
        if not 1 <= args.cpus <= len(allowed):
            parser.error(f"--cpus must be from 1 to {len(allowed)}, the CPUs this process may use")
        pin_threads(allowed[: args.cpus])
    if args.quick:
        args.flower_limit_seconds = min(args.flower_limit_seconds, 20.0)
        args.skip_flower_memory = True
        args.rerun_limit_seconds = min(args.rerun_limit_seconds, QUICK_RERUN_LIMIT_SECONDS)
    num_clients_list = args.clients or (QUICK_NUM_CLIENTS if args.quick else NUM_CLIENTS)
    num_params_list = args.params or (QUICK_NUM_PARAMS if args.quick else NUM_PARAMS)
    args.rules = [rule for rule in RULES if rule in args.rules]

    def log(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    log("| n | d | rule | FLO ms | GB/s | vs floor | Flower ms | speed-up | FLO peak MiB | Flower peak MiB |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    load_average_at_start = os.getloadavg()
    cases = [run_case(num_clients, num_params, args, log) for num_clients in num_clients_list for num_params in num_params_list]
    for case in cases:
        for skipped in case["skipped"]:
            log(f"skipped n={case['num_clients']} d={case['num_params']:.0e} {skipped['what']}: {skipped['reason']}")

    ratios = {}
    for case in cases:
        if case["num_clients"] == 100 and case["num_params"] == 1_000_000:
            ratios = {rule: {"vs_floor": entry["vs_floor"], "vs_flower": entry.get("vs_flower")} for rule, entry in case["rules"].items()}
    if not ratios:
        print("The ratios field is empty because it reports only n = 100, d = 1e6, which this run did not time. To fill it, add 100 to --clients and 1e6 to --params.", file=sys.stderr, flush=True)
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "malloc": args.malloc,
        "machine": describe_machine(),
        "load_average_at_start": load_average_at_start,
        "duration_seconds": time.perf_counter() - started,
        "cases": cases,
        "ratios": ratios,
    }
    output = args.output or RESULTS_DIR / ("aggregation-quick.json" if args.quick else "aggregation.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        log(f"wrote {output} in {report['duration_seconds']:.0f} s")


if __name__ == "__main__":
    main()
