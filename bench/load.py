"""Load run of production mode: many devices enrol and submit signed updates at once.

The script starts everything itself on 127.0.0.1: a fresh database on the
PostgreSQL server at --database-url (dropped afterwards), a private
redis-server on a free port, uvicorn with --workers processes and one
Celery worker. Then --devices simulated devices (asyncio + httpx, at most
--concurrency requests in flight) enrol, fetch their task and submit one
signed update of --params float32 parameters each to the same round. It
reports the throughput and latency percentiles of the submissions, and
checks that every device's update was accepted and stored exactly once and
that the round aggregated into one new model version.

Usage:
    .venv/bin/python bench/load.py [--devices 1000] [--params 100000] [--workers 2] [--concurrency 64] [--json]
"""

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flo_client import signing, wire  # noqa: E402
from flo_site.server_process import (  # noqa: E402
    BASE_DIR,
    find_free_port,
    start_celery_worker,
    start_redis,
    start_server,
    stop_server,
    wait_for_log_line,
    wait_until_healthy,
)

NUM_CLASSES = 10
MAX_ATTEMPTS = 5
ROUND_TIMEOUT_SECONDS = 600


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices, all in one round (default 1000)")
    parser.add_argument("--params", type=int, default=100_000, help="parameters per update, a multiple of 10 (default 100000)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (default 64)")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/test", help="PostgreSQL server to create the run's database on")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    if args.params % NUM_CLASSES or args.params < 2 * NUM_CLASSES:
        parser.error(f"--params must be a multiple of {NUM_CLASSES} and at least {2 * NUM_CLASSES}, got {args.params}.")
    if args.devices < 1 or args.concurrency < 1 or args.workers < 1:
        parser.error("--devices, --concurrency and --workers must be positive.")
    return args


def manage(environment: dict[str, str], *arguments: str) -> str:
    completed = subprocess.run([sys.executable, "manage.py", *arguments], cwd=BASE_DIR, env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(arguments)} failed: {completed.stderr[-2000:]}")
    return completed.stdout


def signed_headers(node_id: str, secret: bytes, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    return signing.sign_request(node_id=node_id, secret=secret, method=method, path=path, body=body, timestamp=int(time.time()))


async def run_devices(base_url: str, tokens: list[str], *, num_features: int, concurrency: int, start_round, cpu_snapshot) -> dict:
    """Enrol every device, start the round, then have every device fetch its task and submit; return timings and CPU seconds of the submission phase."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0, limits=limits) as client:

        retries = {"count": 0}

        async def send(method: str, path: str, **kwargs) -> httpx.Response:
            # The server closes idle keep-alive connections after 5 s; a request
            # sent on one as it closes fails, so it is sent again, as devices do.
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    return await client.request(method, path, **{key: value() if callable(value) else value for key, value in kwargs.items()})
                except httpx.TransportError:
                    if attempt == MAX_ATTEMPTS:
                        raise
                    retries["count"] += 1
                    await asyncio.sleep(0.1 * attempt)
            raise AssertionError("unreachable")

        async def enrol(index: int, token: str) -> tuple[str, bytes]:
            async with semaphore:
                response = await send("POST", "/api/v1/enrol", json={"token": token, "display_name": f"load-{index:04d}"})
            response.raise_for_status()
            body = response.json()
            return body["node_id"], base64.urlsafe_b64decode(body["secret"])

        started = time.perf_counter()
        credentials = await asyncio.gather(*(enrol(index, token) for index, token in enumerate(tokens)))
        enrol_seconds = time.perf_counter() - started
        await asyncio.to_thread(start_round)

        rng = np.random.default_rng(0)
        payload_tensors = {
            "weight": rng.normal(scale=0.01, size=(num_features, NUM_CLASSES)).astype(np.float32),
            "bias": np.zeros(NUM_CLASSES, dtype=np.float32),
        }

        async def submit(node_id: str, secret: bytes) -> tuple[int, str, float]:
            async with semaphore:
                task = await send("GET", "/api/v1/task", headers=lambda: signed_headers(node_id, secret, "GET", "/api/v1/task"))
                task.raise_for_status()
                round_info = task.json()["round"]
                body = wire.encode_tensors(payload_tensors, {"round": round_info["number"], "model_version": round_info["model_version"], "num_examples": 10})
                sent = time.perf_counter()
                response = await send(
                    "POST", "/api/v1/updates", content=body, headers=lambda: {**signed_headers(node_id, secret, "POST", "/api/v1/updates", body), "Content-Type": wire.MEDIA_TYPE}
                )
                latency = time.perf_counter() - sent
            code = response.json().get("status") or response.json().get("code", "")
            # A resent submission that finds its update stored was accepted by the first attempt.
            status = 202 if code == "duplicate_update" else response.status_code
            return status, code, latency

        cpu_before = cpu_snapshot()
        started = time.perf_counter()
        results = await asyncio.gather(*(submit(node_id, secret) for node_id, secret in credentials))
        submit_seconds = time.perf_counter() - started
        cpu_after = cpu_snapshot()
    cpu_seconds = {group: cpu_after[group] - cpu_before.get(group, 0.0) for group in cpu_after}
    return {"enrol_seconds": enrol_seconds, "submit_seconds": submit_seconds, "results": results, "retries": retries["count"], "cpu_seconds": cpu_seconds}


def process_cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds a process used so far, or 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Fields 14 and 15 of /proc/<pid>/stat (utime, stime), counted after the ")" that ends field 2.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """Return pid and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def cpu_snapshot_of(*, server_pid: int, worker_pid: int, redis_pid: int, database_url: str, database_name: str):
    """Return a function that reports CPU seconds so far per part of the system: client, ASGI server, Celery, Redis, PostgreSQL backends."""

    def snapshot() -> dict[str, float]:
        with psycopg.connect(database_url, autocommit=True) as connection:
            backend_pids = [row[0] for row in connection.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database_name,))]
        return {
            "client": process_cpu_seconds(os.getpid()),
            "asgi": sum(process_cpu_seconds(pid) for pid in process_tree(server_pid)),
            "celery": sum(process_cpu_seconds(pid) for pid in process_tree(worker_pid)),
            "redis": process_cpu_seconds(redis_pid),
            "postgres": sum(process_cpu_seconds(pid) for pid in backend_pids),
        }

    return snapshot


