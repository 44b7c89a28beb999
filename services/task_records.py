"""The task record: what the API promised a client, and what a worker reports back.

State moves ``queued → running → (retrying → running)* → succeeded | failed | cancelled``.
Every transition is one conditional UPDATE, so the API (cancel) and a worker (start, finish)
racing on the same record cannot both win.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Table, bindparam, delete, func, null, or_, select, update
from sqlalchemy.orm import Session, make_transient_to_detached

from services import task_stats
from services.db import SCOPE_PARAM, ScopedStatement
from services.errors import Conflict, NotFound
from services.models import Account, TaskRecord, TaskState, User, new_id, utcnow
from services.tenancy import Principal, get_scoped, scoped

FINAL = [s.value for s in TaskState.final()]
IN_FLIGHT = [s.value for s in TaskState.in_flight()]


_TASKS = typing.cast(Table, TaskRecord.__table__)


def create_record_if_allowed(
    session: Session,
    *,
    tenant_id: str,
    user_id: str | None,
    account_id: str | None,
    type: str,
    queue: str,
    priority: int,
    params: dict[str, Any],
    max_retries: int,
    origin: str,
    default_estimate: float | None,
    cap: int | None,
    visible_to: Principal | None,
    task_id: str | None = None,
) -> TaskRecord | None:
    """Write a ``queued`` record (inserted, not committed) in one statement that also
    checks that ``visible_to`` may see the account and that the tenant has fewer than
    ``cap`` tasks in flight on ``queue``, and reads the duration estimate (a running mean,
    never the history: ``services.task_stats.insert_if_allowed``). None when refused.
    ``task_id`` is the record's id when the caller chose it beforehand (a new one if not)."""
    values = _defaults()
    values.update(
        id=task_id or new_id(),
        tenant_id=tenant_id,
        user_id=user_id,
        account_id=account_id,
        type=type,
        queue=queue,
        priority=priority,
        params=params,
        max_retries=max_retries,
        origin=origin,
        state=TaskState.QUEUED.value,
    )
    inserted, estimate = task_stats.insert_if_allowed(
        session, values, cap=cap, visible_to=visible_to, default_estimate=default_estimate
    )
    if not inserted:
        return None
    record = TaskRecord(**values, estimated_duration=estimate)
    make_transient_to_detached(record)
    session.add(record)
    return record


def _defaults() -> dict[str, Any]:
    """Every column but the estimate, at its Python-side default (fresh values from callable
    defaults: ids, timestamps, an empty dict), or None."""
    values: dict[str, Any] = {}
    for column in _TASKS.columns:
        if column.key == "estimated_duration":
            continue
        default = column.default
        if default is not None and default.is_scalar:
            values[column.key] = default.arg  # type: ignore[attr-defined]
        elif default is not None and default.is_callable:
            values[column.key] = default.arg(None)  # type: ignore[attr-defined]
        else:
            values[column.key] = None
    return values


def discard_record(session: Session, record: TaskRecord) -> None:
    """Take back a record :func:`create_record_if_allowed` wrote in this transaction (a
    sync that turned out to be a duplicate), without rolling back the rest of it."""
    session.execute(delete(_TASKS).where(_TASKS.c.id == record.id))
    session.expunge(record)


def get_record(session: Session, task_id: str, principal: Principal) -> TaskRecord:
    return get_scoped(session, TaskRecord, task_id, principal, what="task")


def load_record(session: Session, task_id: str) -> TaskRecord | None:
    """The record by id for a worker, which checks ownership itself afterwards."""
    return session.get(TaskRecord, task_id, populate_existing=True)


@dataclass(frozen=True)
class TaskFilter:
    state: str | None = None
    type: str | None = None
    account_id: str | None = None


def list_records(
    session: Session, principal: Principal, flt: TaskFilter, *, limit: int, offset: int
) -> tuple[list[TaskRecord], int]:
    """The caller's records, newest first, and the total matching the filter."""
    query = scoped(TaskRecord, principal)
    if flt.state:
        query = query.where(TaskRecord.state == flt.state)
    if flt.type:
        query = query.where(TaskRecord.type == flt.type)
    if flt.account_id:
        query = query.where(TaskRecord.account_id == flt.account_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(TaskRecord.created_at.desc(), TaskRecord.id.desc()).limit(limit).offset(offset)
    )
    return list(rows), total


