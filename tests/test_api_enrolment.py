"""Device enrolment endpoint: POST /api/v1/enrol with a one-time token.

A rejected enrolment stores nothing: no node, reputation or privacy budget,
and the token stays unused, so the device can retry with a corrected request.
"""

import base64
import hashlib
from datetime import timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone
from rest_framework.test import APIClient

from federation.models import EnrolmentToken, Node, Reputation
from federation.services.enrolment import issue_enrolment_tokens
from privacy.models import PrivacyBudget
from tests.assertions import (
    assert_error,
    assert_state_unchanged,
    snapshot_enrolment_state,
)
from tests.conftest import DP_PLAN, SignedNode, decode_secret, make_federation

ENROL_PATH = "/api/v1/enrol"


@pytest.fixture(autouse=True)
def clear_enrolment_throttle(transactional_db):
    # The enrolment throttle counts requests in Django's cache (a database
    # table outside the tables a test flushes), which outlives a test; other
    # tests' requests must not push this one over it.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def api_client():
    client = APIClient()
    client.raise_request_exception = False
    return client


@pytest.fixture
def token(federation) -> str:
    return issue_enrolment_tokens(federation, count=1, ttl_seconds=600)[0]


def test_enrols_node_with_valid_token(api_client, federation, token):
    response = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-7"}, format="json")

    assert response.status_code == 201
    body = response.json()
    secret = decode_secret(body["secret"])
    assert len(secret) == 32
    node = Node.objects.get(id=body["node_id"])
    assert node.federation_id == federation.id
    assert node.display_name == "phone-7"
    assert node.status == Node.Status.ACTIVE
    assert secret not in bytes(node.secret_ciphertext)
    assert base64.urlsafe_b64encode(secret) not in bytes(node.secret_ciphertext)
    assert body["federation_id"] == federation.id
    assert body["signature_window_seconds"] == 300
    assert isinstance(body["server_time"], int)
    stored_token = EnrolmentToken.objects.get(token_sha256=hashlib.sha256(token.encode()).hexdigest())
    assert stored_token.used_at is not None
    assert stored_token.node_id == node.id
    assert Reputation.objects.filter(node=node).count() == 1


def test_enrolled_secret_signs_requests(api_client, federation, token):
    body = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-7"}, format="json").json()
    device = SignedNode(Node.objects.get(id=body["node_id"]), decode_secret(body["secret"]))

    response = device.request("GET", "/api/v1/nodes/me")

    assert response.status_code == 200
    assert response.json()["node_id"] == body["node_id"]


def test_stores_only_token_hash(federation, token):
    stored = EnrolmentToken.objects.get(federation=federation)

    assert stored.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in stored.token_sha256


def test_creates_privacy_budget_with_local_dp(api_client, transactional_db):
    federation = make_federation(name="dp-enrolment", plan=DP_PLAN, node_epsilon_budget=4.0)
    token = issue_enrolment_tokens(federation, count=1, ttl_seconds=600)[0]

    response = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-7"}, format="json")

    assert response.status_code == 201
    budget = PrivacyBudget.objects.get(node_id=response.json()["node_id"])
    assert budget.epsilon_allocated == 4.0
    assert budget.epsilon_spent == 0.0
    assert budget.delta == federation.dp_delta


def test_rejects_reused_token(api_client, token):
    first = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-1"}, format="json")
    before = snapshot_enrolment_state()

    second = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-2"}, format="json")

    assert first.status_code == 201
    assert_error(second, status=409, code="enrolment_token_used")
    assert_state_unchanged(before, snapshot_enrolment_state)
    assert Node.objects.count() == 1


def test_rejects_unknown_token(api_client, token):
    before = snapshot_enrolment_state()

    response = api_client.post(ENROL_PATH, {"token": token + "x", "display_name": "phone-1"}, format="json")

    assert_error(response, status=400, code="invalid_enrolment_token")
    assert_state_unchanged(before, snapshot_enrolment_state)
    assert Node.objects.count() == 0


def test_rejects_expired_token(api_client, token):
    EnrolmentToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    before = snapshot_enrolment_state()

    response = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-1"}, format="json")

    assert_error(response, status=400, code="enrolment_token_expired")
    assert_state_unchanged(before, snapshot_enrolment_state)
    assert Node.objects.count() == 0


@pytest.mark.parametrize(
    ("payload", "error_field"),
    [
        pytest.param({}, "display_name", id="missing-display-name"),
        pytest.param({"display_name": ""}, "display_name", id="empty-display-name"),
        pytest.param({"display_name": "x" * 201}, "display_name", id="display-name-too-long"),
        pytest.param({"display_name": ["phone"]}, "display_name", id="display-name-list"),
        pytest.param({"display_name": "phone-1", "role": "admin"}, "non_field_errors", id="unknown-field"),
        pytest.param({"display_name": "phone-1", "token": None}, "token", id="null-token"),
    ],
)
def test_rejects_invalid_enrolment_request(api_client, token, payload, error_field):
    request_body = {"token": token, **payload}
    before = snapshot_enrolment_state()

    response = api_client.post(ENROL_PATH, request_body, format="json")

    body = assert_error(response, status=400, code="invalid_request")
    assert error_field in body["errors"]
    assert_state_unchanged(before, snapshot_enrolment_state)
    assert Node.objects.count() == 0


def test_rejected_request_leaves_token_usable(api_client, token):
    rejected = api_client.post(ENROL_PATH, {"token": token}, format="json")

    accepted = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-1"}, format="json")

    assert rejected.status_code == 400
    assert accepted.status_code == 201


def test_throttles_repeated_enrolment_requests(api_client, settings, transactional_db):
    # The rate reads like "30/minute"; every request counts, accepted or not.
    allowed = int(settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["enrolment"].split("/")[0])
    responses = [api_client.post(ENROL_PATH, {"token": "unknown", "display_name": "phone"}, format="json") for _ in range(allowed + 1)]

    assert {response.status_code for response in responses[:allowed]} == {400}
    assert_error(responses[-1], status=429, code="throttled")
    assert int(responses[-1]["Retry-After"]) > 0


def test_rejects_malformed_json(api_client, token):
    before = snapshot_enrolment_state()

    response = api_client.generic("POST", ENROL_PATH, data=b'{"token": ', content_type="application/json")

    assert_error(response, status=400, code="parse_error")
    assert_state_unchanged(before, snapshot_enrolment_state)


def test_rejects_form_encoded_body(api_client, token):
    before = snapshot_enrolment_state()

    response = api_client.post(ENROL_PATH, {"token": token, "display_name": "phone-1"})

    assert_error(response, status=415, code="unsupported_media_type")
    assert_state_unchanged(before, snapshot_enrolment_state)


@pytest.mark.parametrize("path", ["/api/v1/nothing", "/api/v1/models/abc/weights", "/api/v1/models/-1/weights"])
def test_unknown_api_path_answers_json_404(api_client, path):
    response = api_client.post(path, data=b"{}", content_type="application/json")

    assert_error(response, status=404, code="not_found")
