"""Production mode: PostgreSQL, Redis, real Celery workers and uvicorn, with faults.

Every process runs on 127.0.0.1 and is started by the test. The PostgreSQL
server is the one of the PostgreSQL pass (a fresh database per test); the
machine's Redis is used with a queue name of the test's own, and the fault
tests start a private redis-server, so the shared one is never stopped. In
CI (CI=true) the fault tests run three times.
"""

import json
import os
import signal
import threading
import time
import uuid

import httpx
import numpy as np
import psycopg
import pytest

from flo_client.device import DeviceClient
from tests.live import celery_beat, celery_worker, live_server, postgres_database, private_redis, require_redis

pytestmark = [pytest.mark.integration, pytest.mark.postgresql]

MODEL = {"kind": "softmax_regression", "num_features": 4, "num_classes": 3}
PLAN = {"learning_rate": 0.1, "batch_size": 4, "local_epochs": 1}
MACHINE_REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/14"
FAULT_REPEATS = 3 if os.environ.get("CI") == "true" else 1
WAIT_SECONDS = 120


@pytest.fixture
def database_url():
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        pytest.fail("Production-mode tests need DATABASE_URL to point to PostgreSQL; make test runs them in its PostgreSQL pass.")
    with postgres_database(url) as fresh_url:
        yield fresh_url


def production_environment(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "FLO_CELERY_QUEUE": f"flo-test-{uuid.uuid4().hex[:8]}",
        "FLO_ENROLMENT_THROTTLE": "10000/minute",
        **extra,
    }


def update_for(fill: float) -> dict:
    return {"weight": np.full((4, 3), fill, dtype=np.float32), "bias": np.full(3, fill, dtype=np.float32)}


def count_rows(database_url: str, query: str, *parameters) -> int:
    with psycopg.connect(database_url) as connection:
        return connection.execute(query, parameters).fetchone()[0]


def wait_for_round_state(database_url: str, federation_id: int, number: int, state: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    query = "SELECT count(*) FROM federation_traininground WHERE federation_id = %s AND number = %s AND state = %s"
    while count_rows(database_url, query, federation_id, number, state) == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"Round {number} of federation {federation_id} did not reach state {state} within {WAIT_SECONDS} seconds.")
        time.sleep(0.25)


def enrol_devices(server, federation_id: int, count: int, http: httpx.Client) -> list[DeviceClient]:
    tokens = server.issue_tokens(federation_id, count)
    devices = [DeviceClient.enrol(server.base_url, token=token, display_name=f"device-{index}", http=http) for index, token in enumerate(tokens)]
    for device in devices:
        # Enough retries to ride out a server or broker restart of several seconds.
        device.max_attempts = 10
    return devices


def start_federation(server, tmp_path, config: dict, http: httpx.Client, *, num_devices: int) -> tuple[int, list[DeviceClient]]:
    """Create a federation from `config` with the management commands, enrol `num_devices` devices and start it."""
    config_path = tmp_path / "federation.json"
    config_path.write_text(json.dumps(config))
    federation_id = json.loads(server.manage("create_federation", str(config_path)))["federation_id"]
    devices = enrol_devices(server, federation_id, num_devices, http)
    server.manage("start_federation", str(federation_id))
    return federation_id, devices


def count_model_versions(database_url: str, federation_id: int) -> int:
    return count_rows(database_url, "SELECT count(*) FROM federation_modelversion WHERE federation_id = %s", federation_id)


def test_round_closes_through_celery_worker(database_url, tmp_path):
    require_redis(MACHINE_REDIS_URL)
    environment = production_environment(MACHINE_REDIS_URL)
    with live_server(database_url, tmp_path, workers=2, extra_environment=environment) as server, celery_worker(server.environment, tmp_path):
        config = {"name": "worker-round", "model_spec": MODEL, "training_plan": PLAN, "round_size": 3, "min_updates": 3, "max_rounds": 1}
        with httpx.Client(timeout=60) as http:
            federation_id, devices = start_federation(server, tmp_path, config, http, num_devices=3)
            outcomes = [device.submit_update(round_number=1, model_version=0, num_examples=10, delta=update_for(float(index))) for index, device in enumerate(devices)]

        wait_for_round_state(database_url, federation_id, 1, "closed")

    assert [outcome["status"] for outcome in outcomes] == ["accepted"] * 3
    assert count_model_versions(database_url, federation_id) == 2


