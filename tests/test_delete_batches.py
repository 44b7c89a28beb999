"""The delete service between its batches: a cancel leaves server and database in agreement
for every batch done, a second run finishes the rest with the same ids, and the task waits
while another task holds the account's sync lock."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update

from services import mail_delete
from services.crypto import SecretBox
from services.errors import TaskCancelled
from services.models import Account, TaskRecord
from tests.test_delete import assert_counts_exact, folder_ids, rows, seed, sync


def stop_after(batches: int) -> Any:
    """A progress report that cancels after ``batches`` batch reports (0 % is the start)."""
    seen: list[float] = []

    def report(percent: float, stage: str) -> None:
        if percent > 0:
            seen.append(percent)
            if len(seen) >= batches:
                raise TaskCancelled()

    return report


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize("permanent", [False, True])
def test_a_cancel_between_batches_leaves_server_and_database_in_agreement(
    kit, account, dovecot, mailbox_user, sessions, settings, permanent
) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 23)
    sync(kit.admin, account["id"])
    inbox = folder_ids(kit.admin, account["id"], "INBOX")
    chosen = [inbox[u] for u in uids[:20]]
    box = SecretBox(settings.encryption_keys())

    def run(progress: Any) -> dict[str, Any]:
        return mail_delete.delete_messages(
            sessions,
            account["id"],
            chosen,
            permanent=permanent,
            box=box,
            settings=settings,
            progress=progress,
            batch_size=5,
        )

    with pytest.raises(TaskCancelled):
        run(stop_after(2))
    # Batch 2 is reported (and the cancel seen) once batch 3's IMAP command is done and its
    # rows are on their way: three batches, the 15 lowest UIDs, were done, and the rows
    # say so.
    assert dovecot.uids(*mailbox_user, "INBOX") == uids[15:]
    stored = rows(sessions, account["id"])
    assert sorted(uid for name, uid in stored.values() if name == "INBOX") == uids[15:]
    trash = dovecot.uids(*mailbox_user, "Trash")
    assert sorted(uid for name, uid in stored.values() if name == "Trash") == trash
    assert len(trash) == (0 if permanent else 15)
    assert_counts_exact(sessions, account["id"])

    # The retry (the same request again) finishes the rest: moved ones count as moved,
    # never deleted for being in Trash now.
    result = run(lambda percent, stage: None)
    assert result["gone"] == ([] if not permanent else chosen[:15])
    assert result["moved" if not permanent else "deleted"] == (20 if not permanent else 5)
    assert dovecot.uids(*mailbox_user, "INBOX") == uids[20:]
    stored = rows(sessions, account["id"])
    if permanent:
        assert set(stored) == {inbox[u] for u in uids[20:]}
    else:
        assert {i: stored[i][0] for i in chosen} == dict.fromkeys(chosen, "Trash")
        assert sorted(stored[i][1] for i in chosen) == dovecot.uids(*mailbox_user, "Trash")
    assert_counts_exact(sessions, account["id"])
    before = rows(sessions, account["id"])
    sync(kit.admin, account["id"])
    assert rows(sessions, account["id"]) == before


@pytest.mark.usefixtures("workers")
def test_the_delete_waits_while_another_task_holds_the_account(
    kit, account, dovecot, mailbox_user, sessions
) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 3)
    sync(kit.admin, account["id"])
    inbox = folder_ids(kit.admin, account["id"], "INBOX")
    # A sync in flight holds the account (as dispatch and the sync worker claim it).
    holder = TaskRecord(
        tenant_id=kit.tenant_id, account_id=account["id"], type="sync", queue="sync", state="running"
    )
    with sessions() as session:
        session.add(holder)
        session.flush()
        session.execute(update(Account).where(Account.id == account["id"]).values(sync_task_id=holder.id))
        session.commit()
        holder_id = holder.id

    response = kit.admin.post(f"/api/accounts/{account['id']}/delete", json={"message_ids": [inbox[uids[0]]]})
    task_id = response.get_json()["task_id"]
    waiting = kit.admin.wait_task(task_id, states={"retrying"})
    assert waiting["error"]["code"] == "account_busy", waiting
    assert dovecot.uids(*mailbox_user, "INBOX") == uids  # nothing touched while it waits

    with sessions() as session:
        session.execute(update(TaskRecord).where(TaskRecord.id == holder_id).values(state="succeeded"))
        session.commit()
    task = kit.admin.wait_task(task_id, timeout=60)
    assert task["state"] == "succeeded" and task["result"]["moved"] == 1, task
    assert dovecot.uids(*mailbox_user, "INBOX") == uids[1:]
    with sessions() as session:
        assert session.get(Account, account["id"]).sync_task_id is None  # released
