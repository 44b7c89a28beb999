"""Sync as a client sees it: through the REST API, on the real sync worker, against Dovecot.
Also the hard cases of a task's life that need a long task: cancelling a running one,
and a worker SIGKILLed in the middle of one."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from services.models import Message, TaskRecord
from services.settings import load_settings
from tests.conftest import env_for, worker_env
from tests.servers.mailgen import message
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api

pytestmark = pytest.mark.usefixtures("workers")


def seed(
    dovecot, user: tuple[str, str], folder: str, count: int, *, size: int = 1500, start: int = 0
) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    messages = [
        message(
            f"Message {start + i}",
            f"Hello number {start + i}",
            sender=f"Sender {i % 7} <s{i % 7}@example.test>",
            to="owner@example.test",
            date=base + timedelta(minutes=start + i),
            size_hint=size,
        )
        for i in range(count)
    ]
    dovecot.append_messages(*user, folder, messages)


def stored(sessions, account_id: str) -> int:
    with sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(Message).where(Message.account_id == account_id))
            or 0
        )


def test_sync_then_read_folders_messages_and_a_body(kit, account, dovecot, mailbox_user) -> None:
    seed(dovecot, mailbox_user, "INBOX", 120)
    seed(dovecot, mailbox_user, "Sent", 5)
    response = kit.admin.post(f"/api/accounts/{account['id']}/sync")
    assert response.status_code == 202
    task = kit.admin.wait_task(response.get_json()["task_id"])
    assert task["state"] == "succeeded", task
    assert task["progress"] == 100

    folders = {
        f["name"]: f for f in kit.admin.get(f"/api/accounts/{account['id']}/folders").get_json()["items"]
    }
    assert folders["INBOX"]["special_use"] == "inbox" and folders["INBOX"]["message_count"] == 120
    assert folders["Sent"]["special_use"] == "sent" and folders["Sent"]["message_count"] == 5
    assert {"Drafts", "Trash", "Junk"} <= set(folders)

    seen: list[str] = []
    cursor = None
    while True:
        query = "folder=INBOX&limit=50" + (f"&cursor={cursor}" if cursor else "")
        page = kit.admin.get(f"/api/accounts/{account['id']}/messages?{query}").get_json()
        seen += [m["subject"] for m in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [f"Message {i}" for i in range(119, -1, -1)]  # newest first, each once

    first = kit.admin.get(f"/api/accounts/{account['id']}/messages?limit=1&folder=INBOX").get_json()["items"][
        0
    ]
    detail = kit.admin.get(f"/api/messages/{first['id']}?body=1").get_json()
    assert detail["subject"] == "Message 119" and "Hello number 119" in detail["body"]["text"]
    assert detail["from"] == "Sender 0 <s0@example.test>" or "s" in detail["from"]

    # the account records its last sync
    assert kit.admin.get(f"/api/accounts/{account['id']}").get_json()["last_sync_at"] is not None


def test_two_sync_requests_give_one_sync(kit, account, dovecot, mailbox_user, sessions) -> None:
    seed(dovecot, mailbox_user, "INBOX", 1500)
    first = kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()
    second = kit.admin.post(f"/api/accounts/{account['id']}/sync", json={"full": True}).get_json()
    assert second["task_id"] == first["task_id"] and second["deduplicated"] is True
    assert kit.admin.wait_task(first["task_id"])["state"] == "succeeded"
    with sessions() as session:
        syncs = session.scalars(
            select(TaskRecord).where(TaskRecord.account_id == account["id"], TaskRecord.type == "sync")
        ).all()
    assert len(syncs) == 1
    assert stored(sessions, account["id"]) == 1500
    # once it is done, a new request queues a new sync
    third = kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()
    assert third["task_id"] != first["task_id"] and third["deduplicated"] is False
    assert kit.admin.wait_task(third["task_id"])["state"] == "succeeded"


@pytest.mark.slow
def test_cancel_a_running_sync(kit, account, dovecot, mailbox_user, sessions) -> None:
    seed(dovecot, mailbox_user, "INBOX", 6000, size=800)
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"]
    kit.admin.wait_task(task_id, where=lambda t: t["state"] == "running" and t["progress"] > 0, timeout=60)
    response = kit.admin.post(f"/api/tasks/{task_id}/cancel")
    assert response.status_code == 202 and response.get_json()["cancel_requested"] is True
    task = kit.admin.wait_task(task_id)
    assert task["state"] == "cancelled" and task["progress"] < 100
    partial = stored(sessions, account["id"])
    assert 0 < partial < 6000
    # consistent state: the next sync completes the mailbox without duplicates
    again = kit.admin.wait_task(kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"])
    assert again["state"] == "succeeded"
    assert stored(sessions, account["id"]) == 6000


@pytest.mark.slow
def test_worker_killed_mid_sync_is_redelivered_and_finishes_once(
    kit, account, dovecot, mailbox_user, sessions, base_values: dict[str, Any]
) -> None:
    """SIGKILL the whole sync worker (main process and pool child) mid-task. The message was
    never acknowledged (late ack), so the broker hands it to the next worker once its
    visibility timeout passes; the sync resumes from its committed batches and ends once."""
    seed(dovecot, mailbox_user, "INBOX", 6000, size=800)
    broker = RedisServer()
    broker.start()
    values = {
        **base_values,
        "broker_url": broker.url,
        "task_soft_time_limit": "40",
        "task_hard_time_limit": "45",
        "broker_visibility_timeout": "50",
    }
    values_short = {**values}
    api = Api(_app(values), kit.admin_key)
    first = CeleryWorker(["sync"], env=worker_env(env_for(values)), name=f"doomed-{uuid.uuid4().hex[:6]}")
    first.start()
    second = None
    try:
        task_id = api.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"]
        api.wait_task(task_id, where=lambda t: t["state"] == "running" and t["progress"] > 0, timeout=60)
        first.kill()
        assert first.processes() == []
        partial = stored(sessions, account["id"])
        assert partial < 6000
        second = CeleryWorker(
            ["sync"], env=worker_env(env_for(values_short)), name=f"heir-{uuid.uuid4().hex[:6]}"
        )
        second.start()
        task = api.wait_task(task_id, timeout=120)
        assert task["state"] == "succeeded" and task["attempts"] == 2
        assert stored(sessions, account["id"]) == 6000
        time.sleep(1)
        assert api.task(task_id)["state"] == "succeeded"
        with sessions() as session:
            assert session.get(TaskRecord, task_id).worker.startswith("heir-")
    finally:
        first.stop()
        if second is not None:
            second.stop()
        broker.stop()


def _app(values: dict[str, Any]) -> Any:
    from mailroom.app import create_app

    return create_app(load_settings(**values))


@pytest.mark.slow
def test_deleting_the_account_mid_sync_ends_the_task_cleanly(
    kit, account, dovecot, mailbox_user, sessions
) -> None:
    seed(dovecot, mailbox_user, "INBOX", 6000, size=800)
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"]
    kit.admin.wait_task(task_id, where=lambda t: t["state"] == "running" and t["progress"] > 0, timeout=60)
    assert kit.admin.delete(f"/api/accounts/{account['id']}").status_code == 204
    task = kit.admin.wait_task(task_id)
    assert task["state"] == "failed" and task["error"]["code"] == "not_found", task
    assert stored(sessions, account["id"]) == 0
