"""Throttling of operator sign-ins: failed attempts counted per username and client address in Django's cache.

After FLO_LOGIN_MAX_FAILURES failures for one username from one address,
that pair is locked until FLO_LOGIN_LOCKOUT_SECONDS after its first
failure. Counting per pair means an attacker guessing passwords from one
address cannot lock the real operator out from another.
"""

import hashlib

from django.conf import settings
from django.core.cache import cache


def is_login_locked(username: str, remote_addr: str | None) -> bool:
    """Return whether this username may not sign in from this address now."""
    return cache.get(_failure_key(username, remote_addr), 0) >= settings.FLO_LOGIN_MAX_FAILURES


def record_login_failure(username: str, remote_addr: str | None) -> int:
    """Count one failed sign-in and return the failures in the current lockout window."""
    key = _failure_key(username, remote_addr)
    # add() starts the window only if no count exists, so the lockout ends a
    # fixed time after the first failure instead of moving with each one.
    cache.add(key, 0, timeout=settings.FLO_LOGIN_LOCKOUT_SECONDS)
    try:
        return cache.incr(key)
    except ValueError:
        # The count expired between add() and incr().
        cache.set(key, 1, timeout=settings.FLO_LOGIN_LOCKOUT_SECONDS)
        return 1


def clear_login_failures(username: str, remote_addr: str | None) -> None:
    """Forget the failures of a pair after a successful sign-in."""
    cache.delete(_failure_key(username, remote_addr))


def _failure_key(username: str, remote_addr: str | None) -> str:
    # Hashed, because usernames may hold any character and cache keys may not.
    digest = hashlib.sha256(f"{username.casefold()}\0{remote_addr or ''}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"login-failures:{digest}"
