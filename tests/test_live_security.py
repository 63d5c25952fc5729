"""Credentials and replays against a live server with two uvicorn worker processes.

Every request opens a new connection, so the kernel spreads the requests
over both workers; a state kept in one process's memory would let some of
them through.
"""


import httpx
import pytest

from flo_client import signing
from flo_client.device import DeviceClient
from tests.live import live_server

pytestmark = pytest.mark.integration

TINY_MODEL = {"kind": "softmax_regression", "num_features": 2, "num_classes": 2}
PLAIN_PLAN = {"learning_rate": 0.1, "batch_size": 4, "local_epochs": 1}
SERVER_ENVIRONMENT = {"FLO_ENROLMENT_THROTTLE": "10000/minute"}
REQUESTS_PER_CHECK = 12


def new_connection_client() -> httpx.Client:
    """An HTTP client that opens a new connection for every request."""
    return httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


def enrol_device(server, tmp_path, name: str) -> DeviceClient:
    config = {"name": name, "model_spec": TINY_MODEL, "training_plan": PLAIN_PLAN, "round_size": 1, "min_updates": 1}
    federation_id = server.create_federation(config, tmp_path)
    [token] = server.issue_tokens(federation_id, 1)
    return DeviceClient.enrol(server.base_url, token=token, display_name=name, http=new_connection_client())


def task_responses(device: DeviceClient, count: int) -> list[httpx.Response]:
    return [device.http.request("GET", f"{device.base_url}/api/v1/task", headers=sign_task(device)) for _ in range(count)]


def sign_task(device: DeviceClient, *, nonce: str | None = None, secret: bytes | None = None) -> dict[str, str]:
    return signing.sign_request(
        node_id=device.credentials.node_id, secret=secret or device.credentials.secret, method="GET", path="/api/v1/task", nonce=nonce
    )


def test_revocation_applies_in_every_worker_at_once(database_url, tmp_path):
    with live_server(database_url, tmp_path, workers=2, extra_environment=SERVER_ENVIRONMENT) as server:
        device = enrol_device(server, tmp_path, "revoked")
        before = task_responses(device, REQUESTS_PER_CHECK)

        server.manage("revoke_node", device.credentials.node_id, "--reason", "Device reported stolen.")
        after = task_responses(device, REQUESTS_PER_CHECK)

    assert [response.status_code for response in before] == [200] * REQUESTS_PER_CHECK
    assert [response.status_code for response in after] == [403] * REQUESTS_PER_CHECK
    assert {response.json()["code"] for response in after} == {"node_revoked"}


def test_rotated_out_secret_rejected_in_every_worker(database_url, tmp_path):
    with live_server(database_url, tmp_path, workers=2, extra_environment=SERVER_ENVIRONMENT) as server:
        device = enrol_device(server, tmp_path, "rotated")
        old_secret = device.credentials.secret
        task_responses(device, REQUESTS_PER_CHECK)

        valid_until = device.rotate_secret(grace_seconds=0)
        with_old = [device.http.request("GET", f"{device.base_url}/api/v1/task", headers=sign_task(device, secret=old_secret)) for _ in range(REQUESTS_PER_CHECK)]
        with_new = task_responses(device, REQUESTS_PER_CHECK)

    assert valid_until is None
    assert {response.json()["code"] for response in with_old} == {"invalid_signature"}
    assert [response.status_code for response in with_new] == [200] * REQUESTS_PER_CHECK


@pytest.mark.parametrize("store", ["database", "redis"])
def test_replay_rejected_by_every_worker(database_url, tmp_path, store, request):
    environment = dict(SERVER_ENVIRONMENT)
    if store == "redis":
        redis_url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_key_prefix")
        environment.update({"REDIS_URL": redis_url, "FLO_REDIS_KEY_PREFIX": prefix, "FLO_CELERY_EAGER": "true"})
    with live_server(database_url, tmp_path, workers=2, extra_environment=environment) as server:
        device = enrol_device(server, tmp_path, f"replay-{store}")
        headers = sign_task(device)
        responses = [device.http.request("GET", f"{device.base_url}/api/v1/task", headers=headers) for _ in range(REQUESTS_PER_CHECK)]

    assert responses[0].status_code == 200
    assert [response.status_code for response in responses[1:]] == [401] * (REQUESTS_PER_CHECK - 1)
    assert {response.json()["code"] for response in responses[1:]} == {"replayed_nonce"}


def test_node_throttle_shared_by_workers(database_url, tmp_path):
    environment = {**SERVER_ENVIRONMENT, "FLO_NODE_THROTTLE": "5/minute"}
    with live_server(database_url, tmp_path, workers=2, extra_environment=environment) as server:
        device = enrol_device(server, tmp_path, "throttled")
        responses = task_responses(device, 10)

    assert [response.status_code for response in responses] == [200] * 5 + [429] * 5
    assert {response.json()["code"] for response in responses[5:]} == {"throttled"}
    assert all(int(response.headers["Retry-After"]) > 0 for response in responses[5:])
