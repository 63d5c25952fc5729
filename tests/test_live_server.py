"""End-to-end tests against a live uvicorn server on 127.0.0.1.

The server uses the database of the current test pass: a fresh SQLite file
in the SQLite pass, a fresh PostgreSQL database when DATABASE_URL points
to PostgreSQL.
"""

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from flo_client import signing, wire
from flo_client.device import ApiError, DeviceClient
from tests.live import live_server, run_demo

pytestmark = pytest.mark.integration

TINY_MODEL = {"kind": "softmax_regression", "num_features": 2, "num_classes": 2}
PLAIN_PLAN = {"learning_rate": 0.1, "batch_size": 4, "local_epochs": 1}
# Enrolment is throttled per client address; every test device shares 127.0.0.1.
SERVER_ENVIRONMENT = {"FLO_ENROLMENT_THROTTLE": "10000/minute"}


def federation_config(name: str, *, size: int, model=TINY_MODEL) -> dict:
    return {"name": name, "model_spec": model, "training_plan": PLAIN_PLAN, "round_size": size, "min_updates": size, "round_deadline_seconds": 600}


def enrol_all(server, federation_id: int, count: int, http: httpx.Client) -> list[DeviceClient]:
    tokens = server.issue_tokens(federation_id, count)
    return [DeviceClient.enrol(server.base_url, token=token, display_name=f"device-{index}", http=http) for index, token in enumerate(tokens)]


def update_for(model: dict, fill: float) -> dict:
    return {"weight": np.full((model["num_features"], model["num_classes"]), fill, dtype=np.float32), "bias": np.full(model["num_classes"], fill, dtype=np.float32)}


def test_concurrent_submissions_during_aggregation_are_all_stored_once(database_url, tmp_path):
    statuses = []
    lock = threading.Lock()

    def record(response):
        with lock:
            statuses.append(response.status_code)

    with live_server(database_url, tmp_path, workers=2, extra_environment=SERVER_ENVIRONMENT) as server:
        busy_id = server.create_federation(federation_config("fifty", size=50), tmp_path)
        other_id = server.create_federation(federation_config("ten", size=10), tmp_path)
        with httpx.Client(timeout=120, event_hooks={"response": [record]}, limits=httpx.Limits(max_connections=64)) as http:
            fifty = enrol_all(server, busy_id, 50, http)
            ten = enrol_all(server, other_id, 10, http)
            server.manage("start_federation", str(busy_id))
            server.manage("start_federation", str(other_id))
            for device in ten[:9]:
                device.submit_update(round_number=1, model_version=0, num_examples=5, delta=update_for(TINY_MODEL, 1.0))

            # The tenth update of "ten" starts its aggregation while the fifty land.
            jobs = [(device, float(index)) for index, device in enumerate(fifty)] + [(ten[9], 1.0)]
            with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
                results = list(
                    pool.map(lambda job: job[0].submit_update(round_number=1, model_version=0, num_examples=10, delta=update_for(TINY_MODEL, job[1])), jobs)
                )

        busy = server.status(busy_id)
        other = server.status(other_id)

    assert 500 not in statuses
    assert all(result["status"] == "accepted" for result in results)
    assert busy["rounds"][0]["state"] == "closed"
    assert busy["rounds"][0]["accepted"] == 50
    assert busy["model_versions"] == 2
    assert other["rounds"][0]["state"] == "closed"
    assert other["rounds"][0]["accepted"] == 10


def _raw_post(base_url: str, path: str, headers: dict, declared_length: int | None, body_chunks, *, chunked: bool = False) -> tuple[bytes, int]:
    """Send a POST over a raw socket, stop sending once the server responds, return (response bytes, body bytes sent)."""
    host, port = base_url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: {wire.MEDIA_TYPE}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {declared_length}")
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        connection.settimeout(0.05)
        response = b""
        for chunk in body_chunks:
            try:
                response += connection.recv(65536)
                if response:
                    break
            except TimeoutError:
                pass
            frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
            try:
                connection.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        connection.settimeout(10)
        try:
            while b"\r\n\r\n" not in response or len(response) < response.find(b"\r\n\r\n") + 10:
                data = connection.recv(65536)
                if not data:
                    break
                response += data
        except (TimeoutError, ConnectionResetError):
            pass
    return response, sent


