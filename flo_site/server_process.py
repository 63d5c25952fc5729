"""Start and stop FLO's processes on 127.0.0.1: the ASGI server (uvicorn), Celery workers and beat, and a private Redis.

Used by the demo, `make serve`, the live-server and fault tests and the benchmarks.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BASE_DIR = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 60


def find_free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(*, port: int, environment: dict[str, str], log_path: Path, workers: int = 1) -> subprocess.Popen:
    """Start uvicorn serving flo_site.asgi; its output goes to log_path."""
    command = [
        sys.executable, "-m", "uvicorn", "flo_site.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--no-access-log",
    ]  # fmt: skip
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(command, cwd=BASE_DIR, env=environment, stdout=log_file, stderr=subprocess.STDOUT)


def wait_until_healthy(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    """Poll /healthz until it returns 200.

    Raises:
        RuntimeError: when the process exits or the server does not respond in time,
            with the end of its log.
    """
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The FLO server exited with code {process.returncode} during start-up:\n{_tail(log_path)}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"The FLO server did not respond on {base_url} within {START_TIMEOUT_SECONDS} seconds:\n{_tail(log_path)}")


def start_celery_worker(*, environment: dict[str, str], log_path: Path, name: str = "worker") -> subprocess.Popen:
    """Start a Celery worker of flo_site's app that consumes FLO's queue; its output goes to log_path."""
    queue = environment.get("FLO_CELERY_QUEUE", "flo")
    command = [
        sys.executable, "-m", "celery", "-A", "flo_site", "worker", "--loglevel", "INFO",
        "--hostname", f"{name}@%h", "--queues", queue, "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with open(log_path, "ab") as log_file:
        # A session of its own, so os.killpg reaches the pool's child processes too.
        return subprocess.Popen(command, cwd=BASE_DIR, env=environment, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def start_celery_beat(*, environment: dict[str, str], log_path: Path, schedule_path: Path) -> subprocess.Popen:
    """Start Celery beat, which sends the deadline check every FLO_DEADLINE_CHECK_SECONDS."""
    command = [sys.executable, "-m", "celery", "-A", "flo_site", "beat", "--loglevel", "INFO", "--schedule", str(schedule_path)]
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(command, cwd=BASE_DIR, env=environment, stdout=log_file, stderr=subprocess.STDOUT)


def start_redis(*, port: int, log_path: Path) -> subprocess.Popen:
    """Start a private redis-server on 127.0.0.1:port that keeps nothing on disk."""
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(command, cwd=log_path.parent, stdout=log_file, stderr=subprocess.STDOUT)


def wait_for_log_line(log_path: Path, text: str, process: subprocess.Popen, *, timeout_seconds: float = START_TIMEOUT_SECONDS, after_bytes: int = 0) -> None:
    """Wait until `text` appears in the log after byte offset `after_bytes`.

    Raises:
        RuntimeError: when the process exits first or the line does not appear in time, with the end of the log.
    """
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            with open(log_path, "rb") as log_file:
                log_file.seek(after_bytes)
                if text.encode() in log_file.read():
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args[:5]))} exited with code {process.returncode} before logging {text!r}:\n{_tail(log_path)}")
        time.sleep(0.1)
    raise RuntimeError(f"{text!r} did not appear in {log_path} within {timeout_seconds} seconds:\n{_tail(log_path)}")


def stop_server(process: subprocess.Popen) -> None:
    """Stop a process with SIGTERM, then SIGKILL if it has not exited after 20 seconds."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log_path: Path) -> str:
    try:
        return log_path.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"
