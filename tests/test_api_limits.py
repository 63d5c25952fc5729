"""Limits of the device API: per-node throttling, body size per endpoint, nodes per federation."""

import json

import pytest
import redis
from django.core.cache import cache
from rest_framework.test import APIClient

from federation.api.views import JSON_BODY_MAX_BYTES, EnrolmentThrottle, NodeRateThrottle
from federation.exceptions import InvalidFederationConfig
from federation.models import EnrolmentToken, Node
from federation.services.enrolment import issue_enrolment_tokens
from federation.services.nodes import revoke_node
from flo_client import signing
from tests.assertions import (
    assert_error,
    assert_state_unchanged,
    snapshot_enrolment_state,
    snapshot_stored_state,
)
from tests.conftest import make_federation

TASK_PATH = "/api/v1/task"
ENROL_PATH = "/api/v1/enrol"


@pytest.fixture(autouse=True)
def empty_cache(transactional_db):
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def nodes(running):
    _, signed_nodes = running
    for signed_node in signed_nodes:
        signed_node.client.raise_request_exception = False
    return signed_nodes


# --- Per-node throttling --------------------------------------------------------


def test_throttles_each_node_separately(nodes, monkeypatch):
    monkeypatch.setattr(NodeRateThrottle, "THROTTLE_RATES", {"node": "3/minute"})
    busy, quiet = nodes[0], nodes[1]

    allowed = [busy.request("GET", TASK_PATH) for _ in range(3)]
    throttled = busy.request("GET", TASK_PATH)
    other = quiet.request("GET", TASK_PATH)

    assert [response.status_code for response in allowed] == [200, 200, 200]
    assert_error(throttled, status=429, code="throttled")
    assert 0 < int(throttled["Retry-After"]) <= 60
    assert other.status_code == 200


def test_throttled_update_stores_nothing(nodes, monkeypatch):
    monkeypatch.setattr(NodeRateThrottle, "THROTTLE_RATES", {"node": "1/minute"})
    node = nodes[0]
    assert node.request("GET", TASK_PATH).status_code == 200
    before = snapshot_stored_state()

    response = node.submit(round_number=1)

    assert_error(response, status=429, code="throttled")
    assert_state_unchanged(before)


def test_throttle_counts_live_in_shared_cache(nodes, monkeypatch):
    monkeypatch.setattr(NodeRateThrottle, "THROTTLE_RATES", {"node": "2/minute"})
    node = nodes[0]

    node.request("GET", TASK_PATH)

    key = NodeRateThrottle.cache_format % {"scope": "node", "ident": node.node.pk}
    assert len(cache.get(key)) == 1


class UnreachableCache:
    """A cache whose every call fails as redis-py fails when Redis is down."""

    def get(self, *args, **kwargs):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    set = get


def test_unreachable_throttle_store_gives_retryable_503(nodes, monkeypatch):
    monkeypatch.setattr(NodeRateThrottle, "cache", UnreachableCache())
    before = snapshot_stored_state()

    response = nodes[0].submit(round_number=1)

    assert_error(response, status=503, code="throttle_store_unavailable")
    assert int(response["Retry-After"]) > 0
    assert_state_unchanged(before)


def test_unreachable_throttle_store_rejects_enrolment_with_503(transactional_db, monkeypatch):
    monkeypatch.setattr(EnrolmentThrottle, "cache", UnreachableCache())
    token = issue_enrolment_tokens(make_federation(), count=1, ttl_seconds=600)[0]
    before = snapshot_enrolment_state()

    response = APIClient().post(ENROL_PATH, {"token": token, "display_name": "phone"}, format="json")

    assert_error(response, status=503, code="throttle_store_unavailable")
    assert_state_unchanged(before, snapshot=snapshot_enrolment_state)


# --- Body size per endpoint -------------------------------------------------------


@pytest.mark.parametrize("path", [TASK_PATH, "/api/v1/nodes/me", "/api/v1/models/0/weights"])
def test_rejects_body_on_read_endpoint(nodes, path):
    node = nodes[0]
    before = snapshot_stored_state()

    headers = signing.sign_request(node_id=str(node.node.id), secret=node.secret, method="GET", path=path, body=b"x")
    extra = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()}

    response = node.client.generic("GET", path, data=b"x", content_type="application/octet-stream", **extra)

    body = assert_error(response, status=413, code="payload_too_large")
    assert "takes no request body" in body["detail"]
    assert_state_unchanged(before)


def test_rejects_oversized_rotation_body(nodes):
    node = nodes[0]
    stored_before = bytes(Node.objects.get(id=node.node.id).secret_ciphertext)
    padding = " " * JSON_BODY_MAX_BYTES

    response = node.request("POST", "/api/v1/nodes/me/secret", ('{"grace_seconds": 60}' + padding).encode(), content_type="application/json")

    assert_error(response, status=413, code="payload_too_large")
    assert bytes(Node.objects.get(id=node.node.id).secret_ciphertext) == stored_before


def test_rejects_oversized_enrolment_body(federation):
    [token] = issue_enrolment_tokens(federation, count=1, ttl_seconds=600)
    before = snapshot_enrolment_state()
    body = json.dumps({"token": token, "display_name": "x" * JSON_BODY_MAX_BYTES})

    response = APIClient().post(ENROL_PATH, body, content_type="application/json")

    assert_error(response, status=413, code="payload_too_large")
    assert_state_unchanged(before, snapshot_enrolment_state)


# --- Nodes per federation ---------------------------------------------------------


def enrol_over_api(token: str, name: str):
    return APIClient().post(ENROL_PATH, {"token": token, "display_name": name}, format="json")


def test_enrolment_beyond_max_nodes_rejected(transactional_db):
    federation = make_federation(name="capped", round_size=1, min_updates=1, max_nodes=2)
    tokens = issue_enrolment_tokens(federation, count=3, ttl_seconds=600)
    assert enrol_over_api(tokens[0], "first").status_code == 201
    assert enrol_over_api(tokens[1], "second").status_code == 201
    before = snapshot_enrolment_state()

    response = enrol_over_api(tokens[2], "third")

    body = assert_error(response, status=409, code="federation_full")
    assert "2 nodes" in body["detail"]
    assert_state_unchanged(before, snapshot_enrolment_state)
    assert EnrolmentToken.objects.filter(used_at__isnull=True).count() == 1


def test_revoked_node_frees_its_place(transactional_db):
    federation = make_federation(name="capped", round_size=1, min_updates=1, max_nodes=1)
    first, second = issue_enrolment_tokens(federation, count=2, ttl_seconds=600)
    assert enrol_over_api(first, "first").status_code == 201
    assert enrol_over_api(second, "second").status_code == 409

    revoke_node(Node.objects.get(display_name="first"), reason="Replaced by new hardware.")
    response = enrol_over_api(second, "second")

    assert response.status_code == 201
    assert Node.objects.filter(federation=federation).count() == 2


@pytest.mark.parametrize("max_nodes", [0, -1, 2.5, "10", True])
def test_rejects_invalid_max_nodes(transactional_db, max_nodes):
    with pytest.raises(InvalidFederationConfig, match="max_nodes"):
        make_federation(name="invalid-cap", round_size=1, min_updates=1, max_nodes=max_nodes)


def test_rejects_max_nodes_below_round_size(transactional_db):
    with pytest.raises(InvalidFederationConfig, match="round_size"):
        make_federation(name="too-small", round_size=3, min_updates=3, max_nodes=2)