def _transition(session: Session, task_id: str, allowed: list[str], **values: Any) -> bool:
    result = session.execute(
        update(TaskRecord)
        .where(TaskRecord.id == task_id, TaskRecord.state.in_(allowed))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def mark_dispatch_failed(session: Session, task_id: str, error: str) -> None:
    """The broker refused the message: the record says so instead of waiting forever."""
    _transition(
        session,
        task_id,
        [TaskState.QUEUED.value],
        state=TaskState.FAILED.value,
        error_code="dispatch_failed",
        last_error=error,
        finished_at=utcnow(),
    )


def _scoped_update(allowed: list[str], *, returning: tuple[Any, ...] = (), **values: Any) -> ScopedStatement:
    """A transition as a :class:`ScopedStatement`: ``UPDATE tasks SET values WHERE id =
    :task_id AND state IN allowed`` (and the session's tenant), ``RETURNING returning``."""

    def build(scoped: bool) -> Any:
        where = [_TASKS.c.id == bindparam("task_id"), _TASKS.c.state.in_(allowed)]
        if scoped:
            where.append(_TASKS.c.tenant_id == bindparam(SCOPE_PARAM))
        statement = update(_TASKS).where(*where).values(**values)
        return statement.returning(*returning) if returning else statement

    return ScopedStatement(build)


_MARK_RUNNING = _scoped_update(
    [TaskState.QUEUED.value, TaskState.RETRYING.value, TaskState.RUNNING.value],
    state=TaskState.RUNNING.value,
    attempts=_TASKS.c.attempts + 1,
    started_at=func.coalesce(_TASKS.c.started_at, bindparam("now", type_=_TASKS.c.started_at.type)),
    worker=bindparam("worker", type_=_TASKS.c.worker.type),
    next_retry_at=null(),
    updated_at=bindparam("now", type_=_TASKS.c.updated_at.type),
)


def mark_running(session: Session, task_id: str, worker: str | None) -> bool:
    """Start (or, after a redelivery, restart) an attempt; False if it may not run."""
    result = _MARK_RUNNING.execute(session, {"task_id": task_id, "worker": worker, "now": utcnow()})
    return bool(result.rowcount == 1)


#: What a worker reads of its record when an attempt starts (the record's columns by name).
_ATTEMPT_COLUMNS = (
    "state",
    "cancel_requested",
    "attempts",
    "max_retries",
    "type",
    "queue",
    "created_at",
    "next_retry_at",
    "tenant_id",
    "user_id",
    "account_id",
)


def _attempt_view(scoped: bool) -> Any:
    # With the record, its account's and user's owners (NULL where there is none): what
    # accounts.owner_refusal decides from, read by the same statement.
    account = typing.cast(Table, Account.__table__).alias("task_account")
    user = typing.cast(Table, User.__table__).alias("task_user")
    query = (
        select(
            *(_TASKS.c[name] for name in _ATTEMPT_COLUMNS),
            account.c.tenant_id.label("account_tenant"),
            account.c.user_id.label("account_user"),
            user.c.tenant_id.label("user_tenant"),
            user.c.role.label("user_role"),
        )
        .select_from(
            _TASKS.outerjoin(account, account.c.id == _TASKS.c.account_id).outerjoin(
                user, user.c.id == _TASKS.c.user_id
            )
        )
        .where(_TASKS.c.id == bindparam("task_id"))
    )
    return query.where(_TASKS.c.tenant_id == bindparam(SCOPE_PARAM)) if scoped else query


_LOAD_FOR_ATTEMPT = ScopedStatement(_attempt_view)


def load_for_attempt(session: Session, task_id: str) -> Any:
    """The columns of the record an attempt starts from (a row with the names of
    ``_ATTEMPT_COLUMNS``, and ``account_tenant``, ``account_user``, ``user_tenant``,
    ``user_role`` for :func:`services.accounts.owner_refusal`), or None: one Core SELECT,
    no ORM object."""
    return _LOAD_FOR_ATTEMPT.execute(session, {"task_id": task_id}).first()


def report_progress(session: Session, task_id: str, progress: int, stage: str) -> bool:
    """Store progress; returns whether the attempt must stop: cancellation was requested, or
    the record is no longer ``running`` (the sweep gave it up as lost, or it was cancelled),
    so this worker no longer owns the task."""
    _transition(
        session,
        task_id,
        [TaskState.RUNNING.value],
        progress=max(0, min(99, int(progress))),
        stage=stage[:500],
    )
    return must_stop(session, task_id)


def must_stop(session: Session, task_id: str) -> bool:
    """True when the attempt running ``task_id`` must stop at its next checkpoint: cancelled,
    no longer ``running``, or its account deleted (every task is recorded with its account,
    and deleting the account sets ``account_id`` to null), so that no task goes on reading
    or changing a mailbox Mailroom no longer serves."""
    row = session.execute(
        select(TaskRecord.state, TaskRecord.cancel_requested, TaskRecord.account_id).where(
            TaskRecord.id == task_id
        )
    ).first()
    return (
        row is None
        or row.state != TaskState.RUNNING.value
        or bool(row.cancel_requested)
        or row.account_id is None
    )


def mark_retrying(
    session: Session, task_id: str, error: str, code: str, delay: float, *, ref: str | None = None
) -> None:
    _transition(
        session,
        task_id,
        [TaskState.RUNNING.value],
        state=TaskState.RETRYING.value,
        last_error=error[:4000],
        error_code=code,
        error_ref=ref,
        next_retry_at=utcnow() + timedelta(seconds=delay),
    )


_MARK_SUCCEEDED = _scoped_update(
    [TaskState.RUNNING.value],
    state=TaskState.SUCCEEDED.value,
    progress=100,
    stage="done",
    result=bindparam("result", type_=_TASKS.c.result.type),
    error_code=null(),
    last_error=null(),
    error_ref=null(),
    finished_at=bindparam("now", type_=_TASKS.c.finished_at.type),
    updated_at=bindparam("now", type_=_TASKS.c.updated_at.type),
    # What the duration statistics fold in (task_stats.record_success), read by the same
    # statement instead of a SELECT after it.
    returning=task_stats.FINISHED_RUN_COLUMNS,
)


def mark_succeeded(session: Session, task_id: str, result: dict[str, Any]) -> Any:
    """End the record ``succeeded``; returns the finished run (task_stats.FINISHED_RUN_COLUMNS)
    for :func:`task_stats.record_success`, or None when the record was not running."""
    return _MARK_SUCCEEDED.execute(session, {"task_id": task_id, "result": result, "now": utcnow()}).first()


def mark_failed(session: Session, task_id: str, error: str, code: str, *, ref: str | None = None) -> None:
    if _transition(
        session,
        task_id,
        IN_FLIGHT,
        state=TaskState.FAILED.value,
        last_error=error[:4000],
        error_code=code,
        error_ref=ref,
        finished_at=utcnow(),
    ):
        _let_go_of_account(session, task_id)


def mark_cancelled(session: Session, task_id: str, stage: str = "cancelled") -> None:
    if _transition(
        session,
        task_id,
        IN_FLIGHT,
        state=TaskState.CANCELLED.value,
        cancel_requested=True,
        stage=stage,
        finished_at=utcnow(),
    ):
        _let_go_of_account(session, task_id)


def _let_go_of_account(session: Session, task_id: str) -> None:
    """A task that ended failed or cancelled no longer holds its account's sync lock. The
    lock counts as free anyway once its holder is final (services.accounts); clearing it
    keeps ``sync_task_id`` what the API says it is: the sync in flight, if any."""
    session.execute(
        update(Account)
        .where(
            Account.id == select(TaskRecord.account_id).where(TaskRecord.id == task_id).scalar_subquery(),
            Account.sync_task_id == task_id,
        )
        .values(sync_task_id=None)
        .execution_options(synchronize_session=False)
    )


#: The stage of a task cancelled between attempts. It ran at least once: it keeps its
#: attempts and the last attempt's error (what it was waiting to retry), and no next retry.
CANCELLED_WAITING_TO_RETRY = "cancelled while waiting to retry"


def request_cancel(session: Session, record: TaskRecord) -> bool:
    """Cancel a task: one not yet running ends ``cancelled`` now and will never run (one
    that never ran says "cancelled before it ran"; one waiting to retry says
    :data:`CANCELLED_WAITING_TO_RETRY`); a running one is flagged and stops at its next
    checkpoint. Returns True when it was still in flight; a finished task cannot be
    cancelled (:class:`Conflict`)."""
    if record.state in FINAL:
        raise Conflict(f"task already {record.state}", details={"state": record.state})
    cancelled = {"state": TaskState.CANCELLED.value, "cancel_requested": True, "finished_at": utcnow()}
    stopped_now = _transition(
        session, record.id, [TaskState.QUEUED.value], stage="cancelled before it ran", **cancelled
    ) or _transition(
        session,
        record.id,
        [TaskState.RETRYING.value],
        stage=CANCELLED_WAITING_TO_RETRY,
        next_retry_at=None,
        **cancelled,
    )
    if stopped_now:
        _let_go_of_account(session, record.id)
    else:
        _transition(session, record.id, [TaskState.RUNNING.value], cancel_requested=True)
    session.refresh(record)
    return True


def counts_by_state(session: Session, tenant_id: str) -> dict[str, int]:
    """The tenant's tasks per state, from indexes and running totals, never the history
    (see ``services.task_stats.counts_by_state`` for what each final state counts)."""
    return task_stats.counts_by_state(session, tenant_id)


def average_durations(session: Session, tenant_id: str) -> dict[str, float]:
    """Mean run time (s) of the tenant's successful tasks per type, from running totals."""
    return task_stats.average_durations(session, tenant_id)


def fail_stuck(session: Session, *, older_than: datetime) -> list[tuple[str, str]]:
    """Records still running/retrying with no sign of life since ``older_than`` (their
    last write, or the retry time they wait for): failed; their (tenant id, task id), for
    the caller to record their ``task.failed`` events in the same transaction. The caller
    picks ``older_than`` past the broker's visibility timeout, so a record whose worker
    died is only given up once the broker has had its chance to redeliver the message."""
    result = session.execute(
        update(TaskRecord)
        .where(
            TaskRecord.state.in_([TaskState.RUNNING.value, TaskState.RETRYING.value]),
            func.coalesce(TaskRecord.next_retry_at, TaskRecord.updated_at) < older_than,
        )
        .values(
            state=TaskState.FAILED.value,
            error_code="stuck",
            last_error="no worker reported on this task for too long (its worker was lost)",
            finished_at=utcnow(),
        )
        .returning(TaskRecord.tenant_id, TaskRecord.id)
        .execution_options(synchronize_session=False)
    )
    return [(tenant_id, task_id) for tenant_id, task_id in result]


def fail_undelivered(session: Session, *, older_than: datetime) -> list[tuple[str, str]]:
    """``queued`` records that no worker picked up for far longer than the broker keeps an
    unacknowledged message: the message is lost, so the record must not stay queued
    forever. Failed; their (tenant id, task id), as :func:`fail_stuck`."""
    result = session.execute(
        update(TaskRecord)
        .where(TaskRecord.state == TaskState.QUEUED.value, TaskRecord.created_at < older_than)
        .values(
            state=TaskState.FAILED.value,
            error_code="stuck",
            last_error="the task was never picked up by a worker",
            finished_at=utcnow(),
        )
        .returning(TaskRecord.tenant_id, TaskRecord.id)
        .execution_options(synchronize_session=False)
    )
    return [(tenant_id, task_id) for tenant_id, task_id in result]


def waiting_for_broker(session: Session, *, settled_before: datetime) -> list[TaskRecord]:
    """Records whose message should be in the broker now: ``queued`` ones committed before
    ``settled_before`` and ``retrying`` ones that went into their wait before it (so their
    publish, which follows the commit, is done). Oldest first. Read when the broker lost
    its data (tasks.redispatch), not on every sweep."""
    query = (
        select(TaskRecord)
        .where(
            or_(
                (TaskRecord.state == TaskState.QUEUED.value) & (TaskRecord.created_at < settled_before),
                (TaskRecord.state == TaskState.RETRYING.value) & (TaskRecord.updated_at < settled_before),
            )
        )
        .order_by(TaskRecord.created_at)
    )
    return list(session.scalars(query))


def claim_for_republish(session: Session, record: TaskRecord) -> bool:
    """Take the right to publish ``record``'s lost message again: one conditional UPDATE
    (it moves ``updated_at``) that succeeds only while the record is as it was read, so of
    two sweeps running at once only one publishes, and a record that started, ended or was
    cancelled meanwhile gets no message."""
    result = session.execute(
        update(TaskRecord)
        .where(
            TaskRecord.id == record.id,
            TaskRecord.state == record.state,
            TaskRecord.updated_at == record.updated_at,
        )
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount == 1


def delete_history(session: Session, *, older_than: datetime) -> int:
    """Forget finished records older than the kept history."""
    result = session.execute(
        delete(TaskRecord)
        .where(TaskRecord.state.in_(FINAL), TaskRecord.finished_at < older_than)
        .execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)
    return result.rowcount


def require_record(session: Session, task_id: str) -> TaskRecord:
    record = load_record(session, task_id)
    if record is None:
        raise NotFound("task not found")
    return record
