"""HTTP client for one device: enrol, poll for tasks, download weights, submit updates.

Every call after enrolment is signed (flo_client.signing). Transient
failures (connection errors, 429, 503) are retried with a fresh nonce and
exponential backoff; a 4xx rejection raises ApiError with the server's code.
"""

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from flo_client import signing, wire

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {429, 502, 503, 504}


class ApiError(Exception):
    """The server rejected a request; `code` is its machine-readable reason."""

    def __init__(self, status: int, code: str, detail: str, body: dict | None = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body or {}


@dataclass(frozen=True)
class Credentials:
    node_id: str
    secret: bytes


class DeviceClient:
    """A signed API session for one enrolled node."""

    def __init__(self, base_url: str, credentials: Credentials, *, http: httpx.Client | None = None, max_attempts: int = 6):
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.http = http or httpx.Client(timeout=60.0)
        self.max_attempts = max_attempts
        # Seconds to add to the local clock, learned from a stale_timestamp response.
        self.clock_offset_seconds = 0
        # Whether the latest request was sent again after a connection error.
        self.last_request_was_resent = False

    @classmethod
    def enrol(cls, base_url: str, *, token: str, display_name: str, http: httpx.Client | None = None) -> "DeviceClient":
        """Spend an enrolment token and return a client holding the new credentials."""
        http = http or httpx.Client(timeout=60.0)
        response = http.post(f"{base_url.rstrip('/')}/api/v1/enrol", json={"token": token, "display_name": display_name})
        body = _json_or_error(response)
        credentials = Credentials(node_id=body["node_id"], secret=base64.urlsafe_b64decode(body["secret"]))
        return cls(base_url, credentials, http=http)

    def get_task(self) -> dict[str, Any]:
        return _json_or_error(self._signed_request("GET", "/api/v1/task"))

    def get_status(self) -> dict[str, Any]:
        return _json_or_error(self._signed_request("GET", "/api/v1/nodes/me"))

    def download_weights(self, version: int) -> dict[str, np.ndarray]:
        """Download a model version and check its digest."""
        response = self._signed_request("GET", f"/api/v1/models/{version}/weights")
        if response.status_code != 200:
            _json_or_error(response)
        expected_digest = response.headers.get("X-FLO-Weights-SHA256")
        if expected_digest and hashlib.sha256(response.content).hexdigest() != expected_digest:
            raise ApiError(response.status_code, "corrupt_download", f"Model version {version} does not match its SHA-256 digest.")
        _, tensors = wire.decode_tensors(response.content)
        return tensors

    def submit_update(
        self,
        *,
        round_number: int,
        model_version: int,
        num_examples: int,
        delta: dict[str, np.ndarray],
        metrics: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        meta = {"round": round_number, "model_version": model_version, "num_examples": num_examples}
        if metrics:
            meta["metrics"] = metrics
        body = wire.encode_tensors(delta, meta)
        response = self._signed_request("POST", "/api/v1/updates", body=body, content_type=wire.MEDIA_TYPE)
        if response.status_code == 409 and _error_code(response) == "duplicate_update" and self.last_request_was_resent:
            # An earlier attempt of this call reached the server, which stored
            # the update, but the reply was lost; the first submission counts.
            logger.info("update already stored by an earlier attempt node=%s round=%d", self.credentials.node_id, round_number)
            return {"status": "accepted", "round": round_number, "stored_by_earlier_attempt": True}
        return _json_or_error(response)

    def rotate_secret(self, *, grace_seconds: int | None = None) -> str | None:
        """Ask the server for a new secret, signed with the current one, and sign with the new one from now on.

        The old secret keeps verifying for `grace_seconds` (the server's
        default when None). If the response is lost, the device still holds
        only the old secret: it works until the grace period ends, and the
        operator must then rotate or re-enrol the node.

        Returns:
            When the old secret stops verifying (ISO 8601), or None when it already has.
        """
        body = json.dumps({} if grace_seconds is None else {"grace_seconds": grace_seconds}).encode()
        result = _json_or_error(self._signed_request("POST", "/api/v1/nodes/me/secret", body=body, content_type="application/json"))
        self.credentials = Credentials(node_id=self.credentials.node_id, secret=base64.urlsafe_b64decode(result["secret"]))
        return result["previous_secret_valid_until"]

    def _signed_request(self, method: str, path: str, *, body: bytes = b"", content_type: str | None = None) -> httpx.Response:
        delay_seconds = 0.2
        self.last_request_was_resent = False
        for attempt in range(1, self.max_attempts + 1):
            headers = signing.sign_request(
                node_id=self.credentials.node_id,
                secret=self.credentials.secret,
                method=method,
                path=path,
                body=body,
                timestamp=int(time.time()) + self.clock_offset_seconds,
            )
            if content_type:
                headers["Content-Type"] = content_type
            try:
                response = self.http.request(method, self.base_url + path, content=body, headers=headers)
            except httpx.TransportError as error:
                if attempt == self.max_attempts:
                    raise
                logger.warning("request failed, retrying node=%s path=%s attempt=%d error=%s", self.credentials.node_id, path, attempt, error)
                # The server may have processed the request before the connection failed.
                self.last_request_was_resent = True
                time.sleep(delay_seconds)
                delay_seconds *= 2
                continue
            if response.status_code == 401 and _error_code(response) == "stale_timestamp" and attempt == 1:
                self.clock_offset_seconds = int(response.json()["server_time"]) - int(time.time())
                logger.warning("device clock corrected node=%s offset_seconds=%d", self.credentials.node_id, self.clock_offset_seconds)
                continue
            if response.status_code in RETRYABLE_STATUS and attempt < self.max_attempts:
                wait_seconds = float(response.headers.get("Retry-After", delay_seconds))
                logger.warning("server busy, retrying node=%s path=%s status=%d", self.credentials.node_id, path, response.status_code)
                time.sleep(wait_seconds)
                delay_seconds *= 2
                continue
            return response
        return response


def _error_code(response: httpx.Response) -> str | None:
    try:
        return response.json().get("code")
    except ValueError:
        return None


def _json_or_error(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400 or not isinstance(body, dict):
        body = body if isinstance(body, dict) else {}
        raise ApiError(response.status_code, body.get("code", "http_error"), body.get("detail", response.text[:200]), body)
    return body
