"""Outbox retention through the real hourly cleanup (the periodic worker): message bytes go
as soon as no attempt can need them, finished rows go after the retention, rows in flight
never; the outbox views say the same before and after."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from services.models import OutboxEntry, utcnow
from services.settings import SettingsError, load_settings
from tasks.celery_app import make_celery
from tests.test_send import send

pytestmark = pytest.mark.usefixtures("workers")


def run_cleanup(settings) -> dict[str, int]:  # type: ignore[no-untyped-def]
    app = make_celery(settings)
    result = app.send_task("mailroom.cleanup_stale_results", queue="periodic", routing_key="periodic")
    return result.get(timeout=60)  # type: ignore[no-any-return]


def row(sessions, outbox_id: str) -> OutboxEntry | None:
    with sessions() as session:
        found = session.get(OutboxEntry, outbox_id)
        if found is not None:
            session.expunge(found)
        return found


def existing(sessions, outbox_id: str) -> OutboxEntry:
    found = row(sessions, outbox_id)
    assert found is not None, outbox_id
    return found


def view(kit, account: dict[str, Any], outbox_id: str) -> dict[str, Any]:
    response = kit.admin.get(f"/api/accounts/{account['id']}/outbox/{outbox_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def age(sessions, outbox_ids: list[str], hours: float) -> None:
    with sessions.begin() as session:
        session.execute(
            update(OutboxEntry)
            .where(OutboxEntry.id.in_(outbox_ids))
            .values(created_at=utcnow() - timedelta(hours=hours))
        )


def test_retention_is_at_least_the_idempotency_promise() -> None:
    with pytest.raises(SettingsError, match="OUTBOX_RETENTION_HOURS"):
        load_settings(outbox_retention_hours=23)
    assert load_settings().outbox_retention_hours == 72


def test_cleanup_drops_bytes_when_final_and_rows_after_the_retention(
    kit, account, smtp, sessions, settings
) -> None:
    plain = {"to": ["a@example.test"], "text": "kept a while", "save_sent": False}
    key = {"Idempotency-Key": "retained-" + uuid.uuid4().hex}
    sent = send(kit, account, plain, headers=key).get_json()
    assert kit.admin.wait_task(sent["task_id"])["state"] == "succeeded"
    smtp.set_reject(554, "5.7.1 refused by policy", stage="data", times=1)
    try:
        refused = send(kit, account, plain).get_json()
        assert kit.admin.wait_task(refused["task_id"])["state"] == "failed"
    finally:
        smtp.clear_reject()
    smtp.set_reject(451, "4.3.0 still busy", stage="mail")
    try:
        busy = send(kit, account, plain).get_json()
        assert kit.admin.wait_task(busy["task_id"], timeout=60)["state"] == "failed"
    finally:
        smtp.clear_reject()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    cancelled = send(kit, account, {**plain, "send_at": later}).get_json()
    assert kit.admin.post(f"/api/tasks/{cancelled['task_id']}/cancel").status_code == 202
    waiting = send(kit, account, {**plain, "send_at": later}).get_json()
    ids = {
        name: item["outbox_id"]
        for name, item in {
            "sent": sent,
            "refused": refused,
            "busy": busy,
            "cancelled": cancelled,
            "waiting": waiting,
        }.items()
    }

    # The worker dropped the bytes of the rows it finished; the two whose task ended without
    # the worker writing the row still hold theirs, and show their task's end.
    assert existing(sessions, ids["sent"]).raw is None and existing(sessions, ids["refused"]).raw is None
    assert (
        existing(sessions, ids["busy"]).state == "queued" and existing(sessions, ids["busy"]).raw is not None
    )
    assert existing(sessions, ids["cancelled"]).raw is not None
    before = {name: view(kit, account, outbox_id) for name, outbox_id in ids.items()}
    assert [before[n]["state"] for n in ids] == ["sent", "failed", "failed", "cancelled", "scheduled"]

    summary = run_cleanup(settings)
    assert summary["outbox_settled"] >= 2, summary
    for name in ("busy", "cancelled"):
        settled = existing(sessions, ids[name])
        assert settled.raw is None and settled.state == before[name]["state"], name
    assert "451" in (existing(sessions, ids["busy"]).error or "")
    assert existing(sessions, ids["waiting"]).raw is not None  # in flight: untouched
    for name, outbox_id in ids.items():
        after = view(kit, account, outbox_id)
        assert {k: v for k, v in after.items() if k != "error"} == {
            k: v for k, v in before[name].items() if k != "error"
        }, name
    # Within the retention, the Idempotency-Key still answers with the first task.
    again = send(kit, account, plain, headers=key)
    assert again.status_code == 200 and again.get_json()["task_id"] == sent["task_id"]

    # Past the retention, finished rows go; the one still in flight stays whatever its age.
    age(sessions, list(ids.values()), hours=settings.outbox_retention_hours + 1)
    recent = send(kit, account, plain).get_json()
    assert kit.admin.wait_task(recent["task_id"])["state"] == "succeeded"
    age(sessions, [recent["outbox_id"]], hours=settings.outbox_retention_hours - 1)
    summary = run_cleanup(settings)
    assert summary["outbox_deleted"] >= 4, summary
    for name in ("sent", "refused", "busy", "cancelled"):
        assert row(sessions, ids[name]) is None, name
        response = kit.admin.get(f"/api/accounts/{account['id']}/outbox/{ids[name]}")
        assert response.status_code == 404
    assert row(sessions, ids["waiting"]) is not None
    assert row(sessions, recent["outbox_id"]) is not None
    # The key's row is gone: the same request now is a new message.
    fresh = send(kit, account, plain, headers=key)
    assert fresh.status_code == 202 and fresh.get_json()["task_id"] != sent["task_id"]
    assert kit.admin.wait_task(fresh.get_json()["task_id"])["state"] == "succeeded"
    kit.admin.post(f"/api/tasks/{waiting['task_id']}/cancel")
