"""Worker liveness that a broker outage does not fail: the worker's main process touches a
file every few seconds while it runs (``MAILROOM_WORKER_HEARTBEAT_FILE``), and the
Kubernetes liveness probe checks the file's age.

The probe it replaces, ``celery inspect ping``, goes through the broker: when Redis blips,
every worker of every queue fails it at once and is restarted, losing nothing but gaining
nothing either, and piling restarts onto an outage. The file says what liveness should:
this process still runs its loop. Stuck tasks are the time limits' business, not this.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

#: How often the file is touched; the probe allows several missed touches.
HEARTBEAT_SECONDS = 5.0


class HeartbeatFile(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker bootstep: touches ``path`` every HEARTBEAT_SECONDS from a daemon thread of
    the main process while the worker runs, and removes it when the worker stops."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        heartbeat_file = worker.app.conf.get("heartbeat_file")
        self.path = Path(heartbeat_file) if heartbeat_file else None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        if self.path is None:
            return
        self.stopped.clear()
        self.touch()
        self.thread = threading.Thread(target=self._run, name="mailroom-heartbeat", daemon=True)
        self.thread.start()

    def stop(self, worker: Any) -> None:
        self.stopped.set()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            self.touch()

    def touch(self) -> None:
        assert self.path is not None
        try:
            self.path.touch()
            os.utime(self.path)
        except OSError as exc:
            log.warning("cannot touch the heartbeat file %s: %s", self.path, exc)
