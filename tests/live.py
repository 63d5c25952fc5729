"""A live FLO server in a subprocess, for tests that need real HTTP and real concurrency.

The server and the management commands that set it up run against their own
database (a fresh SQLite file, or a fresh PostgreSQL database), never the
pytest-django test database.
"""

import json
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg

from flo_site.server_process import (
    BASE_DIR,
    find_free_port,
    start_celery_beat,
    start_celery_worker,
    start_redis,
    start_server,
    stop_server,
    wait_for_log_line,
    wait_until_healthy,
)


class LiveServer:
    """A running uvicorn: its address, its environment, and restart() to stop and start it on the same port."""

    def __init__(self, base_url: str, environment: dict[str, str]):
        self.base_url = base_url
        self.environment = environment
        self.process: subprocess.Popen | None = None
        self.restart = lambda: None

    def manage(self, *arguments: str) -> str:
        """Run a management command against the server's database and return its stdout."""
        completed = subprocess.run(
            [sys.executable, "manage.py", *arguments], cwd=BASE_DIR, env=self.environment, capture_output=True, text=True, timeout=300
        )
        if completed.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(arguments)} failed: {completed.stderr}")
        return completed.stdout

    def create_federation(self, config: dict, tmp_path: Path) -> int:
        path = tmp_path / f"federation-{uuid.uuid4().hex}.json"
        path.write_text(json.dumps(config))
        return json.loads(self.manage("create_federation", str(path)))["federation_id"]

    def issue_tokens(self, federation_id: int, count: int) -> list[str]:
        return json.loads(self.manage("issue_enrolment_tokens", "--federation", str(federation_id), "--count", str(count)))

    def status(self, federation_id: int) -> dict:
        return json.loads(self.manage("federation_status", str(federation_id)))


@contextmanager
def sqlite_database(tmp_path: Path):
    yield f"sqlite:///{tmp_path / 'live.sqlite3'}"


@contextmanager
def postgres_database(admin_url: str):
    """Create a fresh PostgreSQL database for one test and drop it afterwards."""
    name = f"flo_live_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def live_server(database_url: str, tmp_path: Path, *, workers: int = 1, extra_environment: dict[str, str] | None = None):
    """Migrate the database, start uvicorn on a free 127.0.0.1 port, and stop it afterwards."""
    environment = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DJANGO_SETTINGS_MODULE")}
    environment.update({"DATABASE_URL": database_url, "FLO_DATA_DIR": str(tmp_path), "FLO_LOG_LEVEL": "WARNING", **(extra_environment or {})})
    subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=BASE_DIR, env=environment, check=True, timeout=300)

    port = find_free_port()
    log_path = tmp_path / "server.log"
    base_url = f"http://127.0.0.1:{port}"
    server = LiveServer(base_url, environment)
    server.process = start_server(port=port, environment=environment, log_path=log_path, workers=workers)

    def restart() -> None:
        stop_server(server.process)
        server.process = start_server(port=port, environment=environment, log_path=log_path, workers=workers)
        wait_until_healthy(base_url, server.process, log_path)

    server.restart = restart
    try:
        wait_until_healthy(base_url, server.process, log_path)
        yield server
    except BaseException:
        # The server's own errors explain most failures of a live test. pytest shows them with the test's stderr.
        print(f"--- {log_path} ---\n{log_excerpt(log_path)}", file=sys.stderr)
        raise
    finally:
        stop_server(server.process)


def log_excerpt(path: Path, *, limit: int = 150, tail: int = 40) -> str:
    """Return a log from its first error or traceback on (at most `limit` lines), or its last `tail` lines when it contains none."""
    if not path.exists():
        return f"{path} does not exist."
    lines = path.read_text(errors="replace").splitlines()
    first_error = next((index for index, line in enumerate(lines) if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")), None)
    start = first_error if first_error is not None else max(len(lines) - tail, 0)
    return "\n".join(lines[start : start + limit])


def run_demo(output: Path, *arguments: str, timeout_seconds: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the demo with its embedded defaults; return the finished process and its summary.json."""
    environment = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    completed = subprocess.run(
        [sys.executable, "-m", "flo_site.demo", *arguments, "--output", str(output)],
        cwd=BASE_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
    )
    summary_path = output / "summary.json"
    assert summary_path.exists(), f"The demo wrote no summary (exit {completed.returncode}): {completed.stderr[-2000:]}"
    return completed, json.loads(summary_path.read_text())


def require_redis(url: str) -> None:
    """Skip the test when Redis at `url` does not answer, or fail it in CI (CI=true), where Redis is required."""
    import pytest
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        message = f"Redis at {url} is unreachable: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI requires it.")
        pytest.skip(message)


@contextmanager
def private_redis(tmp_path: Path):
    """Start a redis-server of this test alone on a free 127.0.0.1 port; yield (url, restart), where restart() stops and starts it on the same port."""
    port = find_free_port()
    log_path = tmp_path / "redis.log"
    state = {"process": start_redis(port=port, log_path=log_path)}
    url = f"redis://127.0.0.1:{port}/0"

    def wait_ready() -> None:
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline or state["process"].poll() is not None:
                    raise RuntimeError(f"The private Redis on port {port} did not start: {log_path.read_text(errors='replace')[-1000:]}") from None
                time.sleep(0.1)

    def restart() -> None:
        stop_server(state["process"])
        state["process"] = start_redis(port=port, log_path=log_path)
        wait_ready()

    wait_ready()
    try:
        yield url, restart
    finally:
        stop_server(state["process"])


@contextmanager
def celery_worker(environment: dict[str, str], tmp_path: Path, *, name: str = "worker", extra_environment: dict[str, str] | None = None):
    """Start a Celery worker for the live server's database and broker, wait until it is ready, and stop it afterwards."""
    log_path = tmp_path / f"{name}.log"
    process = start_celery_worker(environment={**environment, **(extra_environment or {})}, log_path=log_path, name=name)
    try:
        wait_for_log_line(log_path, "ready.", process)
        yield process, log_path
    finally:
        if process.poll() is None:
            stop_server(process)


@contextmanager
def celery_beat(environment: dict[str, str], tmp_path: Path):
    """Start Celery beat with the live server's settings and stop it afterwards."""
    log_path = tmp_path / "beat.log"
    process = start_celery_beat(environment=environment, log_path=log_path, schedule_path=tmp_path / "celerybeat-schedule")
    try:
        wait_for_log_line(log_path, "beat: Starting", process)
        yield process
    finally:
        stop_server(process)
