"""One Redis connection pool per process for Django's cache.

Django keeps a cache object per thread, and under ASGI every request runs
its synchronous view in a thread of its own, so the stock RedisCache opened
a new pool, and a new TCP connection to Redis, on every request. Set as the
cache's `pool_class`, this class returns one shared pool per URL and options.
redis-py's pools are thread-safe and reset themselves in a forked child.
"""

import threading

import redis


class SharedConnectionPool:
    """Stand-in for redis.ConnectionPool whose from_url returns a pool shared by the whole process."""

    _pools: dict[tuple, redis.ConnectionPool] = {}
    _lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **kwargs) -> redis.ConnectionPool:
        key = (url, tuple(sorted(kwargs.items())))
        with cls._lock:
            pool = cls._pools.get(key)
            if pool is None:
                pool = cls._pools[key] = redis.ConnectionPool.from_url(url, **kwargs)
        return pool
