"""The life of one task attempt, the same for every task type.

``@mailroom_task(name)`` turns ``body(ctx) -> result`` into a Celery task that: skips a
record that is missing, finished or cancelled (so redelivery and cancellation of queued work
are harmless); marks it running; re-checks that the tenant and user still own the account;
runs the body, which reports progress and hits cancellation checkpoints through ``ctx``; and
ends the record ``succeeded``, ``cancelled``, ``retrying`` (transient fault, with
exponential backoff) or ``failed`` (permanent fault, or retries spent).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from celery import Task, current_app, shared_task, signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from services import accounts, task_records, task_stats, webhooks
from services.accounts import check_ownership
from services.db import bound_tenant, make_engine, make_sessionmaker, tenant_sessions, transaction
from services.errors import (
    MailroomError,
    NotFound,
    TaskCancelled,
    ValidationFailed,
    is_database_fault,
    is_transient,
)
from services.logs import log_context
from services.models import Account, TaskState
from services.retry import backoff_delay
from services.settings import Settings
from tasks import metrics, webhook_tasks
from tasks.runtime import Runtime, get_runtime

log = logging.getLogger("mailroom.tasks")

P = TypeVar("P", bound=BaseModel)

#: How often at most a worker writes progress to the database.
PROGRESS_INTERVAL = 0.5


@dataclass
class TaskContext:
    """What a task body gets: ids, validated params, sessions, progress and cancellation."""

    task_id: str
    tenant_id: str
    user_id: str | None
    account_id: str | None
    params: Any
    runtime: Runtime
    attempt: int
    _last_write: float = field(default=0.0)
    _last_progress: int = field(default=-1)
    #: Set by :meth:`succeed`: the webhook events of the success the body committed itself.
    _succeeded: list[str] | None = field(default=None)
    #: What the task's ``begin`` step (see :func:`mailroom_task`) left for the body.
    started: Any = None

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction, committed when the block ends."""
        with transaction(self.runtime.sessions) as session:
            yield session

    def load_account(self, session: Session) -> Account:
        return check_ownership(session, self.account_id, self.tenant_id, self.user_id)

    def progress(self, percent: float, stage: str, *, force: bool = False) -> None:
        """Report progress (0–100) and a stage text; raises :class:`TaskCancelled` if the
        client cancelled meanwhile. Writes are throttled unless ``force``."""
        pct = int(percent)
        now = time.monotonic()
        # An unchanged percentage is written at most every PROGRESS_INTERVAL, a changed one
        # at most five times as often: smooth for a poller, cheap for the database.
        if not force and pct == self._last_progress and now - self._last_write < PROGRESS_INTERVAL:
            return
        if not force and now - self._last_write < PROGRESS_INTERVAL / 5:
            return
        self._last_write, self._last_progress = now, pct
        with self.session() as session:
            cancelled = task_records.report_progress(session, self.task_id, pct, stage)
        if cancelled:
            raise TaskCancelled()

    def succeed(self, session: Session, result: dict[str, Any]) -> None:
        """End the record ``succeeded`` with ``result`` in the body's own last transaction
        (``session``), instead of in one more transaction after the body returns: what the
        body wrote last and the record's success then commit together. The body must
        return ``result`` right after that transaction commits; if it raises instead, the
        rollback took the success back with it."""
        finished = task_records.mark_succeeded(session, self.task_id, result)
        # Webhook events, committed with the state they report and published after it.
        self._succeeded = webhooks.record_task_events(session, self.tenant_id, self.task_id)
        # The running duration statistics dispatch estimates from (O(1) to read there); last,
        # since every task of the account and type updates that one row.
        if finished is not None:
            task_stats.record_success(session, self.task_id, finished)

    def check_cancelled(self) -> None:
        """A cancellation checkpoint between steps (also stops an attempt whose record was
        given up as lost meanwhile)."""
        with self.session() as session:
            if task_records.must_stop(session, self.task_id):
                raise TaskCancelled()


Body = Callable[[TaskContext], dict[str, Any]]
#: A task's first step, run in the transaction that marks its record running.
Begin = Callable[[Session, TaskContext], None]


