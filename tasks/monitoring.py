"""Looking at the queues and the workers: status of one task, what is active, how deep each
queue is, which workers serve which queue, and revoking a message."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import ChannelError
from sqlalchemy.orm import Session

from services import task_records
from services.models import TaskRecord
from services.tenancy import Principal, scoped
from tasks.queues import QUEUES


def get_task_status(app: Celery, session: Session, task_id: str, principal: Principal) -> dict[str, Any]:
    """The record as the owner sees it, with Celery's own view of the message beside it."""
    record = task_records.get_record(session, task_id, principal)
    celery_state = None
    if record.state not in task_records.FINAL:
        try:
            celery_state = AsyncResult(task_id, app=app).state
        except Exception:  # noqa: BLE001 - the record is authoritative; this is extra
            celery_state = None
    return {"record": record, "celery_state": celery_state}


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
