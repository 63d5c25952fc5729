"""A live FLO server in a subprocess, for tests that need real HTTP and real concurrency.

The server and the management commands that set it up run against their own
database (a fresh SQLite file, or a fresh PostgreSQL database), never the
pytest-django test database.
"""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg

BASE_DIR = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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

    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "uvicorn", "flo_site.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--no-access-log"]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=BASE_DIR, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base_url, process, log_path)
        yield LiveServer(base_url, environment)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_healthy(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited with code {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"The server did not become healthy: {log_path.read_text()[-2000:]}")
