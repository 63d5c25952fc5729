"""Replay defence: the nonce store on Redis and on the database, directly and through the API.

The Redis tests use the Redis at TEST_REDIS_URL under a key prefix of their
own and delete only their own keys.
"""

import time
from datetime import timedelta

import pytest
import redis
from django.utils import timezone

from federation.exceptions import NonceStoreUnavailable, ReplayedNonce
from federation.models import UsedNonce
from federation.services import nonces
from flo_client import signing
from tests.assertions import assert_error, assert_state_unchanged, snapshot_stored_state

TASK_PATH = "/api/v1/task"


@pytest.fixture(params=["database", "redis"])
def nonce_store(request, settings):
    """Each test runs once per store; the database store is the settings default without REDIS_URL."""
    if request.param == "redis":
        request.getfixturevalue("redis_nonce_store")
    else:
        settings.FLO_NONCE_STORE = "database"
    return request.param


@pytest.fixture
def reset_purge_clock():
    nonces._next_nonce_purge_at = 0.0
    yield
    nonces._next_nonce_purge_at = 0.0


def test_nonce_accepted_once(nonce_store, running):
    _, nodes = running
    node_id = str(nodes[0].node.id)
    nonce = signing.new_nonce()

    nonces.record_nonce(node_id, nonce)

    with pytest.raises(ReplayedNonce):
        nonces.record_nonce(node_id, nonce)


def test_same_nonce_from_two_nodes_accepted(nonce_store, running):
    _, nodes = running
    nonce = signing.new_nonce()

    nonces.record_nonce(str(nodes[0].node.id), nonce)
    nonces.record_nonce(str(nodes[1].node.id), nonce)


def test_api_rejects_replay_and_keeps_state(nonce_store, running):
    _, nodes = running
    node = nodes[0]
    timestamp = int(time.time())
    nonce = signing.new_nonce()
    first = node.submit(round_number=1, timestamp=timestamp, nonce=nonce)
    before = snapshot_stored_state()

    replay = node.submit(round_number=1, timestamp=timestamp, nonce=nonce)

    assert first.status_code == 202
    assert_error(replay, status=401, code="replayed_nonce")
    assert_state_unchanged(before)


def test_redis_store_sets_key_with_lifetime(redis_nonce_store, settings, running):
    _, nodes = running
    node_id = str(nodes[0].node.id)
    nonce = signing.new_nonce()

    nonces.record_nonce(node_id, nonce)

    key = nonces.nonce_key(node_id, nonce)
    assert key.startswith(settings.FLO_REDIS_KEY_PREFIX)
    remaining_seconds = redis_nonce_store.ttl(key)
    assert settings.FLO_NONCE_TTL_SECONDS - 2 <= remaining_seconds <= settings.FLO_NONCE_TTL_SECONDS
    assert UsedNonce.objects.count() == 0


def test_redis_store_forgets_nonce_after_lifetime(redis_nonce_store, settings, running):
    _, nodes = running
    node_id = str(nodes[0].node.id)
    nonce = signing.new_nonce()
    settings.FLO_NONCE_TTL_SECONDS = 1

    nonces.record_nonce(node_id, nonce)
    time.sleep(1.5)

    nonces.record_nonce(node_id, nonce)


def test_redis_failure_rejects_request_with_503(redis_nonce_store, running, monkeypatch):
    _, nodes = running
    node = nodes[0]
    node.client.raise_request_exception = False

    def fail_set(*args, **kwargs):
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(redis.Redis, "set", fail_set)
    before = snapshot_stored_state()

    response = node.submit(round_number=1)

    assert_error(response, status=503, code="nonce_store_unavailable")
    assert response["Retry-After"] == "5"
    assert_state_unchanged(before)


def test_redis_failure_raises_domain_error(redis_nonce_store, monkeypatch):
    monkeypatch.setattr(redis.Redis, "set", lambda *args, **kwargs: (_ for _ in ()).throw(redis.TimeoutError("Timeout reading from socket")))

    with pytest.raises(NonceStoreUnavailable):
        nonces.record_nonce("00000000-0000-0000-0000-000000000000", signing.new_nonce())


def test_database_store_purges_nonces_past_lifetime(settings, running, reset_purge_clock):
    settings.FLO_NONCE_STORE = "database"
    _, nodes = running
    node = nodes[0].node
    expired = UsedNonce.objects.create(node=node, nonce="e" * 20, seen_at=timezone.now() - timedelta(seconds=settings.FLO_NONCE_TTL_SECONDS + 5))
    kept = UsedNonce.objects.create(node=node, nonce="k" * 20, seen_at=timezone.now() - timedelta(seconds=settings.FLO_NONCE_TTL_SECONDS - 5))

    nonces.record_nonce(str(node.id), signing.new_nonce())

    assert not UsedNonce.objects.filter(id=expired.id).exists()
    assert UsedNonce.objects.filter(id=kept.id).exists()
    assert UsedNonce.objects.count() == 2
