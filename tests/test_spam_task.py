"""Spam checks as a client sees them: through the REST API, on the real spam worker, against
Dovecot. Verdicts are stored on the messages, the tenant's lists decide, spam moves to Junk
keeping its id, a label teaches only its own tenant's filter, a message a user moves out of
Junk counts as ham, and a sync of new mail queues one automatic check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from services.models import SpamSettings
from tests.conftest import account_body
from tests.servers.dovecot import DovecotServer
from tests.servers.mailgen import message
from tests.support import Api, TenantKit

pytestmark = pytest.mark.usefixtures("workers")

BASE = datetime(2026, 3, 1, tzinfo=UTC)


def mails(count: int, sender: str, subject: str, body: str, *, start: int = 0) -> list[bytes]:
    return [
        message(
            f"{subject} {start + i}",
            f"{body}\n\nReference {start + i}.",
            sender=sender,
            to="reader@mailbox.example",
            date=BASE + timedelta(minutes=start + i),
            message_id=f"<m{start + i}.{abs(hash(subject)) % 10**8}@{sender.split('@')[1]}>",
        )
        for i in range(count)
    ]


def sync(api: Api, account_id: str) -> dict[str, Any]:
    response = api.post(f"/api/accounts/{account_id}/sync")
    assert response.status_code == 202, response.get_json()
    task = api.wait_task(response.get_json()["task_id"])
    assert task["state"] == "succeeded", task
    return task


def check(api: Api, account_id: str, **body: Any) -> dict[str, Any]:
    response = api.post(f"/api/accounts/{account_id}/spam-check", json=body)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["queue"] == "spam"
    task = api.wait_task(response.get_json()["task_id"])
    assert task["state"] == "succeeded", task
    return task["result"]  # type: ignore[no-any-return]


def label(api: Api, message_id: str, verdict: str) -> dict[str, Any]:
    response = api.post(f"/api/messages/{message_id}/{verdict}")
    assert response.status_code == 202, response.get_json()
    task = api.wait_task(response.get_json()["task_id"])
    assert task["state"] == "succeeded", task
    return task["result"]  # type: ignore[no-any-return]


def listed(api: Api, account_id: str, query: str = "") -> dict[str, dict[str, Any]]:
    """subject → message view of every listed message."""
    page = api.get(f"/api/accounts/{account_id}/messages?limit=500{query}").get_json()
    return {m["subject"]: m for m in page["items"]}


def spam_tasks(api: Api, account_id: str) -> list[dict[str, Any]]:
    page = api.get(f"/api/tasks?type=spam_check&account_id={account_id}&limit=200").get_json()
    return page["items"]  # type: ignore[no-any-return]


def new_account(
    kit: TenantKit, dovecot: DovecotServer, smtp: Any, user: tuple[str, str], **extra: Any
) -> str:
    response = kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, user, **extra))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]  # type: ignore[no-any-return]


def test_lists_decide_spam_moves_to_junk_keeping_ids_and_ham_comes_back(
    kit: TenantKit, dovecot: DovecotServer, smtp: Any, mailbox_user: tuple[str, str]
) -> None:
    account_id = new_account(kit, dovecot, smtp, mailbox_user, spam_move_to_junk=True)
    settings = {"block": ["offers.example"], "allow": ["colleague@partner.example"]}
    assert kit.admin.patch("/api/spam/settings", json=settings).status_code == 200
    dovecot.append_messages(
        *mailbox_user,
        "INBOX",
        mails(5, "colleague@partner.example", "Minutes", "The minutes of today's planning meeting.")
        + mails(3, "deals@news.offers.example", "Offer", "Our weekly newsletter.", start=5),
    )
    sync(kit.admin, account_id)
    before = listed(kit.admin, account_id)
    assert all(m["spam_score"] is None and m["is_spam"] is None for m in before.values())

    result = check(kit.admin, account_id, folder="INBOX")
    assert (result["scored"], result["spam"], result["moved"], result["gone"]) == (8, 3, 3, 0)
    assert result["junk_folder"] == "Junk" and "messages" not in result
    assert len(dovecot.uids(*mailbox_user, "Junk")) == 3 and len(dovecot.uids(*mailbox_user, "INBOX")) == 5
    after = listed(kit.admin, account_id)
    for subject, shown in after.items():
        assert shown["id"] == before[subject]["id"]  # the same id, wherever it went
        assert shown["spam_score"] is not None and 0 <= shown["spam_score"] <= 1
        if subject.startswith("Offer"):
            assert shown["folder"] == "Junk" and shown["is_spam"] is True and shown["indicators"], shown
            assert shown["spam_score"] >= 0.5
        else:
            assert shown["folder"] == "INBOX" and shown["is_spam"] is False, shown
    assert set(listed(kit.admin, account_id, "&is_spam=true")) == {"Offer 5", "Offer 6", "Offer 7"}
    # A sync after the moves finds nothing new: the moved rows are the Junk messages.
    again = sync(kit.admin, account_id)["result"]
    assert again["new"] == 0 and listed(kit.admin, account_id) == after

    # The user says one was not spam: it goes back to INBOX, still with its id.
    offer = after["Offer 6"]
    learned = label(kit.admin, offer["id"], "ham")
    assert learned["learned"] == 1 and learned["label"] == "ham" and learned["moved"] == 1
    assert learned["messages"][0]["moved_to"] == "INBOX" and learned["messages"][0]["is_spam"] is False
    shown = kit.admin.get(f"/api/messages/{offer['id']}").get_json()
    assert shown["folder"] == "INBOX" and shown["spam_label"] == "ham" and shown["is_spam"] is False
    assert len(dovecot.uids(*mailbox_user, "INBOX")) == 6
    # A later check of INBOX keeps the user's word (the block-list says spam).
    rechecked = check(kit.admin, account_id, message_ids=[offer["id"]])
    assert rechecked["moved"] == 0 and rechecked["messages"][0]["is_spam"] is False


def test_a_message_moved_out_of_junk_by_the_user_counts_as_ham(
    kit: TenantKit, dovecot: DovecotServer, smtp: Any, mailbox_user: tuple[str, str]
) -> None:
    account_id = new_account(kit, dovecot, smtp, mailbox_user, spam_move_to_junk=True)
    kit.admin.patch("/api/spam/settings", json={"block": ["offers.example"]})
    dovecot.append_messages(*mailbox_user, "INBOX", mails(2, "deals@offers.example", "Deal", "Deals inside."))
    sync(kit.admin, account_id)
    assert check(kit.admin, account_id, folder="INBOX")["moved"] == 2
    moved = listed(kit.admin, account_id)
    with dovecot.client(*mailbox_user) as client:  # another mail client moves one back
        client.select_folder("Junk")
        client.move([min(client.search(["ALL"]))], "INBOX")

    result = sync(kit.admin, account_id)["result"]
    assert result["left_junk"] == 1
    now = listed(kit.admin, account_id)
    back = next(m for m in now.values() if m["folder"] == "INBOX")
    assert back["id"] == moved[back["subject"]]["id"]  # the sync matched it: same id
    assert back["spam_label"] == "ham" and back["is_spam"] is False and back["spam_score"] is not None
    stayed = next(m for m in now.values() if m["folder"] == "Junk")
    assert stayed["spam_label"] is None and stayed["is_spam"] is True
    learning = [t for t in spam_tasks(kit.admin, account_id) if t["params"].get("learn") == "ham"]
    assert len(learning) == 1 and learning[0]["params"]["message_ids"] == [back["id"]]
    task = kit.admin.wait_task(learning[0]["id"])
    assert task["state"] == "succeeded" and task["result"]["learned"] == 1 and task["result"]["moved"] == 0


def test_learning_changes_only_that_tenants_verdicts(
    kit: TenantKit,
    other_kit: TenantKit,
    dovecot: DovecotServer,
    smtp: Any,
    sessions: Any,
) -> None:
    family = mails(
        8,
        "billing@invoices-portal.example",
        "Zorblax account notice",
        "Your zorblax quantum widget subscription needs attention at the zorblax portal.",
    )
    accounts = {}
    for kit_ in (kit, other_kit):
        user = (f"learn{kit_.tenant_id[:8]}", "pw-learn")
        dovecot.add_user(*user)
        dovecot.append_messages(*user, "INBOX", family)
        accounts[kit_.tenant_id] = new_account(kit_, dovecot, smtp, user)
        sync(kit_.admin, accounts[kit_.tenant_id])
    a, b = accounts[kit.tenant_id], accounts[other_kit.tenant_id]
    check(kit.admin, a, folder="INBOX")
    check(other_kit.admin, b, folder="INBOX")
    base_a, base_b = listed(kit.admin, a), listed(other_kit.admin, b)
    assert {s: m["spam_score"] for s, m in base_a.items()} == {s: m["spam_score"] for s, m in base_b.items()}

    # Tenant A says five of the family are the opposite of what the shipped model thinks,
    # so the lesson must move the other three's scores (whatever the model ships as).
    verdict = "ham" if base_a["Zorblax account notice 0"]["is_spam"] else "spam"
    queued = [
        kit.admin.post(f"/api/messages/{base_a[f'Zorblax account notice {i}']['id']}/{verdict}")
        for i in range(5)
    ]
    for response in queued:
        assert response.status_code == 202, response.get_json()
        task = kit.admin.wait_task(response.get_json()["task_id"])
        assert task["state"] == "succeeded" and task["result"]["learned"] == 1, task
    rest = [f"Zorblax account notice {i}" for i in range(5, 8)]
    check(kit.admin, a, message_ids=[base_a[s]["id"] for s in rest])
    check(other_kit.admin, b, message_ids=[base_b[s]["id"] for s in rest])
    now_a, now_b = listed(kit.admin, a), listed(other_kit.admin, b)
    for subject in rest:
        moved = now_a[subject]["spam_score"] - base_a[subject]["spam_score"]
        assert moved > 0 if verdict == "spam" else moved < 0, (subject, verdict, moved)
        assert now_b[subject]["spam_score"] == base_b[subject]["spam_score"], subject
        assert now_a[subject]["spam_label"] is None
    with sessions() as session:
        rows = {r.tenant_id: r for r in session.scalars(select(SpamSettings))}
        assert rows[kit.tenant_id].learned == 5 and rows[kit.tenant_id].layer
        assert other_kit.tenant_id not in rows or not rows[other_kit.tenant_id].layer
    assert kit.admin.get("/api/spam/settings").get_json()["learned"] == 5


def test_a_sync_of_new_inbox_mail_queues_one_automatic_check(
    kit: TenantKit, dovecot: DovecotServer, smtp: Any, mailbox_user: tuple[str, str]
) -> None:
    auto = new_account(kit, dovecot, smtp, mailbox_user)
    assert kit.admin.patch(f"/api/accounts/{auto}", json={"spam_auto_scan": True}).status_code == 200
    dovecot.append_messages(*mailbox_user, "INBOX", mails(4, "news@letters.example", "Letter", "Hello."))
    sync(kit.admin, auto)
    queued = spam_tasks(kit.admin, auto)
    assert len(queued) == 1 and queued[0]["origin"] == "auto_scan", queued
    assert queued[0]["params"] == {"folder": "INBOX", "only_unscored": True}
    task = kit.admin.wait_task(queued[0]["id"])
    assert task["state"] == "succeeded" and task["result"]["scored"] == 4, task
    assert all(m["spam_score"] is not None for m in listed(kit.admin, auto).values())

    sync(kit.admin, auto)  # nothing new: nothing queued
    assert len(spam_tasks(kit.admin, auto)) == 1
    dovecot.append_messages(*mailbox_user, "INBOX", mails(2, "news@letters.example", "Later", "Hi.", start=4))
    sync(kit.admin, auto)
    tasks = spam_tasks(kit.admin, auto)
    assert len(tasks) == 2
    second = kit.admin.wait_task(next(t["id"] for t in tasks if t["id"] != queued[0]["id"]))
    assert second["result"]["scored"] == 2  # only the unchecked ones

    # An account without the setting gets no check.
    other_user = ("noauto" + kit.tenant_id[:8], "pw-noauto")
    dovecot.add_user(*other_user)
    dovecot.append_messages(*other_user, "INBOX", mails(2, "news@letters.example", "Plain", "Hi."))
    plain = new_account(kit, dovecot, smtp, other_user)
    sync(kit.admin, plain)
    assert spam_tasks(kit.admin, plain) == []


def test_a_check_whose_account_is_deleted_stops_at_its_next_batch(
    kit: TenantKit, dovecot: DovecotServer, smtp: Any, mailbox_user: tuple[str, str]
) -> None:
    """Deleting the account stops a check that is reading its mailbox: at the next batch's
    checkpoint the task ends not_found, instead of reading and scoring the rest of a
    mailbox Mailroom no longer serves."""
    account_id = new_account(kit, dovecot, smtp, mailbox_user)
    for start in range(0, 6000, 1000):
        batch = mails(1000, "a@news.example", "Note", "Hi.", start=start)
        dovecot.append_messages(*mailbox_user, "INBOX", batch)
    sync(kit.admin, account_id)
    response = kit.admin.post(f"/api/accounts/{account_id}/spam-check", json={"folder": "INBOX"})
    task_id = response.get_json()["task_id"]
    kit.admin.wait_task(task_id, where=lambda t: t["state"] == "running" and t["progress"] > 0)
    assert kit.admin.delete(f"/api/accounts/{account_id}").status_code == 204
    task = kit.admin.wait_task(task_id)
    assert task["state"] == "failed" and task["error"]["code"] == "not_found", task
    assert "account was deleted" in task["error"]["message"]
    assert task["result"] is None and task["progress"] < 100
