"""Looking at the queues and the workers: status of one task, what is active, how deep each
queue is, which workers serve which queue, and revoking a message."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy.orm import Session

from services import task_records
from services.models import TaskRecord
from services.tenancy import Principal, scoped
from tasks.queues import PRIORITY_STEPS, QUEUES, logical_from_broker

# Celery's names for the record's states, for tools that speak Celery's vocabulary.
_CELERY_STATES = {
    "queued": "PENDING",
    "running": "STARTED",
    "retrying": "RETRY",
    "succeeded": "SUCCESS",
    "failed": "FAILURE",
    "cancelled": "REVOKED",
}


def get_task_status(app: Celery, session: Session, task_id: str, principal: Principal) -> dict[str, Any]:
    """The record as the owner sees it, and its state in Celery's vocabulary. The record is
    the one source: tasks are published without a stored result (``ignore_result``), so
    the result backend would say ``PENDING`` for every task, finished or not."""
    record = task_records.get_record(session, task_id, principal)
    return {"record": record, "celery_state": _CELERY_STATES.get(record.state, "PENDING")}


def get_active_tasks(session: Session, principal: Principal, *, limit: int = 500) -> list[TaskRecord]:
    """The tenant's tasks that are queued, running or waiting to retry, oldest first."""
    query = (
        scoped(TaskRecord, principal, owned=False)
        .where(TaskRecord.state.in_(task_records.IN_FLIGHT))
        .order_by(TaskRecord.created_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def get_queue_stats(app: Celery) -> dict[str, int]:
    """Messages waiting on each queue (all priority levels), read from the broker."""
    depths: dict[str, int] = {}
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for name in QUEUES:
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except ChannelError:
                depths[name] = 0  # never declared: nothing was ever published to it

    return depths


@dataclass(frozen=True)
class QueueDetail:
    """One queue as the broker holds it: waiting messages per logical priority (10 = most
    urgent), and how long the oldest waiting message has waited (None when empty or when
    its publisher did not stamp it)."""

    by_priority: dict[int, int]
    oldest_age: float | None

    @property
    def depth(self) -> int:
        return sum(self.by_priority.values())


def get_queue_details(app: Celery) -> dict[str, QueueDetail]:
    """Depth per queue and priority and the oldest message's age, in two pipelined round
    trips to the Redis broker whatever the queues hold (O(queues x priority steps))."""
    with app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        keys = [(name, step, channel._q_for_pri(name, step)) for name in QUEUES for step in PRIORITY_STEPS]
        client = channel.client
        with client.pipeline() as pipe:
            for _, _, key in keys:
                pipe.llen(key)
            sizes = pipe.execute()
        waiting = [(name, step, key) for (name, step, key), n in zip(keys, sizes, strict=True) if n]
        with client.pipeline() as pipe:
            for _, _, key in waiting:
                pipe.lindex(key, -1)  # kombu pushes on the left and pops on the right
            oldest = pipe.execute()
    now = time.time()
    details: dict[str, QueueDetail] = {}
    for name in QUEUES:
        counts = {
            logical_from_broker(step): n
            for (queue, step, _), n in zip(keys, sizes, strict=True)
            if queue == name and n
        }
        stamps = [
            stamp
            for (queue, _, _), raw in zip(waiting, oldest, strict=True)
            if queue == name and (stamp := _published_at(raw)) is not None
        ]
        details[name] = QueueDetail(counts, max(0.0, now - min(stamps)) if stamps else None)
    return details


def _published_at(raw: bytes | None) -> float | None:
    """The dispatch stamp of a raw kombu message (``published_at`` header, or its ETA if
    later), or None."""
    if raw is None:
        return None
    try:
        headers = json.loads(raw).get("headers") or {}
        stamp = float(headers["published_at"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    eta = headers.get("eta")
    if isinstance(eta, str):
        try:
            stamp = max(stamp, datetime.fromisoformat(eta).timestamp())
        except ValueError:
            pass
    return stamp


def revoke_task(app: Celery, task_id: str, *, terminate: bool = False) -> None:
    """Tell every worker to drop ``task_id`` if it arrives. Cancellation does not rely on
    this alone (workers also check the record), because revokes live in worker memory."""
    app.control.revoke(task_id, terminate=terminate)


def workers_per_queue(app: Celery, *, timeout: float = 1.0) -> dict[str, int]:
    """How many live workers consume each queue (asks the workers; absent ones count 0)."""
    counts = dict.fromkeys(QUEUES, 0)
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    for queues in replies.values():
        for queue in queues or []:
            name = queue.get("name")
            if name in counts:
                counts[name] += 1
    return counts


def ping_broker(app: Celery) -> None:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def ping_result_backend(app: Celery) -> None:
    app.backend.client.ping()
