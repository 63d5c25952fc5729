"""Timing side channel check of signature verification against a live server.

Sends interleaved GET /api/v1/task requests whose signatures are wrong only
in the last hex character, or already in the first, and compares the median
latencies. A comparison that stops at the first differing byte would make
the "last char wrong" requests slower; hmac.compare_digest should leave the
difference within the noise between two halves of the same variant (A/A).

    .venv/bin/python bench/signature_timing.py --requests 5000

Prints one JSON object. Starts its own server on 127.0.0.1 with a fresh
SQLite database in a temporary directory and stops it at the end.
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flo_client import signing  # noqa: E402
from flo_site.server_process import BASE_DIR, find_free_port, start_server, stop_server, wait_until_healthy  # noqa: E402

MODEL_CONFIG = {
    "name": "timing",
    "model_spec": {"kind": "softmax_regression", "num_features": 2, "num_classes": 2},
    "training_plan": {"learning_rate": 0.1, "batch_size": 4, "local_epochs": 1},
    "round_size": 1,
    "min_updates": 1,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per variant (default 5000)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        environment = {**os.environ, "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}", "FLO_DATA_DIR": str(workdir), "FLO_LOG_LEVEL": "ERROR"}
        environment.pop("REDIS_URL", None)

        def manage(*arguments: str) -> str:
            return subprocess.run([sys.executable, "manage.py", *arguments], cwd=BASE_DIR, env=environment, check=True, capture_output=True, text=True).stdout

        manage("migrate", "--verbosity", "0")
        (workdir / "federation.json").write_text(json.dumps(MODEL_CONFIG))
        federation_id = json.loads(manage("create_federation", str(workdir / "federation.json")))["federation_id"]
        [token] = json.loads(manage("issue_enrolment_tokens", "--federation", str(federation_id), "--count", "1"))

        port = find_free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = workdir / "server.log"
        process = start_server(port=port, environment=environment, log_path=log_path)
        try:
            wait_until_healthy(base_url, process, log_path)
            result = measure(base_url, token, args.requests)
        finally:
            stop_server(process)
    print(json.dumps(result, indent=2))
    return 0


def measure(base_url: str, token: str, requests_per_variant: int) -> dict:
    with httpx.Client(timeout=30) as http:
        enrolled = http.post(f"{base_url}/api/v1/enrol", json={"token": token, "display_name": "timing"}).json()
        node_id = enrolled["node_id"]
        secret = base64.urlsafe_b64decode(enrolled["secret"])
        latencies = {"last_char_wrong": [], "first_char_wrong": []}
        for index in range(2 * requests_per_variant):
            variant = "last_char_wrong" if index % 2 == 0 else "first_char_wrong"
            headers = signing.sign_request(node_id=node_id, secret=secret, method="GET", path="/api/v1/task")
            correct = headers[signing.HEADER_SIGNATURE]
            if variant == "last_char_wrong":
                headers[signing.HEADER_SIGNATURE] = correct[:-1] + ("0" if correct[-1] != "0" else "1")
            else:
                headers[signing.HEADER_SIGNATURE] = ("0" if correct[0] != "0" else "1") + correct[1:]
            started = time.perf_counter()
            response = http.get(f"{base_url}/api/v1/task", headers=headers)
            latencies[variant].append(time.perf_counter() - started)
            if response.status_code != 401:
                raise RuntimeError(f"Expected 401 for a wrong signature, got {response.status_code}: {response.text}")

    def median_us(values):
        return statistics.median(values) * 1e6

    last, first = latencies["last_char_wrong"], latencies["first_char_wrong"]
    half = len(last) // 2
    return {
        "requests_per_variant": requests_per_variant,
        "median_us_last_char_wrong": round(median_us(last), 1),
        "median_us_first_char_wrong": round(median_us(first), 1),
        "difference_us": round(median_us(last) - median_us(first), 1),
        "a_a_noise_us_last_char_wrong": round(median_us(last[:half]) - median_us(last[half:]), 1),
        "a_a_noise_us_first_char_wrong": round(median_us(first[:half]) - median_us(first[half:]), 1),
    }


if __name__ == "__main__":
    sys.exit(main())
