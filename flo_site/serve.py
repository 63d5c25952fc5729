"""Run FLO's production processes locally for development: `python -m flo_site.serve` (what `make serve` runs).

Starts, against DATABASE_URL (PostgreSQL) and REDIS_URL, after migrating:
uvicorn with --workers ASGI processes on 127.0.0.1:--port, --celery-workers
Celery worker processes and one Celery beat for deadlines. Each writes its
log under --log-dir. Ctrl-C (SIGINT) or SIGTERM stops them all; if one exits
on its own, the others are stopped too and the exit code is 1.
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flo_site.server_process import (
    BASE_DIR,
    start_celery_beat,
    start_celery_worker,
    start_server,
    stop_server,
    wait_for_log_line,
    wait_until_healthy,
)

logger = logging.getLogger("flo_site.serve")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make serve SERVE_ARGS=...", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="TCP port of the ASGI server on 127.0.0.1 (default 8000)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    parser.add_argument("--celery-workers", type=int, default=1, help="Celery worker processes, each with concurrency FLO_CELERY_CONCURRENCY (default 1)")
    parser.add_argument("--log-dir", default=".flo-data/serve", help="directory of the processes' logs (default .flo-data/serve)")
    args = parser.parse_args(argv)
    for name in ("workers", "celery_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be a TCP port, got {args.port}.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    environment = dict(os.environ)
    missing = [name for name in ("DATABASE_URL", "REDIS_URL") if not environment.get(name)]
    if missing:
        print(f"error: set {' and '.join(missing)}; production mode needs PostgreSQL and Redis (make serve sets local defaults).", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=BASE_DIR, env=environment, check=True)

    processes: list[subprocess.Popen] = []
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server = start_server(port=args.port, environment=environment, log_path=log_dir / "asgi.log", workers=args.workers)
        processes.append(server)
        for index in range(args.celery_workers):
            log_path = log_dir / f"worker-{index}.log"
            worker = start_celery_worker(environment=environment, log_path=log_path, name=f"worker-{index}")
            processes.append(worker)
            wait_for_log_line(log_path, "ready.", worker)
        processes.append(start_celery_beat(environment=environment, log_path=log_dir / "beat.log", schedule_path=log_dir / "celerybeat-schedule"))
        wait_until_healthy(f"http://127.0.0.1:{args.port}", server, log_dir / "asgi.log")
        logger.info("FLO is serving on http://127.0.0.1:%d with %d ASGI and %d Celery workers; logs in %s", args.port, args.workers, args.celery_workers, log_dir)
        while not stopping:
            exited = [process for process in processes if process.poll() is not None]
            if exited:
                logger.error("a FLO process exited, stopping the others command=%s code=%s", " ".join(map(str, exited[0].args[:5])), exited[0].returncode)
                return 1
            time.sleep(0.5)
        logger.info("stopping FLO processes")
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                stop_server(process)


if __name__ == "__main__":
    sys.exit(main())
