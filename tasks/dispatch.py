"""Putting work on a queue: write the record, commit, then publish with the same id.

The record is committed before the message exists, so a worker never sees a task without
its record; if the broker is down the record is marked ``dispatch_failed`` and the caller
gets :class:`ServiceUnavailable` — the request is never silently lost.

Dispatch is one short transaction, on the caller's session when it passes one (the API
request's, so a request uses one connection): one INSERT … SELECT writes the record only if
the account check and the tenant's cap on tasks in flight allow it, reading the duration
estimate on the way (index lookups, never the task history); a sync then locks its account
and claims the sync lock; one commit. The message is published after the commit, with
``ignore_result=True``: the record holds the result, so nothing subscribes to a result
channel and a result backend that is down cannot fail a dispatch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError, OperationalError
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from services import accounts, task_records, task_stats, webhooks
from services.db import transaction
from services.errors import MailroomError, NotFound, ServiceUnavailable
from services.models import TaskRecord, TaskState, utcnow
from services.tenancy import Principal
from tasks import webhook_tasks
from tasks.queues import TASK_TYPES, broker_priority, logical_priority

log = logging.getLogger("mailroom.dispatch")

#: Longest kwargs text a message carries for logs and Flower.
KWARGSREPR_MAX = 1024
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
    visible_to: Principal | None = None,
    eta: datetime | None = None,
    task_id: str | None = None,
) -> Dispatched:
    """Record and queue one task. A sync of an account that already has one in flight
    returns that task instead of queueing a second.

    ``sessions`` is either a session to work in (its transaction, with whatever the caller
    did in it, is committed here before the publish) or a sessionmaker, of which one
    session is used and closed. A client's dispatch beyond the tenant's cap of tasks in
    flight on the queue raises :class:`TooManyTasksInFlight` (Beat's syncs are not capped:
    the sync lock already bounds them to one per account). With ``visible_to``, the account
    must be one that principal may see (else :class:`NotFound`), checked in the same round
    trip as the cap and the estimate. With ``eta`` the message is published to be run at
    that time (a scheduled send); the record is ``queued`` until then. ``task_id`` is the
    record's id when the caller chose it beforehand (to write it into its own rows of the
    same transaction)."""
    args = (type, tenant_id, user_id, account_id, params, origin, visible_to, eta, task_id)
    if isinstance(sessions, Session):
        return _dispatch(app, sessions, *args)
    with transaction(sessions) as session:
        return _dispatch(app, session, *args)


def _dispatch(
    app: Celery,
    session: Session,
    type: str,
    tenant_id: str,
    user_id: str | None,
    account_id: str | None,
    params: dict[str, Any],
    origin: str,
    visible_to: Principal | None,
    eta: datetime | None = None,
    task_id: str | None = None,
) -> Dispatched:
    kind = TASK_TYPES[type]
    from_beat = origin == "beat"
    priority = logical_priority(kind.queue, from_beat=from_beat)
    settings = app.conf.mailroom_settings
    # Beat's and the watcher's syncs are not capped: the sync lock bounds them to one per account.
    cap = None if from_beat or origin == "watcher" else settings.max_tasks_in_flight_per_queue
    record = None
    for _ in range(2):
        record = task_records.create_record_if_allowed(
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
            cap=cap,
            visible_to=visible_to,
            task_id=task_id,
        )
        if record is not None:
            break
        # Refused: say why (rare, so the second look costs nothing in the common case).
        checked = task_stats.preflight(
            session,
            tenant_id=tenant_id,
            queue=kind.queue,
            account_id=account_id,
            type=type,
            cap=cap,
            visible_to=visible_to,
        )
        if not checked.visible:
            raise NotFound("account not found")
        if cap is not None and checked.in_flight >= cap:
            raise _over_cap(kind.queue, cap, checked.estimate or kind.default_estimate)
        # A slot freed between the two statements: try once more.
    if record is None:
        assert cap is not None
        raise _over_cap(kind.queue, cap, kind.default_estimate)
    superseded: list[str] = []
    if type == "sync" and account_id is not None:
        # Claiming locks the account row first (see accounts.claim_sync_lock).
        holder = accounts.claim_sync_lock(session, account_id, record.id)
        if holder is not None:
            existing = task_records.require_record(session, holder)
            if not _never_delivered(existing):
                task_records.discard_record(session, record)
                session.commit()
                return Dispatched(existing, created=False)
            # Its publisher died between the commit and the publish: no message will ever
            # run it, and it would hold the account's syncs until the day-old cleanup.
            task_records.mark_failed(session, existing.id, NEVER_DELIVERED, "superseded")
            superseded = webhooks.record_task_events(session, existing.tenant_id, existing.id)
            taken = accounts.claim_sync_lock(session, account_id, record.id)
            assert taken is None, taken
    session.commit()
    if superseded:
        webhook_tasks.publish(app, tenant_id, superseded)
    try:
        publish(app, record, eta=eta)
    except (OperationalError, KombuError, RedisError, OSError) as exc:
        log.error("publishing task %s failed: %s", record.id, exc)
        # A new short transaction on the same session: the record was committed above.
        task_records.mark_dispatch_failed(session, record.id, f"the broker is unreachable: {exc}")
        if type == "sync" and account_id is not None:
            accounts.release_sync_lock(session, account_id, record.id)
        # Its task.failed event, committed with the failure; not published now (the broker
        # just refused): Beat's sweep publishes it (tasks.webhook_tasks.sweep_unpublished).
        webhooks.record_task_events(session, tenant_id, record.id)
        session.commit()
        raise ServiceUnavailable(
            "the task queue is unavailable; nothing was queued, try again shortly",
            details={"task_id": record.id},
        ) from None
    return Dispatched(record, created=True)


def publish(app: Celery, record: TaskRecord, *, eta: datetime | None = None, retries: int = 0) -> None:
    """Put ``record``'s message on its queue, with the record's id as the task id, its
    priority and its tenant, user, account and params as the task's arguments; raises what
    the broker raised. Used by dispatch, and by the sweep that re-publishes a message the
    broker lost (tasks.redispatch: then ``retries`` carries the retries already spent)."""
    kind = TASK_TYPES[record.type]
    kwargs = {
        "tenant_id": record.tenant_id,
        "user_id": record.user_id,
        "account_id": record.account_id,
        "params": record.params,
    }
    app.send_task(
        kind.task_name,
        kwargs=kwargs,
        # What logs and Flower show; Celery's own saferepr of it cost a fifth of a publish.
        kwargsrepr=repr(kwargs)[:KWARGSREPR_MAX],
        task_id=record.id,
        queue=kind.queue,
        routing_key=kind.queue,
        priority=broker_priority(record.priority),
        retry=False,
        ignore_result=True,
        eta=eta,
        retries=retries,
        # When it was queued, for the oldest waiting message's age (tasks.monitoring).
        headers={"published_at": time.time()},
    )


#: A sync still ``queued`` with no attempt this long after its record was written is taken
#: to have lost its message (its publisher died between the commit and the publish): the
#: next sync dispatched for the account replaces it. A sync queue this far behind would
#: also be read so; the replaced record's message, should it come after all, finds the
#: record finished and is dropped (tasks.lifecycle), so the cost is one message more.
SYNC_NEVER_DELIVERED_AFTER = timedelta(minutes=10)
NEVER_DELIVERED = (
    "this sync was never picked up (its message was lost when the process queueing it "
    "stopped); a newer sync of the account replaced it"
)


def _never_delivered(record: TaskRecord) -> bool:
    return (
        record.state == TaskState.QUEUED.value
        and record.attempts == 0
        and record.created_at < utcnow() - SYNC_NEVER_DELIVERED_AFTER
    )


def _over_cap(queue: str, cap: int, typical: float) -> TooManyTasksInFlight:
    """The refusal of a dispatch beyond the cap. The cap is checked without a lock (one
    bounded count on a partial index): two dispatches racing at ``cap - 1`` may both pass,
    so it can be overshot by at most the number of dispatches running at that instant (the
    API's threads, over all its processes), never more."""
    retry_after = min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, math.ceil(typical)))
    return TooManyTasksInFlight(
        f"this tenant already has {cap} tasks in flight on the {queue} queue; try again later",
        retry_after=retry_after,
        details={"queue": queue, "limit": cap, "retry_after": retry_after},
    )
