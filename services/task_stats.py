"""Task statistics that stay cheap however long the task history grows.

Dispatch reads a duration estimate and counts a tenant's tasks in flight; the admin stats and
the metrics scrape read counts and mean durations. None of these reads the task history:

* durations are kept in ``task_durations`` (one row per account and task type), updated by
  :func:`record_success` when a task succeeds, and read by primary key or by tenant;
* tasks in flight are counted through the partial index ``ix_tasks_in_flight``, which holds
  only queued, running and retrying rows, and the cap's count stops at ``cap + 1`` rows;
* failures and cancellations are counted over the last :data:`RECENT` only, through the
  partial index ``ix_tasks_ended_badly`` (they are the rare outcome, so that range is small);
  successes, the common outcome, come from the running totals in ``task_durations``.

Statements here are Core statements on the tables, each filtered by tenant explicitly (or,
for the scrape, deliberately across tenants), so they behave the same in any session.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Float,
    Integer,
    Select,
    Table,
    bindparam,
    case,
    cast,
    func,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.models import Account, TaskDuration, TaskRecord, TaskState, utcnow
from services.tenancy import Principal, visible_account

#: How many recent runs the running mean behaves like (its weight is 1/min(runs, WINDOW)).
WINDOW = 20
#: How far back failed and cancelled tasks are counted.
RECENT = timedelta(hours=1)

# The predicates exactly as the partial indexes spell them, as SQL literals rather than bound
# parameters: PostgreSQL can only use a partial index when it can prove the query's predicate
# implies the index's, which it cannot do for a parameter once psycopg prepares the statement.
IN_FLIGHT_SQL = "state IN ('queued', 'running', 'retrying')"
ENDED_BADLY_SQL = "state IN ('failed', 'cancelled')"

tasks = typing.cast(Table, TaskRecord.__table__)
durations = typing.cast(Table, TaskDuration.__table__)
accounts = typing.cast(Table, Account.__table__)


#: What record_success folds in of a finished run.
FINISHED_RUN_COLUMNS = (
    tasks.c.tenant_id,
    tasks.c.account_id,
    tasks.c.type,
    tasks.c.queue,
    tasks.c.started_at,
    tasks.c.finished_at,
)
_FINISHED_RUN = select(*FINISHED_RUN_COLUMNS).where(
    tasks.c.id == bindparam("task_id"), tasks.c.state == TaskState.SUCCEEDED.value
)


def _fold_in(dialect: Any) -> Any:
    """The upsert that folds one run of ``:seconds`` into an account's row (built once per
    dialect; every succeeded task runs it)."""
    seconds = bindparam("seconds", type_=Float)
    now = bindparam("now", type_=durations.c.updated_at.type)
    statement = dialect.insert(durations).values(
        account_id=bindparam("v_account_id"),
        type=bindparam("v_type"),
        tenant_id=bindparam("v_tenant_id"),
        queue=bindparam("v_queue"),
        runs=1,
        total_seconds=seconds,
        recent_seconds=seconds,
        updated_at=now,
    )
    weight = case((durations.c.runs + 1 < WINDOW, durations.c.runs + 1), else_=WINDOW)
    return statement.on_conflict_do_update(
        index_elements=[durations.c.account_id, durations.c.type],
        set_={
            "runs": durations.c.runs + 1,
            "total_seconds": durations.c.total_seconds + seconds,
            "recent_seconds": durations.c.recent_seconds
            + (seconds - durations.c.recent_seconds) / cast(weight, Float),
            "updated_at": now,
        },
    )


_FOLD_IN = {"postgresql": _fold_in(postgresql), "sqlite": _fold_in(sqlite)}


def record_success(session: Session, task_id: str, run: Any = None) -> None:
    """Fold the run time of the succeeded task ``task_id`` into its account's statistics
    (one upsert; a task with no account, or not succeeded, changes nothing). ``run``: its
    FINISHED_RUN_COLUMNS when the caller has them (task_records.mark_succeeded returns
    them), else they are read."""
    row = run if run is not None else session.execute(_FINISHED_RUN, {"task_id": task_id}).first()
    if row is None or row.account_id is None or row.started_at is None or row.finished_at is None:
        return
    seconds = max(0.0, (row.finished_at - row.started_at).total_seconds())
    session.execute(
        _FOLD_IN[session.get_bind().dialect.name],
        {
            "v_account_id": row.account_id,
            "v_type": row.type,
            "v_tenant_id": row.tenant_id,
            "v_queue": row.queue,
            "seconds": seconds,
            "now": utcnow(),
        },
    )


def estimate(session: Session, account_id: str | None, type: str) -> float | None:
    """Seconds the next ``type`` task of this account will likely run (one primary-key read);
    None before its first success."""
    if account_id is None:
        return None
    value = session.scalar(
        select(durations.c.recent_seconds).where(
            durations.c.account_id == account_id, durations.c.type == type
        )
    )
    return round(value, 3) if value is not None else None


@dataclass(frozen=True)
class Preflight:
    """What dispatch needs to know before it writes, read in one round trip."""

    #: Whether the caller may see the account (True when not asked).
    visible: bool
    #: The tenant's tasks in flight on the queue, counted up to the cap (0 when not asked).
    in_flight: int
    #: :func:`estimate` for the task about to be queued.
    estimate: float | None


def _estimate_subquery() -> Any:
    """The running mean of this account's tasks of this type (NULL when none succeeded)."""
    return (
        select(durations.c.recent_seconds)
        .where(durations.c.account_id == bindparam("account_id"), durations.c.type == bindparam("type"))
        .scalar_subquery()
    )


