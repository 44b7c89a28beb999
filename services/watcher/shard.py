"""Which watcher watches which account: rendezvous hashing over the live watchers of a group.

Each watcher writes a heartbeat (its id, scored with Redis's own clock) into one sorted set
per group; a member whose score is older than the TTL is dead. Every watcher reads the same
set, so all agree on who owns an account: the live watcher with the highest
``hash(watcher, account)``. A new watcher takes from each of the others only the accounts it
now scores highest on (about 1/n of them); a dead one's accounts spread over the rest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import redis

log = logging.getLogger(__name__)


def registry_key(group: str) -> str:
    return f"mailroom:watchers:{group}"


def score(watcher_id: str, account_id: str) -> int:
    digest = hashlib.blake2b(f"{watcher_id}\0{account_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(account_id: str, watchers: Iterable[str]) -> str | None:
    """The watcher that watches ``account_id`` (None when there is no watcher)."""
    return max(watchers, key=lambda w: score(w, account_id), default=None)


class Registry:
    """The heartbeats of one group's watchers in Redis."""

    def __init__(self, client: redis.Redis, group: str, watcher_id: str, ttl: float) -> None:
        self.client, self.key, self.watcher_id, self.ttl = client, registry_key(group), watcher_id, ttl

    def _now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    def beat(self) -> None:
        self.client.zadd(self.key, {self.watcher_id: self._now()})

    def live(self) -> list[str]:
        """The watchers with a heartbeat younger than the TTL (dead ones are dropped)."""
        now = self._now()
        pipe = self.client.pipeline()
        pipe.zremrangebyscore(self.key, "-inf", now - self.ttl)
        pipe.zrangebyscore(self.key, now - self.ttl, "+inf")
        _, members = pipe.execute()
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    def leave(self) -> None:
        """Gone at once (a clean stop): the others take over at their next reload."""
        try:
            self.client.zrem(self.key, self.watcher_id)
        except redis.RedisError as exc:
            log.warning("could not leave the watcher registry: %s", exc)
