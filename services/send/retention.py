"""How long the outbox keeps what: the send half of the hourly cleanup.

Promises:

* A row's message bytes are dropped once no attempt can need them. The worker drops them in
  the transaction that makes the row ``sent``, ``failed`` or ``cancelled``;
  :func:`sweep_outbox` drops them for rows whose task ended without the worker writing the
  row (cancelled before it ran, out of retries after 4xx replies, given up after lost
  workers). Everything the outbox views show (subject, recipients, size, Message-ID,
  replies, the Sent copy's place) stays.
* Such a row gets the state the views derived from its task record (``cancelled`` or
  ``failed``, with the task's error) written onto it, so the views say the same after the
  task's record is forgotten. A row the worker left ``sending`` or ``accepted`` keeps that
  state: it says what is known (the server may have, or has, the message).
* A row is deleted once it is final (by its own state or its task's) and its request is
  older than ``retention``, which settings keep at 24 h or more: an ``Idempotency-Key``
  replays its request's task for as long as the row exists. A row in flight is never
  deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Select, delete, or_, select, update
from sqlalchemy.orm import Session

from services.models import OutboxEntry, OutboxState, TaskRecord, TaskState

FINAL_ROW = (OutboxState.SENT.value, OutboxState.FAILED.value, OutboxState.CANCELLED.value)
WAITING_ROW = (OutboxState.QUEUED.value, OutboxState.SCHEDULED.value)


@dataclass(frozen=True)
class OutboxSweep:
    #: Rows whose ended task was written onto them (bytes dropped).
    settled: int
    #: Other rows whose bytes were dropped (a final task, or left over in a final state).
    bytes_dropped: int
    #: Final rows older than the retention, deleted.
    deleted: int

    def as_dict(self) -> dict[str, int]:
        return {
            "outbox_settled": self.settled,
            "outbox_bytes_dropped": self.bytes_dropped,
            "outbox_deleted": self.deleted,
        }


def _tasks_in(*states: str) -> Select[Any]:
    return select(TaskRecord.id).where(TaskRecord.state.in_(states))


def _count(result: object) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def sweep_outbox(session: Session, *, now: datetime, retention: timedelta) -> OutboxSweep:
    """One pass over every tenant's outbox (``session`` must not be tenant-bound); see the
    module's promises. Bulk statements only: no row is loaded."""
    bulk = {"synchronize_session": False}
    settled = 0
    for task_state, row_state in (
        (TaskState.CANCELLED.value, OutboxState.CANCELLED.value),
        (TaskState.FAILED.value, OutboxState.FAILED.value),
    ):
        error = (
            select(TaskRecord.last_error).where(TaskRecord.id == OutboxEntry.task_id).scalar_subquery()
            if row_state == OutboxState.FAILED.value
            else OutboxEntry.error
        )
        settled += _count(
            session.execute(
                update(OutboxEntry)
                .where(OutboxEntry.state.in_(WAITING_ROW), OutboxEntry.task_id.in_(_tasks_in(task_state)))
                .values(state=row_state, raw=None, error=error)
                .execution_options(**bulk)
            )
        )
    ended = _tasks_in(*TaskState.final())
    dropped = _count(
        session.execute(
            update(OutboxEntry)
            .where(
                OutboxEntry.raw.is_not(None),
                or_(OutboxEntry.state.in_(FINAL_ROW), OutboxEntry.task_id.in_(ended)),
            )
            .values(raw=None)
            .execution_options(**bulk)
        )
    )
    deleted = _count(
        session.execute(
            delete(OutboxEntry)
            .where(
                OutboxEntry.created_at < now - retention,
                or_(OutboxEntry.state.in_(FINAL_ROW), OutboxEntry.task_id.in_(ended)),
            )
            .execution_options(**bulk)
        )
    )
    return OutboxSweep(settled=settled, bytes_dropped=dropped, deleted=deleted)
