"""Shared fixtures: personas (an enrolled node, an outsider) and small builders."""

import base64
import os
import uuid

import numpy as np
import pytest
import redis
from rest_framework.test import APIClient

from federation.aggregation import kernels
from federation.models import Federation
from federation.services.enrolment import enrol_node, issue_enrolment_tokens
from federation.services.federations import create_federation, start_federation
from flo_client import signing, wire
from flo_client.models import tensor_specs

TINY_MODEL = {"kind": "softmax_regression", "num_features": 2, "num_classes": 2}
DP_PLAN = {
    "learning_rate": 0.1,
    "batch_size": 4,
    "local_epochs": 1,
    "dp": {"clip_norm": 1.0, "noise_multiplier": 2.0, "sampling_rate": 0.2, "local_steps": 5},
}
PLAIN_PLAN = {"learning_rate": 0.1, "batch_size": 4, "local_epochs": 1}


class SignedNode:
    """A test device: its node row, its secret and a helper to send signed requests."""

    def __init__(self, node, secret: bytes):
        self.node = node
        self.secret = secret
        self.client = APIClient()

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = wire.MEDIA_TYPE, **overrides):
        """Send a signed request; keyword overrides replace header values after signing."""
        headers = signing.sign_request(node_id=str(self.node.id), secret=self.secret, method=method, path=path, body=body, **{k: v for k, v in overrides.items() if k in ("timestamp", "nonce")})
        headers.update({k: v for k, v in overrides.items() if k.startswith("X-FLO")})
        extra = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items() if value is not None}
        if method == "GET":
            return self.client.get(path, **extra)
        return self.client.generic(method, path, data=body, content_type=content_type, **extra)

    def submit(self, *, round_number: int, model_version: int = 0, num_examples=10, tensors=None, meta_extra=None, **overrides):
        meta = {"round": round_number, "model_version": model_version, "num_examples": num_examples, **(meta_extra or {})}
        body = wire.encode_tensors(tensors if tensors is not None else zero_update(), meta)
        return self.request("POST", "/api/v1/updates", body, **overrides)


def zero_update(model_spec=TINY_MODEL, fill: float = 0.0) -> dict:
    return {spec.name: np.full(spec.shape, fill, dtype=np.float32) for spec in tensor_specs(model_spec)}


def make_federation(*, name="test-federation", plan=PLAIN_PLAN, round_size=3, min_updates=3, node_epsilon_budget=None, **kwargs) -> Federation:
    return create_federation(
        name=name,
        model_spec=TINY_MODEL,
        training_plan=plan,
        round_size=round_size,
        min_updates=min_updates,
        node_epsilon_budget=node_epsilon_budget,
        **kwargs,
    )


def enrol(federation: Federation, count: int) -> list[SignedNode]:
    tokens = issue_enrolment_tokens(federation, count=count, ttl_seconds=600)
    nodes = []
    for index, token in enumerate(tokens):
        node, secret = enrol_node(token=token, display_name=f"device-{index}")
        nodes.append(SignedNode(node, secret))
    return nodes


@pytest.fixture
def federation(transactional_db) -> Federation:
    return make_federation()


@pytest.fixture
def running(transactional_db):
    """A running federation with three enrolled nodes and round 1 open; all three selected."""
    federation = make_federation()
    nodes = enrol(federation, 3)
    start_federation(federation)
    federation.refresh_from_db()
    return federation, nodes


def decode_secret(encoded: str) -> bytes:
    return base64.urlsafe_b64decode(encoded)


@pytest.fixture
def database_url(tmp_path):
    """A fresh database for a live server: a new PostgreSQL database in the PostgreSQL pass, a SQLite file otherwise."""
    from tests.live import postgres_database, sqlite_database

    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgres"):
        with postgres_database(url) as fresh_url:
            yield fresh_url
    else:
        with sqlite_database(tmp_path) as fresh_url:
            yield fresh_url


@pytest.fixture(autouse=True)
def reset_deadline_check_clock():
    """Make each test check deadlines on its first poll, whatever ran before it."""
    from federation.services import rounds

    rounds._next_deadline_check.clear()
    yield
    rounds._next_deadline_check.clear()


@pytest.fixture
def redis_url() -> str:
    """The Redis at TEST_REDIS_URL (default redis://127.0.0.1:6379/0), checked with PING.

    Outside CI an unreachable Redis skips the test with a message; with
    CI=true it fails the test, because CI must exercise the Redis paths.
    """
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except redis.RedisError as error:
        message = f"Redis at {url} is unreachable ({error}); set TEST_REDIS_URL to a running Redis."
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def redis_key_prefix(redis_url):
    """A key prefix of this test's own; every key under it is deleted afterwards, nothing else."""
    prefix = f"flo-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_nonce_store(settings, redis_url, redis_key_prefix):
    """Switch the nonce store to Redis under this test's key prefix."""
    settings.REDIS_URL = redis_url
    settings.FLO_REDIS_KEY_PREFIX = redis_key_prefix
    settings.FLO_NONCE_STORE = "redis"
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def recorded_spans(monkeypatch):
    """Record how many spans each kernel call was split into, so a test can tell it ran on several threads."""
    counts: list[int] = []
    original = kernels._map_spans

    def counting(*args, **kwargs):
        results = original(*args, **kwargs)
        counts.append(len(results))
        return results

    monkeypatch.setattr(kernels, "_map_spans", counting)
    return counts
