"""Putting work on a queue: write the record, commit, then publish with the same id.

The record is committed before the message exists, so a worker never sees a task without
its record; if the broker is down the record is marked ``dispatch_failed`` and the caller
gets :class:`ServiceUnavailable` — the request is never silently lost.

Dispatch is one short transaction: the cap check, the record (its duration estimate is one
primary-key read), the sync lock and one commit, on the caller's session when it passes one
(the API request's, which already checked the account), so a request uses one connection.
The message is published with ``ignore_result=True``: the record holds the result, so
nothing subscribes to a result channel and a result backend that is down cannot fail it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from services import accounts, task_records, task_stats
from services.db import transaction
from services.errors import MailroomError, ServiceUnavailable
from services.models import TaskRecord, new_id
from tasks.queues import TASK_TYPES, broker_priority, logical_priority

log = logging.getLogger("mailroom.dispatch")

#: Bounds of the Retry-After a tenant over its cap is told (seconds).
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1, 60


class TooManyTasksInFlight(MailroomError):
    """The tenant already has its cap of tasks in flight on this queue (HTTP 429).

    Refused rather than held back: holding the excess would need a second queue of our own
    in front of the broker (and something to drain it), while a 429 with ``Retry-After``
    costs nothing, keeps the API thread free, and tells the client exactly when to come
    back. ``retry_after`` is about one task's run time, when a slot is likely free again."""

    code = "too_many_tasks_in_flight"
    status = 429

    def __init__(self, message: str, *, retry_after: int, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Dispatched:
    record: TaskRecord
    #: False when an equivalent task was already in flight and its record is returned instead.
    created: bool


def dispatch(
    app: Celery,
    sessions: Session | sessionmaker[Any],
    *,
    type: str,
    tenant_id: str,
    user_id: str | None,
    account_id: str | None,
    params: dict[str, Any],
    origin: str = "api",
) -> Dispatched:
    """Record and queue one task. A sync of an account that already has one in flight
    returns that task instead of queueing a second.

    ``sessions`` is either a session to work in (its transaction, with whatever the caller
    did in it, is committed here before the publish) or a sessionmaker, of which one
    session is used and closed. A client's dispatch beyond the tenant's cap of tasks in
    flight on the queue raises :class:`TooManyTasksInFlight` (Beat's syncs are not capped:
    the sync lock already bounds them to one per account)."""
    if isinstance(sessions, Session):
        return _dispatch(app, sessions, type, tenant_id, user_id, account_id, params, origin)
    with transaction(sessions) as session:
        return _dispatch(app, session, type, tenant_id, user_id, account_id, params, origin)


def _dispatch(
    app: Celery,
    session: Session,
    type: str,
    tenant_id: str,
    user_id: str | None,
    account_id: str | None,
    params: dict[str, Any],
    origin: str,
) -> Dispatched:
    kind = TASK_TYPES[type]
    from_beat = origin == "beat"
    priority = logical_priority(kind.queue, from_beat=from_beat)
    settings = app.conf.mailroom_settings
    if not from_beat:
        _check_cap(session, tenant_id, kind.queue, settings.max_tasks_in_flight_per_queue, account_id, type)
    record_id = new_id()
    if type == "sync" and account_id is not None:
        # The lock first, with the record's id chosen up front: when another sync holds it,
        # nothing was written and nothing needs rolling back.
        ttl = accounts.sync_lock_ttl(settings)
        holder = accounts.claim_sync_lock(session, account_id, record_id, ttl=ttl)
        if holder is not None:
            existing = task_records.require_record(session, holder)
            session.commit()
            return Dispatched(existing, created=False)
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
        record_id=record_id,
    )
    session.commit()
    try:
        app.send_task(
            kind.task_name,
            kwargs={"tenant_id": tenant_id, "user_id": user_id, "account_id": account_id, "params": params},
            task_id=record.id,
            queue=kind.queue,
            routing_key=kind.queue,
            priority=broker_priority(priority),
            retry=False,
            ignore_result=True,
        )
    except (OperationalError, KombuError, RedisError, OSError) as exc:
        log.error("publishing task %s failed: %s", record.id, exc)
        # A new short transaction on the same session: the record was committed above.
        task_records.mark_dispatch_failed(session, record.id, f"the broker is unreachable: {exc}")
        if type == "sync" and account_id is not None:
            accounts.release_sync_lock(session, account_id, record.id)
        session.commit()
        raise ServiceUnavailable(
            "the task queue is unavailable; nothing was queued, try again shortly",
            details={"task_id": record.id},
        ) from None
    return Dispatched(record, created=True)


def _check_cap(
    session: Session, tenant_id: str, queue: str, cap: int, account_id: str | None, type: str
) -> None:
    """Refuse the dispatch when the tenant has ``cap`` tasks in flight on ``queue``.

    One bounded count on a partial index (at most ``cap`` entries), no lock: two dispatches
    racing at ``cap - 1`` may both pass, so the cap can be overshot by at most the number of
    dispatches running at that instant (the API's threads), never more."""
    if task_stats.in_flight(session, tenant_id, queue, up_to=cap) < cap:
        return
    typical = task_stats.estimate(session, account_id, type) or TASK_TYPES[type].default_estimate
    retry_after = min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, math.ceil(typical)))
    raise TooManyTasksInFlight(
        f"this tenant already has {cap} tasks in flight on the {queue} queue; try again later",
        retry_after=retry_after,
        details={"queue": queue, "limit": cap, "retry_after": retry_after},
    )