def main() -> None:
    args = parse_args()
    num_features = args.params // NUM_CLASSES - 1
    database_name = f"flo_load_{uuid.uuid4().hex[:10]}"
    server_url = args.database_url.rsplit("/", 1)[0]
    with psycopg.connect(args.database_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database_name}"')
    processes = []
    with tempfile.TemporaryDirectory(prefix="flo-load-") as directory:
        workdir = Path(directory)
        try:
            redis_port = find_free_port()
            processes.append(start_redis(port=redis_port, log_path=workdir / "redis.log"))
            environment = {
                **{key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"},
                "DATABASE_URL": f"{server_url}/{database_name}",
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "FLO_DATA_DIR": str(workdir),
                "FLO_LOG_LEVEL": "WARNING",
                # Production serves with DEBUG off, which also stops Django from recording every query.
                "DJANGO_DEBUG": "false",
                "FLO_ENROLMENT_THROTTLE": "1000000/minute",
                "FLO_DB_POOL_SIZE": os.environ.get("FLO_DB_POOL_SIZE", "8"),
            }
            time.sleep(0.5)
            manage(environment, "migrate", "--verbosity", "0")
            config = {
                "name": "load",
                "model_spec": {"kind": "softmax_regression", "num_features": num_features, "num_classes": NUM_CLASSES},
                "training_plan": {"learning_rate": 0.1, "batch_size": 8, "local_epochs": 1},
                "round_size": args.devices,
                "min_updates": args.devices,
                "round_deadline_seconds": 3600,
                "max_rounds": 1,
            }
            (workdir / "federation.json").write_text(json.dumps(config))
            federation_id = json.loads(manage(environment, "create_federation", str(workdir / "federation.json")))["federation_id"]
            tokens = json.loads(manage(environment, "issue_enrolment_tokens", "--federation", str(federation_id), "--count", str(args.devices)))

            worker_log = workdir / "worker.log"
            worker = start_celery_worker(environment=environment, log_path=worker_log)
            processes.append(worker)
            wait_for_log_line(worker_log, "ready.", worker)
            port = find_free_port()
            server = start_server(port=port, environment=environment, log_path=workdir / "asgi.log", workers=args.workers)
            processes.append(server)
            base_url = f"http://127.0.0.1:{port}"
            wait_until_healthy(base_url, server, workdir / "asgi.log")

            timings = asyncio.run(
                run_devices(
                    base_url,
                    tokens,
                    num_features=num_features,
                    concurrency=args.concurrency,
                    start_round=lambda: manage(environment, "start_federation", str(federation_id)),
                    cpu_snapshot=cpu_snapshot_of(
                        server_pid=server.pid, worker_pid=worker.pid, redis_pid=processes[0].pid, database_url=environment["DATABASE_URL"], database_name=database_name
                    ),
                )
            )
            round_seconds = wait_for_closed_round(environment["DATABASE_URL"], federation_id)
            report = build_report(args, timings, environment["DATABASE_URL"], federation_id, round_seconds)
        except Exception:
            for log_name in ("asgi.log", "worker.log"):
                log_path = workdir / log_name
                if log_path.exists():
                    print(f"--- end of {log_name} ---\n{log_path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            raise
        finally:
            for process in reversed(processes):
                stop_server(process)
            with psycopg.connect(args.database_url, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{database_name}" WITH (FORCE)')
    print_report(report, as_json=args.json)


def wait_for_closed_round(database_url: str, federation_id: int) -> float:
    """Wait until round 1 closed; return the seconds waited."""
    started = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as connection:
        while True:
            state = connection.execute("SELECT state FROM federation_traininground WHERE federation_id = %s AND number = 1", (federation_id,)).fetchone()
            if state and state[0] in ("closed", "failed"):
                return time.perf_counter() - started
            if time.perf_counter() - started > ROUND_TIMEOUT_SECONDS:
                raise RuntimeError(f"Round 1 did not close within {ROUND_TIMEOUT_SECONDS} seconds (state {state}).")
            time.sleep(0.5)


def build_report(args, timings: dict, database_url: str, federation_id: int, round_seconds: float) -> dict:
    statuses = [status for status, _, _ in timings["results"]]
    latencies = sorted(latency for _, _, latency in timings["results"])
    accepted = statuses.count(202)
    with psycopg.connect(database_url) as connection:
        stored = connection.execute(
            "SELECT count(*), count(DISTINCT u.node_id) FROM federation_modelupdate u JOIN federation_traininground r ON u.round_id = r.id WHERE r.federation_id = %s",
            (federation_id,),
        ).fetchone()
        versions = connection.execute("SELECT count(*) FROM federation_modelversion WHERE federation_id = %s", (federation_id,)).fetchone()[0]
        state = connection.execute("SELECT state FROM federation_traininground WHERE federation_id = %s AND number = 1", (federation_id,)).fetchone()[0]
    return {
        "devices": args.devices,
        "params": args.params,
        "update_bytes": 4 * args.params,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "enrolments_per_second": round(args.devices / timings["enrol_seconds"], 1),
        "accepted": accepted,
        "requests_sent_again": timings["retries"],
        "rejected_by_status": {str(status): statuses.count(status) for status in sorted(set(statuses)) if status != 202},
        "submit_seconds": round(timings["submit_seconds"], 2),
        "accepted_per_second": round(accepted / timings["submit_seconds"], 1),
        "latency_p50_seconds": round(statistics.median(latencies), 3),
        "latency_p99_seconds": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        # CPU time per accepted update in the submission phase, by part. The
        # server's share (everything but the client) bounds its throughput at
        # cores * 1000 / server_cpu_ms_per_update updates per second.
        "cpu_ms_per_update": {group: round(1000 * seconds / max(accepted, 1), 2) for group, seconds in timings["cpu_seconds"].items()},
        "server_cpu_ms_per_update": round(1000 * sum(seconds for group, seconds in timings["cpu_seconds"].items() if group != "client") / max(accepted, 1), 2),
        "stored_updates": stored[0],
        "stored_distinct_nodes": stored[1],
        "lost_updates": accepted - stored[0],
        "duplicated_updates": stored[0] - stored[1],
        "round_state": state,
        "model_versions_after_round": versions,
        "seconds_from_last_submission_to_closed_round": round(round_seconds, 2),
    }


def print_report(report: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
