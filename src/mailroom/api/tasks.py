"""``/api/tasks``: what happened to a task, the caller's history, cancellation."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag

from mailroom.api.common import ERRORS, SECURITY, page_info
from mailroom.auth import principal
from mailroom.context import commit, db_session, state
from mailroom.schemas import TaskOut, TaskPage, TaskPath, TaskQuery
from services import task_records
from services.models import TaskRecord
from services.task_records import TaskFilter
from tasks.monitoring import revoke_task

tag = Tag(name="tasks", description="Progress, results and cancellation of queued work")
bp = APIBlueprint("tasks", __name__, url_prefix="/api/tasks", abp_tags=[tag], abp_security=SECURITY)


def task_out(record: TaskRecord) -> dict[str, Any]:
    duration = None
    if record.started_at and record.finished_at:
        duration = round((record.finished_at - record.started_at).total_seconds(), 3)
    error = None
    if record.error_code or record.last_error:
        error = {"code": record.error_code, "message": record.last_error, "reference": record.error_ref}
    return TaskOut(
        id=record.id,
        type=record.type,
        queue=record.queue,
        state=record.state,  # type: ignore[arg-type]
        progress=record.progress,
        stage=record.stage,
        account_id=record.account_id,
        origin=record.origin,
        params=record.params or {},
        attempts=record.attempts,
        max_retries=record.max_retries,
        cancel_requested=record.cancel_requested,
        result=record.result,
        error=error,  # type: ignore[arg-type]
        estimated_duration=record.estimated_duration,
        next_retry_at=record.next_retry_at,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        duration=duration,
    ).model_dump(mode="json")


@bp.get("/<task_id>", responses={200: TaskOut, **ERRORS})
def get_task(path: TaskPath) -> Response:
    """State, progress 0–100, stage text, result or error, and timings of one task."""
    return jsonify(task_out(task_records.get_record(db_session(), path.task_id, principal())))


@bp.get("", responses={200: TaskPage, **ERRORS})
def list_tasks(query: TaskQuery) -> Response:
    """The caller's tasks (an admin's: the tenant's), newest first, filtered and paginated."""
    rows, total = task_records.list_records(
        db_session(),
        principal(),
        TaskFilter(state=query.state, type=query.type, account_id=query.account_id),
        limit=query.limit,
        offset=query.offset,
    )
    return jsonify({"items": [task_out(r) for r in rows], **page_info(total, query.limit, query.offset)})


@bp.post("/<task_id>/cancel", responses={202: TaskOut, 409: ERRORS[409], **ERRORS})
def cancel_task(path: TaskPath) -> tuple[Response, int]:
    """A task that has not started is ``cancelled`` at once and never runs; a running one
    is asked to stop and ends ``cancelled`` at its next step. A finished task is a 409."""
    session = db_session()
    record = task_records.get_record(session, path.task_id, principal())
    task_records.request_cancel(session, record)
    commit()
    try:
        revoke_task(state().celery, record.id)
    except Exception:  # noqa: BLE001 - the record already guarantees the task will not run
        pass
    return jsonify(task_out(record)), 202
