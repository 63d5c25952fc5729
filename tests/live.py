"""A live FLO server in a subprocess, for tests that need real HTTP and real concurrency.

The server and the management commands that set it up run against their own
database (a fresh SQLite file, or a fresh PostgreSQL database), never the
pytest-django test database.
"""

import json
import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg

from flo_site.server_process import (
    BASE_DIR,
    find_free_port,
    start_server,
    stop_server,
    wait_until_healthy,
)


class LiveServer:
    def __init__(self, base_url: str, environment: dict[str, str]):
        self.base_url = base_url
        self.environment = environment

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
    process = start_server(port=port, environment=environment, log_path=log_path, workers=workers)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, log_path)
        yield LiveServer(base_url, environment)
    finally:
        stop_server(process)


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