@pytest.mark.parametrize("repeat", range(FAULT_REPEATS))
def test_worker_killed_mid_aggregation_closes_round_once(database_url, tmp_path, repeat):
    central = {"target_epsilon": 8.0, "participation_rate": 1.0, "clip_norm": 1.0, "accountant": "rdp"}
    config = {"name": "killed-worker", "model_spec": MODEL, "training_plan": PLAN, "max_rounds": 2, "central_dp": central}
    with private_redis(tmp_path) as (redis_url, _):
        environment = production_environment(redis_url, FLO_AGGREGATION_STALL_SECONDS="5", FLO_CELERY_VISIBILITY_TIMEOUT_SECONDS="5", FLO_DEADLINE_CHECK_SECONDS="1")
        with live_server(database_url, tmp_path, workers=2, extra_environment=environment) as server, celery_beat(server.environment, tmp_path):
            with httpx.Client(timeout=60) as http:
                federation_id, devices = start_federation(server, tmp_path, config, http, num_devices=4)
                with celery_worker(server.environment, tmp_path, name="doomed", extra_environment={"FLO_FAULT_AGGREGATION_PAUSE_SECONDS": "60"}) as (doomed, log_path):
                    for index, device in enumerate(devices):
                        device.submit_update(round_number=1, model_version=0, num_examples=10, delta=update_for(0.1 * index))
                    wait_for_log(log_path, "aggregation paused for a fault test")
                    os.killpg(doomed.pid, signal.SIGKILL)
                    doomed.wait()

                with celery_worker(server.environment, tmp_path, name="rescuer"):
                    # The rescuer gets the task back from the broker, or the deadline
                    # check sends it again once the round has aggregated for 5 s.
                    wait_for_round_state(database_url, federation_id, 1, "closed")
                    # Give a second copy of the task, if any, time to run and find nothing to do.
                    time.sleep(7)

    versions = count_model_versions(database_url, federation_id)
    spends = count_rows(
        database_url,
        "SELECT count(*) FROM privacy_federationprivacyledgerentry e JOIN federation_traininground r ON e.round_id = r.id WHERE r.federation_id = %s AND r.number = 1",
        federation_id,
    )
    assert versions == 2
    assert spends == 1


@pytest.mark.parametrize("repeat", range(FAULT_REPEATS))
def test_server_and_redis_restart_lose_no_update(database_url, tmp_path, repeat):
    config = {"name": "restarts", "model_spec": MODEL, "training_plan": PLAN, "round_size": 6, "min_updates": 6, "max_rounds": 1}
    with private_redis(tmp_path) as (redis_url, restart_redis):
        environment = production_environment(redis_url, FLO_AGGREGATION_STALL_SECONDS="5", FLO_CELERY_VISIBILITY_TIMEOUT_SECONDS="5", FLO_DEADLINE_CHECK_SECONDS="1")
        with (
            live_server(database_url, tmp_path, workers=2, extra_environment=environment) as server,
            celery_worker(server.environment, tmp_path),
            celery_beat(server.environment, tmp_path),
        ):
            with httpx.Client(timeout=60) as http:
                federation_id, devices = start_federation(server, tmp_path, config, http, num_devices=6)
                outcomes: dict[int, str] = {}
                for index in range(3):
                    outcomes[index] = devices[index].submit_update(round_number=1, model_version=0, num_examples=10, delta=update_for(1.0))["status"]

                def submit_late(index: int) -> None:
                    outcomes[index] = devices[index].submit_update(round_number=1, model_version=0, num_examples=10, delta=update_for(2.0))["status"]

                late = [threading.Thread(target=submit_late, args=(index,)) for index in range(3, 6)]
                server.process.terminate()
                for thread in late:
                    thread.start()
                restart_redis()
                server.restart()
                for thread in late:
                    thread.join(timeout=WAIT_SECONDS)
            wait_for_round_state(database_url, federation_id, 1, "closed")

    stored = count_rows(database_url, "SELECT count(*) FROM federation_modelupdate u JOIN federation_traininground r ON u.round_id = r.id WHERE r.federation_id = %s", federation_id)
    assert outcomes == dict.fromkeys(range(6), "accepted")
    assert stored == 6
    assert count_model_versions(database_url, federation_id) == 2


def wait_for_log(log_path, text: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while text not in log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} did not appear in {log_path} within {WAIT_SECONDS} seconds.")
        time.sleep(0.1)