def mailroom_task(
    name: str, params_model: type[BaseModel], *, max_retries: int, begin: Begin | None = None
) -> Callable[[Body], Task]:
    """Register ``body`` as the Celery task ``name`` with Mailroom's task life around it.

    ``begin(session, ctx)``, if given, runs inside the transaction that marks the record
    running, once the parameters are valid and the ownership check passed, so that the
    body's first step costs no transaction of its own; it leaves what the body needs in
    ``ctx.started``. A :class:`MailroomError` it raises ends the attempt as one the body
    raised would; it must raise before it writes anything (that transaction commits)."""

    def decorate(body: Body) -> Task:
        @shared_task(name=name, bind=True, max_retries=max_retries)
        def run(
            self: Task,
            tenant_id: str,
            user_id: str | None = None,
            account_id: str | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            with log_context(task_id=self.request.id, tenant_id=tenant_id):
                return run_attempt(
                    self, body, params_model, tenant_id, user_id, account_id, params or {}, begin
                )

        run.__doc__ = body.__doc__
        return run

    return decorate


def _on_hard_time_limit(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    kwargs: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """A task past its hard time limit is killed with its pool process (nothing in the
    attempt runs any more); the worker's main process then reports the failure, and here
    the record ends ``failed`` (``time_limit``) instead of staying ``running`` until the
    stale-record sweep. A fresh engine, disposed at once: the main process forks pool
    processes later, and they must not inherit its connections."""
    if not isinstance(exception, TimeLimitExceeded) or not task_id or sender is None:
        return
    tenant_id = (kwargs or {}).get("tenant_id")
    if not isinstance(tenant_id, str):
        return  # not a task with a record (Beat's periodic work)
    engine = make_engine(sender.app.conf.mailroom_settings)
    try:
        with transaction(tenant_sessions(make_sessionmaker(engine), tenant_id)) as session:
            _end_failed(
                session,
                sender.app,
                tenant_id,
                task_id,
                "the task ran past its hard time limit and was stopped",
                "time_limit",
                logged=("task %s: stopped at its hard time limit", task_id),
            )
    except Exception:
        log.exception("task %s: could not record its hard time limit", task_id)
    finally:
        engine.dispose()


signals.task_failure.connect(_on_hard_time_limit, weak=False, dispatch_uid="mailroom-hard-time-limit")


def run_attempt(
    task: Task,
    body: Body,
    params_model: type[BaseModel],
    tenant_id: str,
    user_id: str | None,
    account_id: str | None,
    raw_params: dict[str, Any],
    begin: Begin | None = None,
) -> dict[str, Any]:
    """One attempt. The database unreachable where the attempt cannot even write its record
    (at its start, or while recording a fault) is retried like any transient fault, from
    the message alone: the record keeps its last state (``running`` counts as a lost
    attempt on the next delivery, so the retry budget still holds), and nothing the
    attempt wrote is half done, since every write is one transaction."""
    try:
        return _attempt(task, body, params_model, tenant_id, user_id, account_id, raw_params, begin)
    except Exception as exc:
        if not is_database_fault(exc):
            raise
        retries = task.request.retries
        if retries >= (task.max_retries or 0):
            log.error("task %s: the database is unreachable and retries are spent: %s", task.request.id, exc)
            raise
        runtime = get_runtime(task.app)
        delay = backoff_delay(
            retries, base=runtime.settings.retry_base_seconds, cap=runtime.settings.retry_max_seconds
        )
        log.warning(
            "task %s: the database is unreachable, retry %d in %.1fs: %s",
            task.request.id,
            retries + 1,
            delay,
            exc,
        )
        raise task.retry(countdown=delay, exc=exc) from exc


def _attempt(
    task: Task,
    body: Body,
    params_model: type[BaseModel],
    tenant_id: str,
    user_id: str | None,
    account_id: str | None,
    raw_params: dict[str, Any],
    begin: Begin | None,
) -> dict[str, Any]:
    # Every session of this attempt (the task body's and the services' it calls) sees only
    # the task's tenant: a message naming another tenant's record finds no record.
    shared = get_runtime(task.app)
    runtime = replace(shared, sessions=tenant_sessions(shared.sessions, tenant_id))
    task_id = task.request.id
    with transaction(runtime.sessions) as session:
        record = task_records.load_for_attempt(session, task_id)
        if record is None:
            log.warning("task %s has no record; dropping it", task_id)
            return {"skipped": "no record"}
        if record.state == TaskState.RUNNING.value:
            # A record still ``running`` when its message arrives means the attempt that
            # took the message never finished: its worker was lost (killed, out of memory,
            # pod gone) and the broker handed the message out again. A message that kills
            # every worker it reaches must not come back forever: after as many lost
            # attempts as a transient fault may take, the task fails.
            if record.cancel_requested:
                task_records.mark_cancelled(session, task_id)
                return {"cancelled": True}
            if record.attempts >= record.max_retries + 1:
                _end_failed(
                    session,
                    task.app,
                    tenant_id,
                    task_id,
                    f"the worker running this task was lost {record.attempts} times (killed or out "
                    "of memory); giving up",
                    "worker_lost",
                    logged=("task %s: worker lost %d times, failing it", task_id, record.attempts),
                )
                return {"failed": "worker_lost"}
            log.warning(
                "task %s: redelivered after its worker was lost (attempt %d)", task_id, record.attempts
            )
        if not task_records.mark_running(session, task_id, task.request.hostname):
            # Finished or cancelled before this delivery: nothing to do, and doing it again
            # would not be idempotent for the client.
            return {"skipped": f"task is {record.state}"}
        attempt = record.attempts + 1
        ready_at = metrics.ready_time(record.created_at, record.next_retry_at, task.request.eta, attempt)
        observed = metrics.AttemptMetrics(record.type, record.queue, ready_at)
        # The message must match its record, and the tenant and user must still own the
        # account: checked in this same transaction (one round trip less per attempt), and
        # raised in _run_body, which fails the task for it.
        refused: MailroomError | None = None
        if record.account_id is None and account_id is not None and record.tenant_id == tenant_id:
            # Deleting an account sets its tasks' account_id to null: a task still queued
            # (or waiting to retry) then finds its account gone, which is not a bad message.
            refused = NotFound("the account was deleted while the task waited to run")
        elif record.tenant_id != tenant_id or record.user_id != user_id or record.account_id != account_id:
            refused = ValidationFailed("task message does not match its record")
        elif account_id is not None:
            refused = accounts.owner_refusal(
                record.account_tenant,
                record.account_user,
                record.user_tenant,
                record.user_role,
                tenant_id=tenant_id,
                user_id=user_id,
            )
        ctx = TaskContext(task_id, tenant_id, user_id, account_id, None, runtime, attempt)
        if refused is None:
            try:
                ctx.params = _valid_params(params_model, raw_params)
                if begin is not None:
                    begin(session, ctx)
            except MailroomError as exc:
                refused = exc

    with log_context(queue=observed.queue, task_type=observed.task_type, attempt=attempt):
        try:
            result = _run_body(task, body, ctx, observed, refused)
        finally:
            observed.end("failed")  # only when nothing above ended it (e.g. a hard time limit)
    return result


def _valid_params(params_model: type[BaseModel], raw_params: dict[str, Any]) -> Any:
    try:
        return params_model.model_validate(raw_params)
    except ValidationError as exc:
        raise ValidationFailed(
            "invalid task parameters",
            details=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()],
        ) from None


def _run_body(
    task: Task,
    body: Body,
    ctx: TaskContext,
    observed: metrics.AttemptMetrics,
    refused: MailroomError | None,
) -> dict[str, Any]:
    """Run the body, or fail the attempt for ``refused`` (what the attempt's start found
    wrong: the message, the ownership, the parameters or the ``begin`` step)."""
    runtime, task_id = ctx.runtime, ctx.task_id
    tenant_id, account_id = ctx.tenant_id, ctx.account_id
    try:
        if refused is not None:
            raise refused
        result = body(ctx)
    except TaskCancelled:
        if account_id is not None and _account_gone(runtime, account_id):
            # The checkpoint stopped the attempt because the account was deleted.
            _fail(runtime, task_id, "the account was deleted while the task ran", "not_found", app=task.app)
            observed.end("skipped")
            return {"skipped": "account deleted"}
        with ctx.session() as session:
            task_records.mark_cancelled(session, task_id, "cancelled while running")
        log.info("task %s cancelled", task_id)
        observed.end("cancelled")
        return {"cancelled": True}
    except SoftTimeLimitExceeded:
        _fail(runtime, task_id, "the task ran past its time limit", "time_limit", app=task.app)
        observed.end("failed")
        raise
    except Exception as exc:
        deleted = account_id is not None and _account_gone(runtime, account_id)
        if deleted and not isinstance(exc, MailroomError):
            # The account was deleted while the task worked on it; whatever broke (a row
            # it wrote to vanished) is a consequence, not a fault worth an internal error.
            _fail(runtime, task_id, "the account was deleted while the task ran", "not_found", app=task.app)
            observed.end("skipped")
            return {"skipped": "account deleted"}
        retrying = _handle_error(task, runtime, task_id, exc)
        observed.end("retried" if retrying else "failed", error=exc)
        if retrying is not None:
            raise retrying from exc
        raise
    events = ctx._succeeded
    if events is None:
        with ctx.session() as session:
            ctx.succeed(session, result)
        events = ctx._succeeded or []
    webhook_tasks.publish(task.app, tenant_id, events)
    observed.end("succeeded", result)
    return result


def _account_gone(runtime: Runtime, account_id: str) -> bool:
    with transaction(runtime.sessions) as session:
        return session.get(Account, account_id) is None


def _fail(
    runtime: Runtime, task_id: str, message: str, code: str, ref: str | None = None, *, app: Any = None
) -> None:
    with transaction(runtime.sessions) as session:
        _end_failed(session, app or current_app, bound_tenant(session), task_id, message, code, ref=ref)


def _end_failed(
    session: Session,
    app: Any,
    tenant_id: str | None,
    task_id: str,
    message: str,
    code: str,
    *,
    ref: str | None = None,
    logged: tuple[Any, ...] = (),
) -> None:
    """End the record ``failed`` in ``session``'s transaction, with the task's webhook events
    (none when ``tenant_id`` is None), and commit it (the caller's ``transaction`` block,
    if any, then has nothing left to commit); then log ``logged`` (``log.error``'s
    arguments), only once the failure is committed, and publish the events."""
    task_records.mark_failed(session, task_id, message, code, ref=ref)
    events = webhooks.record_task_events(session, tenant_id, task_id) if tenant_id is not None else []
    session.commit()
    if logged:
        log.error(*logged)
    if events and tenant_id is not None:
        webhook_tasks.publish(app, tenant_id, events)


def _client_error(exc: Exception) -> tuple[str, str, str | None]:
    """What a client may see of ``exc``: a code, a plain message and, for faults of our own
    (whose text may hold SQL, parameters or paths), a reference to the log lines instead of
    the details."""
    if isinstance(exc, MailroomError):
        return exc.code, exc.message, None
    ref = uuid.uuid4().hex[:12]
    if is_transient(exc):
        return "network_error", f"a network fault interrupted the task (reference {ref})", ref
    return "internal_error", f"internal error while running the task (reference {ref})", ref


def _handle_error(task: Task, runtime: Runtime, task_id: str, exc: Exception) -> Exception | None:
    """Retry a transient fault with backoff while retries remain (returns the ``Retry`` to
    raise); fail anything else (returns None)."""
    code, message, ref = _client_error(exc)
    if ref is not None:
        log.error("task %s: %s (reference %s)", task_id, code, ref, exc_info=exc)
    retries = task.request.retries
    if is_transient(exc) and retries < (task.max_retries or 0):
        delay = backoff_delay(
            retries, base=runtime.settings.retry_base_seconds, cap=runtime.settings.retry_max_seconds
        )
        with transaction(runtime.sessions) as session:
            task_records.mark_retrying(session, task_id, message, code, delay, ref=ref)
        log.info("task %s: transient error, retry %d in %.1fs: %s", task_id, retries + 1, delay, message)
        return task.retry(countdown=delay, exc=exc, throw=False)
    if is_transient(exc):
        message = f"gave up after {retries + 1} attempts: {message}"
    _fail(runtime, task_id, message, code, ref, app=task.app)
    return None
