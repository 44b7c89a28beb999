"""Prometheus metrics of the workers themselves: task attempts by type, queue and outcome,
their run time, the time a message waited in its queue, tasks in progress, the messages the
work touched, and IMAP/SMTP faults by kind.

Prefork-safe: with ``PROMETHEUS_MULTIPROC_DIR`` set (before prometheus_client is imported,
i.e. in the process environment), every pool child writes its own file there and one
``MultiProcessCollector`` over the directory sees them all. ``make run`` points the API and
every worker at one directory, so the API's ``/metrics`` is the one scrape of the whole
stack; a worker pod serves its own directory on ``MAILROOM_WORKER_METRICS_PORT``.

Labels hold task types, queue names, outcomes and error kinds only: never a tenant, an
account, an address or anything from a message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from services.errors import MailError
from services.models import utcnow

log = logging.getLogger(__name__)

TASKS = Counter(
    "mailroom_worker_tasks",
    "Task attempts that ended, by task type, queue and outcome",
    ["type", "queue", "outcome"],
)
RUN_TIME = Histogram(
    "mailroom_task_run_seconds",
    "Run time of one task attempt, by task type",
    ["type"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800),
)
QUEUE_WAIT = Histogram(
    "mailroom_queue_wait_seconds",
    "From the moment a task could run (published, retry due, scheduled time) to its start, by queue",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)
IN_PROGRESS = Gauge(
    "mailroom_tasks_in_progress",
    "Task attempts running now, by queue",
    ["queue"],
    multiprocess_mode="livesum",
)
MESSAGES = Counter(
    "mailroom_worker_messages",
    "Messages handled by workers: synced (new), sent, deleted (moved or removed), scored",
    ["action"],
)
MAIL_ERRORS = Counter(
    "mailroom_mail_errors",
    "IMAP and SMTP faults that ended or retried a task attempt, by protocol and kind",
    ["protocol", "kind"],
)

# What each task type's result says about messages handled: result key -> action label.
_MESSAGE_COUNTS: Mapping[str, Mapping[str, str]] = {
    "sync": {"new": "synced"},
    "delete": {"moved": "deleted", "deleted": "deleted"},
    "spam_check": {"scored": "scored"},
}


class AttemptMetrics:
    """The metrics of one task attempt: created when the attempt starts running, ended once
    with its outcome."""

    def __init__(self, task_type: str, queue: str, ready_at: datetime | None) -> None:
        self.task_type = task_type
        self.queue = queue
        self.started = time.perf_counter()
        self.ended = False
        if ready_at is not None:
            QUEUE_WAIT.labels(queue).observe(max(0.0, (utcnow() - ready_at).total_seconds()))
        IN_PROGRESS.labels(queue).inc()

    def end(
        self, outcome: str, result: Mapping[str, Any] | None = None, error: BaseException | None = None
    ) -> None:
        if self.ended:
            return
        self.ended = True
        duration = time.perf_counter() - self.started
        IN_PROGRESS.labels(self.queue).dec()
        TASKS.labels(self.task_type, self.queue, outcome).inc()
        RUN_TIME.labels(self.task_type).observe(duration)
        # One line per attempt; the log context adds task id, tenant, queue and attempt.
        log.info(
            "task attempt ended: %s", outcome, extra={"outcome": outcome, "duration_s": round(duration, 3)}
        )
        if outcome == "succeeded" and result is not None:
            count_messages(self.task_type, result)
        if isinstance(error, MailError) and error.protocol is not None:
            MAIL_ERRORS.labels(error.protocol, error.kind).inc()


def count_messages(task_type: str, result: Mapping[str, Any]) -> None:
    for key, action in _MESSAGE_COUNTS.get(task_type, {}).items():
        value = result.get(key)
        if isinstance(value, int) and value > 0:
            MESSAGES.labels(action).inc(value)
    if task_type == "send" and result.get("state") == "sent":
        MESSAGES.labels("sent").inc()


def ready_time(
    created_at: datetime, next_retry_at: datetime | None, eta: str | None, attempt: int
) -> datetime:
    """When the attempt starting now could first have run: the publish time for a first
    attempt, the retry's due time for a later one, and never before a scheduled ETA
    (Celery's ISO text; a naive one is taken as UTC)."""
    ready = next_retry_at if attempt > 1 and next_retry_at is not None else created_at
    if eta:
        try:
            scheduled = datetime.fromisoformat(eta)
        except ValueError:
            return ready
        ready = max(ready, scheduled if scheduled.tzinfo else scheduled.replace(tzinfo=UTC))
    return ready


def serve_worker_metrics(port: int) -> None:
    """Serve every pool child's metrics from this worker's multiprocess directory on
    ``port`` (the worker's main process calls this once)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("worker metrics port %d set but PROMETHEUS_MULTIPROC_DIR is not; not serving", port)
        return
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    start_http_server(port, registry=registry)
    log.info("worker metrics on port %d", port)


def forget_process(pid: int) -> None:
    """A pool child exited: its live gauges must stop counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(pid)