def test_request_body_limits_answer_json_413(database_url, tmp_path):
    # A model of 197,500 x 10 float32 weights: an update of about 7.9 MB.
    model = {"kind": "softmax_regression", "num_features": 197_500, "num_classes": 10}
    cap_bytes = 8_000_000
    environment = {**SERVER_ENVIRONMENT, "FLO_MAX_REQUEST_BYTES": str(cap_bytes)}
    with live_server(database_url, tmp_path, extra_environment=environment) as server:
        federation_id = server.create_federation(federation_config("large", size=2, model=model), tmp_path)
        with httpx.Client(timeout=120) as http:
            first, second = enrol_all(server, federation_id, 2, http)
            server.manage("start_federation", str(federation_id))

            accepted = first.submit_update(round_number=1, model_version=0, num_examples=5, delta=update_for(model, 0.5))

            # 8.1 MB: above the server-wide cap, refused before Django reads it.
            oversized = b"\x00" * 8_100_000
            headers = signing.sign_request(node_id=second.credentials.node_id, secret=second.credentials.secret, method="POST", path="/api/v1/updates", body=oversized)
            over_cap = http.post(f"{server.base_url}/api/v1/updates", content=oversized, headers={**headers, "Content-Type": wire.MEDIA_TYPE})

            # Below the cap but above this model's update size.
            above_model = b"\x00" * 7_990_000
            headers = signing.sign_request(node_id=second.credentials.node_id, secret=second.credentials.secret, method="POST", path="/api/v1/updates", body=above_model)
            over_model = http.post(f"{server.base_url}/api/v1/updates", content=above_model, headers={**headers, "Content-Type": wire.MEDIA_TYPE})

        # 200 MB streamed with chunked encoding: cut off at the cap, not buffered.
        streamed_response, streamed_bytes = _raw_post(server.base_url, "/api/v1/updates", {}, None, (b"\x00" * 1_000_000 for _ in range(200)), chunked=True)
        # 200 MB behind a Content-Length that claims 1 KB: the server reads 1 KB and responds.
        lying_response, _ = _raw_post(server.base_url, "/api/v1/updates", {}, 1024, (b"\x00" * 1_000_000 for _ in range(200)))

        health = httpx.get(f"{server.base_url}/healthz", timeout=10)
        status = server.status(federation_id)

    assert accepted["status"] == "accepted"
    assert over_cap.status_code == 413
    assert over_cap.headers["content-type"] == "application/json"
    assert over_cap.json()["code"] == "payload_too_large"
    assert str(cap_bytes) in over_cap.json()["detail"]
    assert over_model.status_code == 413
    assert over_model.headers["content-type"] == "application/json"
    assert over_model.json()["code"] == "payload_too_large"
    assert streamed_response.startswith(b"HTTP/1.1 413")
    assert b"application/json" in streamed_response
    assert streamed_bytes < 50_000_000
    assert lying_response.split(b"\r\n")[0] in (b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 400 Bad Request")
    assert b"text/html" not in lying_response
    assert health.status_code == 200
    assert status["rounds"][0]["accepted"] == 1


def test_device_with_skewed_clock_corrects_it_from_server_time(database_url, tmp_path):
    with live_server(database_url, tmp_path, extra_environment=SERVER_ENVIRONMENT) as server:
        federation_id = server.create_federation(federation_config("skew", size=1), tmp_path)
        with httpx.Client(timeout=60) as http:
            [device] = enrol_all(server, federation_id, 1, http)
            device.clock_offset_seconds = -3600

            task = device.get_task()

    assert task["status"] == "wait"
    assert abs(device.clock_offset_seconds) < 5


def test_revoked_token_reuse_over_http_is_rejected(database_url, tmp_path):
    with live_server(database_url, tmp_path, extra_environment=SERVER_ENVIRONMENT) as server:
        federation_id = server.create_federation(federation_config("tokens", size=1), tmp_path)
        [token] = server.issue_tokens(federation_id, 1)
        with httpx.Client(timeout=60) as http:
            DeviceClient.enrol(server.base_url, token=token, display_name="first", http=http)
            with pytest.raises(ApiError) as raised:
                DeviceClient.enrol(server.base_url, token=token, display_name="second", http=http)
        status = server.status(federation_id)

    assert raised.value.code == "enrolment_token_used"
    assert len(status["nodes"]) == 1


@pytest.mark.demo
def test_demo_runs_a_small_federation_and_writes_summary(tmp_path):
    output = tmp_path / "demo"
    completed, summary = run_demo(output, "--devices", "4", "--rounds", "3", "--epsilon", "3")

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert isinstance(summary["final_accuracy"], float)
    assert [row["round"] for row in summary["rounds"]] == list(range(1, len(summary["rounds"]) + 1))
    assert set(summary["rounds"][0]) >= {"round", "participants", "accepted", "rejected", "accuracy"}
    assert len(summary["nodes"]) == 4
    assert all(node["epsilon_spent"] <= node["epsilon_allocated"] for node in summary["nodes"])
    assert all(node["delta"] == 1e-5 for node in summary["nodes"])
    assert (output / "db.sqlite3").exists()


def test_concurrent_double_submission_stores_one_update(database_url, tmp_path):
    with live_server(database_url, tmp_path, workers=2, extra_environment=SERVER_ENVIRONMENT) as server:
        federation_id = server.create_federation(federation_config("double", size=2), tmp_path)
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16)) as http:
            first, second = enrol_all(server, federation_id, 2, http)
            server.manage("start_federation", str(federation_id))

            def submit(fill: float):
                try:
                    return first.submit_update(round_number=1, model_version=0, num_examples=10, delta=update_for(TINY_MODEL, fill))["status"]
                except ApiError as error:
                    return error.code

            with ThreadPoolExecutor(max_workers=8) as pool:
                outcomes = list(pool.map(submit, [1.0, 9.0] * 4))
        status = server.status(federation_id)

    assert outcomes.count("accepted") == 1
    assert outcomes.count("duplicate_update") == 7
    assert status["rounds"][0]["accepted"] == 1
    assert status["rounds"][0]["state"] == "open"


@pytest.mark.demo
def test_demo_with_central_dp_reports_federation_epsilon(tmp_path):
    completed, summary = run_demo(tmp_path / "central", "--central-dp", "--target-epsilon", "8", "--devices", "30", "--rounds", "3")

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert summary["central_dp"] is True
    assert 0 < summary["federation_epsilon"] <= 8.0
    assert summary["noise_multiplier"] > 0
    assert len(summary["rounds"]) == 3
    assert all(node["epsilon_spent"] is None for node in summary["nodes"])
