"""Exactly one Beat: the schedule and a lock live in the broker's Redis (celery-redbeat).

A Beat that starts while another holds the lock waits for it (polling every
``beat_max_loop_interval``); if the holder dies without releasing, its lock expires after
``redbeat_lock_timeout`` and a waiting Beat takes over, so the longest gap is the lock
timeout plus one poll. Every tick writes a heartbeat that ``/api/admin/health`` shows.

Beyond what redbeat does, this scheduler survives its Redis: when the broker restarts
(even empty, losing the lock and the schedule), a tick that cannot extend the lock takes
it again without blocking and reinstalls the schedule, and a tick that cannot reach Redis
waits and tries again instead of ending the Beat process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from redbeat import RedBeatScheduler
from redbeat.schedulers import get_redis
from redis.exceptions import LockError, RedisError

log = logging.getLogger(__name__)

#: Where the last tick's time (Unix seconds) is kept, in the broker's Redis.
HEARTBEAT_KEY = "mailroom:beat:last_tick"
#: Key prefix of the schedule entries and the lock.
KEY_PREFIX = "mailroom:beat:"
#: Seconds between attempts after Redis was unreachable or the lock was lost.
RETRY_SECONDS = 5.0


class MailroomScheduler(RedBeatScheduler):  # type: ignore[misc]
    """redbeat's scheduler, with a heartbeat and recovery from a lost Redis."""

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            interval = float(super().tick(min=min, **kwargs))
        except LockError:
            self._take_lock_again()
            return RETRY_SECONDS
        except RedisError as exc:
            log.warning("beat: Redis is unreachable (%s); trying again in %.0f s", exc, RETRY_SECONDS)
            return RETRY_SECONDS
        try:
            get_redis(self.app).set(HEARTBEAT_KEY, repr(time.time()), ex=max(60, int(self.lock_timeout) * 2))
        except RedisError:
            log.warning("beat: could not record its heartbeat", exc_info=True)
        return interval

    def _take_lock_again(self) -> None:
        """The lock is gone (Redis restarted, or it expired while this Beat was stalled).
        Take it if it is free; if another Beat holds it now, this one waits and sends
        nothing (every tick tries to extend first, and fails, until the lock is ours)."""
        if self.lock is None:
            return
        try:
            if not self.lock.acquire(blocking=False):
                log.warning("beat: another Beat holds the lock; waiting")
                return
            # An empty Redis lost the schedule too: reinstall it (last runs kept if present).
            self.setup_schedule()
        except RedisError as exc:
            log.warning("beat: Redis is unreachable (%s); trying again in %.0f s", exc, RETRY_SECONDS)
            return
        log.info("beat: lock taken again; schedule restored")


def last_tick(app: Celery) -> float | None:
    """Unix time of the running Beat's last tick, or None if no Beat ticked lately."""
    with app.connection_for_read() as conn:
        raw = conn.default_channel.client.get(HEARTBEAT_KEY)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None
