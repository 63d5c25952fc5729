"""Start and stop a FLO server (uvicorn) as a subprocess on 127.0.0.1.

Used by the demo, the live-server tests and the benchmarks.
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


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server with SIGTERM, then SIGKILL if it has not exited after 20 seconds."""
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
