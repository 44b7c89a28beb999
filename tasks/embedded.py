"""Several queues' workers in one process, for the embedded stack (``mailroom run``).

Production runs one Deployment per queue, each a prefork ``celery worker -Q <queue>``. On a
laptop that is ten interpreters of ~110 MiB each. Here, each queue still gets its own
Celery worker — its own consumer, its own prefetch and its own pool of threads — so a
backlog on one queue never holds a message of another; they only share one interpreter.
Beat can run in the same process as a thread, and so can the watcher (services/watcher, on
a thread with its own asyncio loop): it consumes no queue, only publishes syncs, so it holds
no queue's message back; its own interpreter cost ~110 MiB RSS of ``mailroom run``'s budget.

Each worker gets its own Celery app, because a worker narrows its app's queue list to the
queues it consumes. Workers here use the synchronous consumer loop (the event loop is a
process-wide object that only one worker may drive).

Without an event loop a worker whose threads are all busy would be slow to take the next
message: kombu's Redis transport, asked to drain events while the worker may not take more
(its prefetch is full), sleeps up to a second before it looks again, and Celery's synchronous
loop asks with a two-second timeout, so a backlog drained at about one task per thread per
second however short the tasks (30 sends of 20 ms each took 14 s on 4 threads). Each worker
here therefore waits for a free thread itself, looking every :data:`BUSY_CHECK_SECONDS`, and
asks the broker only once it may take a message (:class:`_PromptConnection`).

What this mode does not do: enforce task time limits (only the prefork pool can kill a
task; the stale-task sweep still fails records that stop reporting). CPU-heavy queues (spam
scoring) belong in their own process, so that they do not take the interpreter from the
others; the launcher runs ``spam`` as a separate solo worker.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from celery import bootsteps
from celery.beat import EmbeddedService
from celery.worker import loops
from celery.worker.consumer import Consumer

from services.logs import configure_logging
from services.settings import Settings
from tasks.celery_app import make_celery, take_niceness

log = logging.getLogger(__name__)

#: How often an idle consumer looks for work when its blocking read returns empty.
POLLING_SECONDS = 0.01
#: How often a worker whose threads are all busy looks whether one has become free.
BUSY_CHECK_SECONDS = 0.005


class _PromptConnection:
    """A worker's broker connection whose ``drain_events`` first waits, in short steps of
    its own, until the worker may take a message (its channel's prefetch has room), and only
    then asks the broker, with what is left of the timeout. Everything else is the
    connection's.

    ``running`` says whether the worker still runs. A warm shutdown closes the connection
    from another thread (the one that stops the worker) while this one may be reading it;
    whatever that read then raises comes out as the ``OSError`` Celery's loop ends on
    quietly once its worker is stopping, not as an "Unrecoverable error"."""

    def __init__(self, connection: Any, channel: Any, running: Callable[[], bool] = lambda: True) -> None:
        self._connection = connection
        self._channel = channel
        self._running = running

    def drain_events(self, timeout: float | None = None, **kwargs: Any) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            qos = self._channel.qos
            while not qos.can_consume():
                if not self._running() or (deadline is not None and time.monotonic() >= deadline):
                    raise TimeoutError()  # socket.timeout, which the loop takes as "nothing came"
                time.sleep(BUSY_CHECK_SECONDS)
            if deadline is not None:
                timeout = max(deadline - time.monotonic(), BUSY_CHECK_SECONDS)
            return self._connection.drain_events(timeout=timeout, **kwargs)
        except TimeoutError:
            raise
        except Exception as exc:
            if self._running():
                raise
            raise OSError("the worker is stopping") from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def _prompt_synloop(
    obj: Any, connection: Any, consumer: Any, blueprint: Any, *args: Any, **kwargs: Any
) -> Any:
    """Celery's synchronous consumer loop over a :class:`_PromptConnection`."""
    prompt = _PromptConnection(connection, consumer.channel, lambda: blueprint.state == bootsteps.RUN)
    return loops.synloop(obj, prompt, consumer, blueprint, *args, **kwargs)


class _PromptConsumer(Consumer):  # type: ignore[misc]
    """The worker's consumer, running :func:`_prompt_synloop` (Celery takes a ``loop`` the
    class sets instead of choosing its own)."""

    loop = staticmethod(_prompt_synloop)


class WorkerHost:
    """One Celery worker per queue (``queues``: name → threads), and Beat and the watcher if
    asked, in this process. ``run()`` blocks until SIGTERM or SIGINT, then stops them warmly."""

    def __init__(
        self, settings: Settings, queues: Mapping[str, int], *, beat: bool, watcher: bool = False
    ) -> None:
        self.settings = settings
        self.queues = dict(queues)
        self.beat = beat
        self.watcher = watcher
        self.watcher_thread: Any = None
        self.stopping = threading.Event()
        self.workers: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.beat_service: Any = None

    def _app(self) -> Any:
        app = make_celery(self.settings)
        options = dict(app.conf.broker_transport_options)
        options["polling_interval"] = POLLING_SECONDS
        app.conf.broker_transport_options = options
        return app

    def start(self) -> None:
        host = socket.gethostname()
        # Code that reaches for "the" app (a task's own ``self.app`` in a pool thread, a
        # result) finds one configured like every worker's here.
        self._app().set_default()
        for queue, threads in self.queues.items():
            app = self._app()
            worker = app.WorkController(
                hostname=f"{queue}@{host}",
                queues=[queue],
                pool_cls="threads",
                concurrency=threads,
                use_eventloop=False,
                consumer_cls=_PromptConsumer,
                without_gossip=True,
                without_mingle=True,
                loglevel=self.settings.log_level,
            )
            thread = threading.Thread(target=worker.start, name=f"worker-{queue}", daemon=True)
            self.workers.append(worker)
            self.threads.append(thread)
        for thread in self.threads:
            thread.start()
        if self.beat:
            app = self._app()
            self.beat_service = EmbeddedService(app, thread=True, scheduler_cls=app.conf.beat_scheduler)
            self.beat_service.start()
        if self.watcher:
            from tasks.watcher import WatcherThread

            self.watcher_thread = WatcherThread(self.settings)
            self.watcher_thread.start()
        extras = [name for name, on in (("Beat", self.beat), ("the watcher", self.watcher)) if on]
        log.info("worker host: %s%s", ", ".join(f"{q}@{host} ({n} threads)" for q, n in self.queues.items()),
                 "".join(f" and {name}" for name in extras))  # fmt: skip
        # The launcher and the test harness wait for this line, as for a celery worker's.
        for queue in self.queues:
            logging.getLogger("celery.apps.worker").info("%s@%s ready.", queue, host)

    def stop(self) -> None:
        if self.watcher_thread is not None:
            self.watcher_thread.stop(timeout=5.0)
        if self.beat_service is not None:
            self.beat_service.stop()
        for worker in self.workers:
            worker.stop(in_sighandler=False)
        for thread in self.threads:
            thread.join(timeout=self.settings.task_hard_time_limit)

    def run(self) -> int:
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self.stopping.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        # A bare WorkController configures no logging (the `celery worker` command does).
        configure_logging(self.settings.log_level, self.settings.log_format, force=True)
        take_niceness(self.settings.worker_nice)
        self.start()
        while not self.stopping.wait(1.0):
            if not all(thread.is_alive() for thread in self.threads):
                log.error("worker host: a worker stopped on its own; stopping the rest")
                self.stop()
                return 1
            if self.watcher_thread is not None and not self.watcher_thread.is_alive():
                log.error("worker host: the watcher stopped on its own; stopping the rest")
                self.stop()
                return 1
        log.info("worker host: stopping (waiting for running tasks)")
        self.stop()
        return 0
