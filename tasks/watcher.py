"""``mailroom watcher``: build the watcher from the settings and run it until SIGTERM or Ctrl-C.

The embedded stack (``mailroom run``) runs the same watcher on a thread of its worker host
instead (``mailroom worker-host --watcher``, :class:`WatcherThread`), which saves an
interpreter of ~110 MiB RSS; production runs it as its own Deployment (deploy/watcher.yaml).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from functools import partial
from typing import NoReturn

from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker
from services.logs import configure_logging
from services.settings import Settings
from services.tenant_slots import broker_redis
from services.watcher.core import Watcher
from tasks.celery_app import make_celery
from tasks.dispatch import dispatch

log = logging.getLogger("mailroom.watcher")


def build_watcher(settings: Settings) -> Watcher:
    """The watcher, queueing its syncs through ``tasks.dispatch`` on a Celery app of its own
    (services.watcher knows no Celery)."""
    queue = partial(dispatch, make_celery(settings))
    sessions = make_sessionmaker(make_engine(settings))
    return Watcher(settings, queue, sessions, SecretBox(settings.encryption_keys()), broker_redis(settings))


def run_watcher(settings: Settings) -> NoReturn:
    """Exits with status 0 after a requested stop."""
    configure_logging(settings.log_level, settings.log_format, force=True)
    watcher = build_watcher(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await watcher.run(stop)

    asyncio.run(main())
    # Nothing is left to flush but the logs; a thread still blocked in a network call (a
    # publish, a query) must not hold the exit up past the pod's grace period.
    logging.shutdown()
    os._exit(0)


class WatcherThread:
    """The watcher on a thread of another process, with its own asyncio loop (the worker
    host's consumers use no asyncio loop). ``stop()`` ends it as SIGTERM ends ``mailroom
    watcher``; ``is_alive()`` is false once it has ended, on request or not."""

    def __init__(self, settings: Settings) -> None:
        # MAILROOM_WORKER_HEARTBEAT_FILE stays the host's Celery workers' liveness signal: a
        # watcher touching it too would hide a stuck consumer.
        self.watcher = build_watcher(settings.model_copy(update={"worker_heartbeat_file": None}))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self.watcher.run(self._stop)

        try:
            asyncio.run(main())
        except Exception:
            log.exception("watcher: stopped by an error")
        finally:
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(timeout=30)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._thread.join(timeout=timeout)
