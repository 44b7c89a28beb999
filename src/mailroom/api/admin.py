"""``/api/admin``: the tenant's queues, active work, health, and an emergency stop."""

from __future__ import annotations

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag

from mailroom.api.common import ERRORS, SECURITY
from mailroom.api.tasks import task_out
from mailroom.auth import require_admin
from mailroom.context import commit, db_session, state
from mailroom.health import health_report
from mailroom.schemas import ActiveTasksOut, CancelAllOut, HealthOut, StatsOut
from services import task_records
from services.errors import Conflict
from tasks.monitoring import get_active_tasks, get_queue_stats, revoke_task
from tasks.queues import QUEUES

tag = Tag(name="admin", description="For tenant admins; each sees only their own tenant")
bp = APIBlueprint("admin", __name__, url_prefix="/api/admin", abp_tags=[tag], abp_security=SECURITY)


@bp.get("/stats", responses={200: StatsOut, **ERRORS})
def stats() -> Response:
    """Depth of each queue (shared by all tenants), the tenant's tasks by state, and the
    tenant's mean task duration per type. ``tasks_by_state`` counts tasks in flight
    exactly, every success so far, and the failures and cancellations of the last hour;
    none of it reads the task history, so it stays fast as the history grows."""
    who = require_admin()
    try:
        depths: dict[str, int | None] = dict(get_queue_stats(state().celery))
    except Exception:  # noqa: BLE001 - stats stay useful while the broker is down
        depths = dict.fromkeys(QUEUES)
    session = db_session()
    return jsonify(
        {
            "queues": {
                name: {"depth": depths.get(name), "priority": spec.priority} for name, spec in QUEUES.items()
            },
            "tasks_by_state": task_records.counts_by_state(session, who.tenant_id),
            "average_duration_seconds": task_records.average_durations(session, who.tenant_id),
        }
    )


@bp.get("/active-tasks", responses={200: ActiveTasksOut, **ERRORS})
def active_tasks() -> Response:
    """The tenant's queued, running and retrying tasks, oldest first."""
    who = require_admin()
    return jsonify({"items": [task_out(r) for r in get_active_tasks(db_session(), who)]})


@bp.get("/health", responses={200: HealthOut, **ERRORS})
def health() -> Response:
    """Database, broker and result backend reachability, and live workers per queue."""
    require_admin()
    return jsonify(health_report(with_workers=True))


@bp.post("/cancel-all", responses={202: CancelAllOut, **ERRORS})
def cancel_all() -> tuple[Response, int]:
    """Cancel every in-flight task of the tenant."""
    who = require_admin()
    session = db_session()
    stopped: list[str] = []
    stopping = 0
    for record in get_active_tasks(session, who, limit=100_000):
        try:
            task_records.request_cancel(session, record)
        except Conflict:  # it finished meanwhile
            continue
        if record.state == "running":
            stopping += 1
        else:
            stopped.append(record.id)
    commit()
    celery = state().celery
    for task_id in stopped:
        try:
            revoke_task(celery, task_id)
        except Exception:  # noqa: BLE001 - the records already guarantee these never run
            break
    return jsonify({"cancelled": len(stopped), "stopping": stopping}), 202
