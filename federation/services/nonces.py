"""The replay defence: each node's nonces are accepted once, across every server process.

With FLO_NONCE_STORE = "redis" a nonce is one key written with SET NX EX,
so Redis both rejects a second write and expires the key after
FLO_NONCE_TTL_SECONDS. With "database" a nonce is a UsedNonce row under a
unique constraint, and old rows are purged from time to time.
"""

import logging
import time
from datetime import timedelta
from functools import lru_cache

import redis
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from federation.exceptions import NonceStoreUnavailable, ReplayedNonce
from federation.models import UsedNonce

logger = logging.getLogger(__name__)

NONCE_PURGE_INTERVAL_SECONDS = 60
# A Redis that does not respond within this many seconds fails the request
# with 503 instead of holding a server worker.
REDIS_TIMEOUT_SECONDS = 2.0
_next_nonce_purge_at = 0.0


def record_nonce(node_id: str, nonce: str) -> None:
    """Remember a node's nonce for FLO_NONCE_TTL_SECONDS.

    Call it only for correctly signed requests, so forged requests cannot
    use up a device's nonces.

    Raises:
        ReplayedNonce: the node already used this nonce within its lifetime.
        NonceStoreUnavailable: Redis did not respond, so the request is rejected
            rather than let through unchecked.
    """
    if settings.FLO_NONCE_STORE == "redis":
        _record_in_redis(node_id, nonce)
    else:
        _record_in_database(node_id, nonce)


def nonce_key(node_id: str, nonce: str) -> str:
    """Return the Redis key of a node's nonce."""
    return f"{settings.FLO_REDIS_KEY_PREFIX}nonce:{node_id}:{nonce}"


def _record_in_redis(node_id: str, nonce: str) -> None:
    try:
        is_new = _redis_client(settings.REDIS_URL).set(nonce_key(node_id, nonce), b"1", nx=True, ex=settings.FLO_NONCE_TTL_SECONDS)
    except redis.RedisError as error:
        logger.error("nonce store unavailable node=%s error=%s", node_id, error)
        raise NonceStoreUnavailable("The replay check is unavailable; retry the same request with a fresh nonce after the Retry-After delay.") from error
    if not is_new:
        raise _replayed()


def _record_in_database(node_id: str, nonce: str) -> None:
    _purge_expired_nonces()
    try:
        with transaction.atomic():
            UsedNonce.objects.create(node_id=node_id, nonce=nonce, seen_at=timezone.now())
    except IntegrityError:
        raise _replayed() from None


def _purge_expired_nonces() -> None:
    """Delete nonces past their lifetime, at most once per NONCE_PURGE_INTERVAL_SECONDS per process."""
    global _next_nonce_purge_at
    if time.monotonic() < _next_nonce_purge_at:
        return
    _next_nonce_purge_at = time.monotonic() + NONCE_PURGE_INTERVAL_SECONDS
    cutoff = timezone.now() - timedelta(seconds=settings.FLO_NONCE_TTL_SECONDS)
    UsedNonce.objects.filter(seen_at__lt=cutoff).delete()


@lru_cache(maxsize=4)
def _redis_client(url: str) -> redis.Redis:
    # One connection pool per process and URL; redis-py's pool is thread-safe.
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)


def _replayed() -> ReplayedNonce:
    return ReplayedNonce("This nonce was already used; sign every request with a fresh nonce.")
