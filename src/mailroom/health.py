"""Reachability checks shared by /readyz and /api/admin/health.

``/readyz`` is public: it names which check failed and nothing else (no host, port or
exception text); the details go to the log. ``/api/admin/health`` is for a tenant's admins:
it keeps the exception's message, with every password and URL credential blanked out.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from mailroom.context import state
from services.models import iso_utc
from services.settings import Settings
from tasks.beat import last_tick
from tasks.celery_app import BEAT_MAX_LOOP_SECONDS
from tasks.monitoring import ping_broker, ping_result_backend, workers_per_queue
from tasks.queues import QUEUES

log = logging.getLogger("mailroom.health")

#: What /readyz checks: everything a request needs to be served and its work queued.
READINESS_CHECKS = ("database", "broker", "result_backend")

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def redact(message: str, settings: Settings) -> str:
    """``message`` without URL credentials or any configured password."""
    message = _URL_CREDENTIALS.sub(r"\g<scheme>***@", message)
    secrets = [settings.broker_password, settings.result_backend_password, settings.secret_key]
    for url in (settings.database_url, settings.broker_url, settings.result_backend_url):
        match = re.match(r"[^:]+://[^:/@]*:(?P<pw>[^@]+)@", url)
        if match:
            secrets.append(match.group("pw"))
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message


def _check(name: str, fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
        detail = redact(f"{type(exc).__name__}: {exc}", state().settings)[:300]
        log.warning("health check %s failed: %s", name, detail)
        return {"ok": False, "error": detail}
    return {"ok": True, "error": None}


def _ping_database() -> None:
    with state().sessions() as session:
        session.execute(text("SELECT 1"))


def run_checks() -> dict[str, dict[str, Any]]:
    celery = state().celery
    return {
        "database": _check("database", _ping_database),
        "broker": _check("broker", lambda: ping_broker(celery)),
        "result_backend": _check("result_backend", lambda: ping_result_backend(celery)),
    }


def readiness() -> tuple[bool, dict[str, dict[str, bool]]]:
    """Whether every readiness check passed, and each check's outcome without details."""
    checks = run_checks()
    public = {name: {"ok": bool(checks[name]["ok"])} for name in READINESS_CHECKS}
    return all(c["ok"] for c in public.values()), public


def _beat_report(celery: Any, broker_ok: bool) -> dict[str, Any]:
    """The running Beat's last tick (it ticks at least every BEAT_MAX_LOOP_SECONDS); late by
    more than three loops, or never seen, is not ok."""
    tick = None
    if broker_ok:
        try:
            tick = last_tick(celery)
        except Exception:
            log.warning("reading Beat's heartbeat failed", exc_info=True)
    if tick is None:
        return {"ok": False, "last_tick_at": None, "seconds_ago": None}
    ago = max(0.0, time.time() - tick)
    return {
        "ok": ago <= 3 * BEAT_MAX_LOOP_SECONDS,
        "last_tick_at": iso_utc(datetime.fromtimestamp(tick, UTC)),
        "seconds_ago": round(ago, 1),
    }


def health_report(*, with_workers: bool) -> dict[str, Any]:
    """The admins' view: each check with its (redacted) error, and workers per queue."""
    celery = state().celery
    report: dict[str, Any] = dict(run_checks())
    ok = all(report[k]["ok"] for k in READINESS_CHECKS)
    if with_workers:
        workers = dict.fromkeys(QUEUES, 0)
        if report["broker"]["ok"]:
            try:
                workers = workers_per_queue(celery)
            except Exception:
                log.warning("counting workers failed", exc_info=True)
        report["workers"] = workers
        ok = ok and all(workers.values())
    report["beat"] = _beat_report(celery, report["broker"]["ok"])
    ok = ok and report["beat"]["ok"]
    report["status"] = "ok" if ok else "degraded"
    return report
