"""Schemathesis against a live server: generated requests, signed by a test node, never get a 5xx or break the schema.

The test loads the OpenAPI schema from the live server's /api/schema/ and
generates a fixed number of positive and negative examples per operation
with Hypothesis. It signs each prepared request with flo_client.signing, so
the signature covers the exact bytes sent, and validates every response
with Schemathesis' checks.
"""

import base64

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from flo_client import signing, wire
from flo_client.device import DeviceClient
from tests.live import live_server

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance]
SERVER_ENVIRONMENT = {"FLO_ENROLMENT_THROTTLE": "100000/minute", "FLO_NODE_THROTTLE": "100000/minute"}
FEDERATION = {
    "name": "fuzzed",
    "model_spec": {"kind": "softmax_regression", "num_features": 2, "num_classes": 2},
    "training_plan": {"learning_rate": 0.1, "batch_size": 4, "local_epochs": 1},
    "round_size": 1,
    "min_updates": 1,
}


@schemathesis.serializer(wire.MEDIA_TYPE)
def serialize_tensor_body(context, value):
    # The schema describes the body as a binary string, so generated values are bytes already.
    return value if isinstance(value, bytes) else str(value).encode()


class SigningSender:
    """Send generated cases as one enrolled node, following the node's secret through rotations."""

    def __init__(self, base_url: str, device: DeviceClient):
        self.base_url = base_url
        self.node_id = device.credentials.node_id
        self.secret = device.credentials.secret
        self.session = requests.Session()

    def send(self, case) -> tuple[requests.Response, dict]:
        kwargs = case.as_transport_kwargs(base_url=self.base_url)
        prepared = requests.Request(
            method=kwargs["method"],
            url=kwargs["url"],
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            data=kwargs.get("data"),
            json=kwargs.get("json"),
            cookies=kwargs.get("cookies"),
        ).prepare()
        body = prepared.body or b""
        body = body.encode() if isinstance(body, str) else body
        prepared.headers.update(
            signing.sign_request(node_id=self.node_id, secret=self.secret, method=prepared.method, path=prepared.path_url, body=body)
        )
        response = self.session.send(prepared, timeout=30)
        if case.operation.path == "/api/v1/nodes/me/secret" and response.status_code == 200:
            self.secret = base64.urlsafe_b64decode(response.json()["secret"])
        return response, dict(prepared.headers)


def run_operation(operation, sender: SigningSender, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check_case(case):
        response, headers = sender.send(case)
        case.validate_response(response, checks=CHECKS, headers=headers)

    check_case()


def test_generated_requests_get_no_server_error(database_url, tmp_path):
    with live_server(database_url, tmp_path, extra_environment=SERVER_ENVIRONMENT) as server:
        federation_id = server.create_federation(FEDERATION, tmp_path)
        [token] = server.issue_tokens(federation_id, 1)
        device = DeviceClient.enrol(server.base_url, token=token, display_name="fuzzer", http=httpx.Client(timeout=30))
        server.manage("start_federation", str(federation_id))
        schema = schemathesis.openapi.from_url(f"{server.base_url}/api/schema/")
        sender = SigningSender(server.base_url, device)
        operations = [result.ok() for result in schema.get_all_operations()]

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run_operation(operation, sender, mode)

        health = httpx.get(f"{server.base_url}/healthz", timeout=10)

    # Six device operations and the operator privacy report, fuzzed without operator credentials.
    assert len(operations) == 7
    assert health.status_code == 200
