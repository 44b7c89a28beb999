"""A per-tenant counting semaphore in Redis, shared by every API process.

Each holder is one member of a sorted set ``mailroom:slots:<name>:<tenant>`` scored by the
moment its slot expires. Taking a slot is one Lua script (drop expired holders, count,
add), so two processes can never both take the last slot; a process that dies while
holding one loses it when it expires, so a crash cannot shrink a tenant's limit for good.
The clock is Redis's own (``TIME``), so API hosts with skewed clocks agree.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import redis

from services.errors import ServiceUnavailable, TooManyRequests
from services.redis_sentinel import SentinelTarget
from services.settings import Settings

_TAKE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""


@cache
def redis_client(url: str) -> redis.Redis:
    """One connection pool per Redis URL and process. Short socket timeouts: a Redis that
    does not answer must fail a request quickly, not hold it."""
    if url.startswith("redis+socket://"):  # kombu's spelling of a unix socket
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


@cache
def _sentinel_client(target: SentinelTarget) -> redis.Redis:
    return target.client()


def broker_redis(settings: Settings) -> redis.Redis:
    """A client of the broker's Redis (its current master, behind Sentinel)."""
    sentinel = settings.broker_sentinel
    if sentinel is not None:
        return _sentinel_client(sentinel)
    return redis_client(settings.broker_connection_url)


class TenantSlots:
    """At most ``limit`` concurrent holders per tenant for the work called ``name``.

    ``hold_seconds`` bounds how long a slot outlives a holder that never released it; it
    must exceed the longest the guarded work can take. ``wait_seconds`` is how long
    :meth:`slot` waits for a free slot before refusing with :class:`TooManyRequests`."""

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        limit: int,
        hold_seconds: float,
        wait_seconds: float = 0.5,
    ) -> None:
        self.client = client
        self.name = name
        self.limit = limit
        self.hold_seconds = hold_seconds
        self.wait_seconds = wait_seconds
        self._take: Any = client.register_script(_TAKE)

    def key(self, tenant_id: str) -> str:
        return f"mailroom:slots:{self.name}:{tenant_id}"

    def try_take(self, tenant_id: str) -> str | None:
        """A slot's token, or None when the tenant holds ``limit`` slots already."""
        token = uuid.uuid4().hex
        try:
            taken = self._take(keys=[self.key(tenant_id)], args=[token, self.limit, self.hold_seconds])
        except redis.RedisError as exc:
            # Without the counter the limit cannot hold across processes: refuse, do not guess.
            raise ServiceUnavailable("the broker Redis is unavailable; try again shortly") from exc
        return token if taken == 1 else None

    def release(self, tenant_id: str, token: str) -> None:
        try:
            self.client.zrem(self.key(tenant_id), token)
        except redis.RedisError:
            pass  # the slot expires by itself after hold_seconds

    def holders(self, tenant_id: str) -> int:
        """Slots the tenant holds now (expired ones not counted)."""
        return int(self.client.zcount(self.key(tenant_id), time.time(), "+inf"))

    @contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        """Hold one of the tenant's slots for the ``with`` block; wait up to
        ``wait_seconds`` for one, then raise :class:`TooManyRequests` (Retry-After 1 s:
        the guarded work is short, a slot is usually free again within a second)."""
        deadline = time.monotonic() + self.wait_seconds
        token = self.try_take(tenant_id)
        while token is None and time.monotonic() < deadline:
            time.sleep(0.05)
            token = self.try_take(tenant_id)
        if token is None:
            raise TooManyRequests(
                f"this tenant already has {self.limit} {self.name} in progress; retry shortly",
                retry_after=1,
            )
        try:
            yield
        finally:
            self.release(tenant_id, token)