def _in_flight_count() -> Any:
    """The tenant's tasks in flight on the queue, counted up to ``cap`` only (the partial
    index is read no further than the cap)."""
    bounded = (
        select(literal_column("1"))
        .select_from(tasks)
        .where(
            tasks.c.tenant_id == bindparam("tenant_id"),
            tasks.c.queue == bindparam("queue"),
            text(IN_FLIGHT_SQL),
        )
        .limit(bindparam("cap", type_=Integer))
        .subquery()
    )
    return select(func.count()).select_from(bounded).scalar_subquery()


def _preflight_statement(capped: bool, checked: bool) -> Select[Any]:
    """The preflight SELECT, built once per shape: building and cache-keying it on every
    dispatch cost more CPU than running it."""
    columns: list[Any] = [_estimate_subquery().label("estimate")]
    if capped:
        columns.append(_in_flight_count().label("in_flight"))
    if checked:
        columns.append(visible_account().scalar_subquery().label("visible"))
    return select(*columns)


_PREFLIGHT = {
    (capped, checked): _preflight_statement(capped, checked)
    for capped in (True, False)
    for checked in (True, False)
}


def _checked_insert_statement(capped: bool, checked: bool) -> Any:
    """INSERT … SELECT of one queued record that happens only when the account check and
    the cap allow it, with the estimate read in the same statement; RETURNING tells
    whether it happened and what the estimate was. Built once per shape."""
    estimate = func.coalesce(_estimate_subquery(), bindparam("default_estimate", type_=Float))
    names = [column.key for column in tasks.columns if column.key != "estimated_duration"]
    row = [bindparam(name, type_=tasks.c[name].type).label(name) for name in names]
    row.append(estimate.label("estimated_duration"))
    conditions: list[Any] = []
    if capped:
        conditions.append(_in_flight_count() < bindparam("cap", type_=Integer))
    if checked:
        conditions.append(visible_account().exists())
    chosen = select(*row).where(*conditions) if conditions else select(*row)
    return (
        tasks.insert()
        .from_select([*names, "estimated_duration"], chosen, include_defaults=False)
        .returning(tasks.c.estimated_duration)
    )


_CHECKED_INSERT = {
    (capped, checked): _checked_insert_statement(capped, checked)
    for capped in (True, False)
    for checked in (True, False)
}


def insert_if_allowed(
    session: Session,
    values: dict[str, Any],
    *,
    cap: int | None,
    visible_to: Principal | None,
    default_estimate: float | None,
) -> tuple[bool, float | None]:
    """Insert the queued record ``values`` (every column but ``estimated_duration``) only
    if ``visible_to`` may see its account and its tenant has fewer than ``cap`` tasks in
    flight on its queue, reading the estimate, all in one statement. Returns (inserted,
    estimate); when nothing was inserted, :func:`preflight` says why."""
    checked = visible_to is not None and values["account_id"] is not None
    row = session.execute(
        _CHECKED_INSERT[(cap is not None, checked)],
        {
            **values,
            "cap": cap or 0,
            "is_admin": bool(visible_to and visible_to.is_admin),
            "viewer_id": visible_to.user_id if visible_to else None,
            "default_estimate": default_estimate,
        },
    ).first()
    if row is None:
        return False, None
    return True, row[0]


