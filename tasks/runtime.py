"""What a worker process needs to do its work: settings, a database session factory, the
secret box. Built on first use in each process (after the prefork pool forks), never at
import time."""

from __future__ import annotations

import os
from dataclasses import dataclass

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker
from services.settings import Settings


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    box: SecretBox
    pid: int


_runtime: Runtime | None = None


def get_runtime(app: Celery) -> Runtime:
    """The runtime of this process, rebuilt if the process was forked since."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings: Settings = app.conf.mailroom_settings
        engine = make_engine(settings)
        _runtime = Runtime(
            settings=settings,
            sessions=make_sessionmaker(engine),
            box=SecretBox(settings.encryption_keys()),
            pid=os.getpid(),
        )
    return _runtime
