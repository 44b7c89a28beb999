"""``mailroom watcher``: build the watcher from the settings and run it until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import NoReturn

from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker
from services.logs import configure_logging
from services.settings import Settings
from services.tenant_slots import broker_redis
from services.watcher.core import Watcher

log = logging.getLogger("mailroom.watcher")


def run_watcher(settings: Settings) -> NoReturn:
    """Exits with status 0 after a requested stop."""
    from tasks.celery_app import make_celery

    configure_logging(settings.log_level, settings.log_format, force=True)
    app = make_celery(settings)
    sessions = make_sessionmaker(make_engine(settings))
    watcher = Watcher(settings, app, sessions, SecretBox(settings.encryption_keys()), broker_redis(settings))

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