def preflight(
    session: Session,
    *,
    tenant_id: str,
    queue: str,
    account_id: str | None,
    type: str,
    cap: int | None,
    visible_to: Principal | None = None,
) -> Preflight:
    """One SELECT of scalar subqueries, each an index lookup: whether ``visible_to`` may see
    the account (when given), the tenant's in-flight count on ``queue`` up to ``cap`` (when
    given), and the duration estimate."""
    checked = visible_to is not None and account_id is not None
    row = (
        session.execute(
            _PREFLIGHT[(cap is not None, checked)],
            {
                "account_id": account_id,
                "type": type,
                "tenant_id": tenant_id,
                "queue": queue,
                "cap": cap or 0,
                "is_admin": bool(visible_to and visible_to.is_admin),
                "viewer_id": visible_to.user_id if visible_to else None,
            },
        )
        .one()
        ._mapping
    )
    estimate_value = row["estimate"]
    return Preflight(
        visible=not checked or row["visible"] is not None,
        in_flight=int(row.get("in_flight") or 0),
        estimate=round(estimate_value, 3) if estimate_value is not None else None,
    )


def average_durations(session: Session, tenant_id: str) -> dict[str, float]:
    """Mean run time (s) of the tenant's successful tasks per type, over every success
    counted (a few rows per account, never the task history)."""
    rows = session.execute(
        select(durations.c.type, func.sum(durations.c.total_seconds), func.sum(durations.c.runs))
        .where(durations.c.tenant_id == tenant_id)
        .group_by(durations.c.type)
    ).all()
    return {type_: round(float(total) / int(runs), 3) for type_, total, runs in rows if runs}


def in_flight(session: Session, tenant_id: str, queue: str, *, up_to: int) -> int:
    """The tenant's queued, running and retrying tasks on ``queue``, counted up to ``up_to``
    (at most ``up_to`` entries of the partial index are read)."""
    bounded = (
        select(literal(1))
        .select_from(tasks)
        .where(tasks.c.tenant_id == tenant_id, tasks.c.queue == queue, text(IN_FLIGHT_SQL))
        .limit(up_to)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(bounded)) or 0)


def counts_by_state(session: Session, tenant_id: str, *, now: datetime | None = None) -> dict[str, int]:
    """The tenant's tasks per state: in flight exactly; ``succeeded`` every success counted;
    ``failed`` and ``cancelled`` those that ended in the last :data:`RECENT`."""
    counts = {s.value: 0 for s in TaskState}
    in_flight_rows = session.execute(
        select(tasks.c.state, func.count())
        .where(tasks.c.tenant_id == tenant_id, text(IN_FLIGHT_SQL))
        .group_by(tasks.c.state)
    ).all()
    counts.update({state: n for state, n in in_flight_rows})
    since = (now or utcnow()) - RECENT
    ended_rows = session.execute(
        select(tasks.c.state, func.count())
        .where(tasks.c.finished_at >= since, tasks.c.tenant_id == tenant_id, text(ENDED_BADLY_SQL))
        .group_by(tasks.c.state)
    ).all()
    counts.update({state: n for state, n in ended_rows})
    counts[TaskState.SUCCEEDED.value] = int(
        session.scalar(select(func.sum(durations.c.runs)).where(durations.c.tenant_id == tenant_id)) or 0
    )
    return counts


def scrape_counts(
    session: Session, *, now: datetime | None = None
) -> tuple[list[tuple[str, str, int]], dict[str, int], list[tuple[str, str, int]]]:
    """For the metrics scrape, across all tenants: tasks in flight per (queue, state),
    successes counted per queue, and failures/cancellations in the last :data:`RECENT` per
    (queue, state)."""
    in_flight_rows = session.execute(
        select(tasks.c.queue, tasks.c.state, func.count())
        .where(text(IN_FLIGHT_SQL))
        .group_by(tasks.c.queue, tasks.c.state)
    ).all()
    succeeded = session.execute(
        select(durations.c.queue, func.sum(durations.c.runs)).group_by(durations.c.queue)
    )
    since = (now or utcnow()) - RECENT
    ended_rows = session.execute(
        select(tasks.c.queue, tasks.c.state, func.count())
        .where(tasks.c.finished_at >= since, text(ENDED_BADLY_SQL))
        .group_by(tasks.c.queue, tasks.c.state)
    ).all()
    return (
        [(q, s, int(n)) for q, s, n in in_flight_rows],
        {q: int(n or 0) for q, n in succeeded},
        [(q, s, int(n)) for q, s, n in ended_rows],
    )
