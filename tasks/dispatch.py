"""Putting work on a queue: write the record, commit, then publish with the same id.

The record is committed before the message exists, so a worker never sees a task without
its record; if the broker is down the record is marked ``dispatch_failed`` and the caller
gets :class:`ServiceUnavailable` — the request is never silently lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from services import accounts, task_records
from services.db import transaction
from services.errors import ServiceUnavailable
from services.models import TaskRecord
from tasks.queues import TASK_TYPES, broker_priority, logical_priority

log = logging.getLogger("mailroom.dispatch")


@dataclass(frozen=True)
class Dispatched:
    record: TaskRecord
    #: False when an equivalent task was already in flight and its record is returned instead.
    created: bool


def dispatch(
    app: Celery,
    sessions: sessionmaker[Session],
    *,
    type: str,
    tenant_id: str,
    user_id: str | None,
    account_id: str | None,
    params: dict[str, Any],
    origin: str = "api",
) -> Dispatched:
    """Record and queue one task. A sync of an account that already has one in flight
    returns that task instead of queueing a second."""
    kind = TASK_TYPES[type]
    from_beat = origin == "beat"
    priority = logical_priority(kind.queue, from_beat=from_beat)
    settings = app.conf.mailroom_settings
    with transaction(sessions) as session:
        record = task_records.create_record(
            session,
            tenant_id=tenant_id,
            user_id=user_id,
            account_id=account_id,
            type=type,
            queue=kind.queue,
            priority=priority,
            params=params,
            max_retries=kind.spec.max_retries,
            origin=origin,
            default_estimate=kind.default_estimate,
        )
        if type == "sync" and account_id is not None:
            ttl = accounts.sync_lock_ttl(settings)
            holder = accounts.claim_sync_lock(session, account_id, record.id, ttl=ttl)
            if holder is not None:
                session.rollback()
                existing = task_records.require_record(session, holder)
                return Dispatched(existing, created=False)
    try:
        app.send_task(
            kind.task_name,
            kwargs={"tenant_id": tenant_id, "user_id": user_id, "account_id": account_id, "params": params},
            task_id=record.id,
            queue=kind.queue,
            routing_key=kind.queue,
            priority=broker_priority(priority),
            retry=False,
        )
    except (OperationalError, KombuError, RedisError, OSError) as exc:
        log.error("publishing task %s failed: %s", record.id, exc)
        with transaction(sessions) as session:
            task_records.mark_dispatch_failed(session, record.id, f"the broker is unreachable: {exc}")
            if type == "sync" and account_id is not None:
                accounts.release_sync_lock(session, account_id, record.id)
        raise ServiceUnavailable(
            "the task queue is unavailable; nothing was queued, try again shortly",
            details={"task_id": record.id},
        ) from None
    return Dispatched(record, created=True)
