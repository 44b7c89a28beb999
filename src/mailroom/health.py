"""Reachability checks shared by /readyz and /api/admin/health."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from mailroom.context import state
from tasks.monitoring import ping_broker, ping_result_backend, workers_per_queue
from tasks.queues import QUEUES


def _check(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ok": True, "error": None}


def check_database() -> dict[str, Any]:
    def ping() -> None:
        with state().sessions() as session:
            session.execute(text("SELECT 1"))

    return _check(ping)


def health_report(*, with_workers: bool) -> dict[str, Any]:
    celery = state().celery
    report: dict[str, Any] = {
        "database": check_database(),
        "broker": _check(lambda: ping_broker(celery)),
        "result_backend": _check(lambda: ping_result_backend(celery)),
    }
    ok = all(report[k]["ok"] for k in ("database", "broker", "result_backend"))
    if with_workers:
        workers = dict.fromkeys(QUEUES, 0)
        if report["broker"]["ok"]:
            try:
                workers = workers_per_queue(celery)
            except Exception:  # noqa: BLE001
                pass
        report["workers"] = workers
        ok = ok and all(workers.values())
    report["status"] = "ok" if ok else "degraded"
    return report
