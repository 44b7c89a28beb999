"""Deleting messages as a client sees it: through the REST API, on the real delete worker,
against Dovecot. Moves keep Mailroom ids, permanent deletes expunge exactly the requested
UIDs, and the stored rows and counts agree with the server afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from services.models import Folder, Message, TaskRecord
from tests.conftest import account_body
from tests.servers.dovecot import DovecotServer
from tests.servers.mailgen import message
from tests.support import Api, error_of

pytestmark = pytest.mark.usefixtures("workers")

#: Dovecot's capabilities less MOVE (UIDPLUS kept): a delete must COPY + UID EXPUNGE.
WITHOUT_MOVE = "IMAP4rev1 SASL-IR LITERAL+ ENABLE IDLE UIDPLUS SPECIAL-USE MULTIAPPEND UNSELECT CONDSTORE"


def seed(
    dovecot: DovecotServer, user: tuple[str, str], folder: str, count: int, *, tag: str = ""
) -> list[int]:
    base = datetime(2026, 2, 1, tzinfo=UTC)
    messages = [
        message(
            f"Delete me {tag}{i}",
            f"Body {i}",
            sender=f"s{i % 3}@example.test",
            to="owner@example.test",
            date=base + timedelta(minutes=i),
        )
        for i in range(count)
    ]
    return dovecot.append_messages(*user, folder, messages)


def sync(api: Api, account_id: str) -> dict[str, Any]:
    response = api.post(f"/api/accounts/{account_id}/sync")
    assert response.status_code == 202, response.get_json()
    task = api.wait_task(response.get_json()["task_id"])
    assert task["state"] == "succeeded", task
    return task


def delete(api: Api, account_id: str, ids: list[str], **extra: Any) -> dict[str, Any]:
    response = api.post(f"/api/accounts/{account_id}/delete", json={"message_ids": ids, **extra})
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["queue"] == "delete"
    return api.wait_task(response.get_json()["task_id"])


def rows(sessions: Any, account_id: str) -> dict[str, tuple[str, int]]:
    """id → (folder name, uid) of every stored message of the account."""
    with sessions() as session:
        query = (
            select(Message.id, Folder.name, Message.uid)
            .join(Folder, Folder.id == Message.folder_id)
            .where(Message.account_id == account_id)
        )
        return {r.id: (r.name, r.uid) for r in session.execute(query)}


def assert_counts_exact(sessions: Any, account_id: str) -> None:
    """Every folder's stored counts equal its rows."""
    with sessions() as session:
        for folder in session.scalars(select(Folder).where(Folder.account_id == account_id)):
            total, unread = session.execute(
                select(func.count(), func.count().filter(Message.seen.is_(False))).where(
                    Message.folder_id == folder.id
                )
            ).one()
            assert (folder.message_count, folder.unread_count) == (total, unread or 0), folder.name


def folder_ids(api: Api, account_id: str, folder: str) -> dict[int, str]:
    """uid → id of the folder's messages, as the API lists them."""
    page = api.get(f"/api/accounts/{account_id}/messages?folder={folder}&limit=500").get_json()
    return {m["uid"]: m["id"] for m in page["items"]}


def test_move_to_trash_keeps_ids_and_a_following_sync_changes_nothing(
    kit, account, dovecot, mailbox_user, sessions
) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 30)
    dovecot.set_flags(*mailbox_user, "INBOX", uids[:10], [b"\\Seen"])
    seed(dovecot, mailbox_user, "Trash", 3, tag="old ")
    sync(kit.admin, account["id"])
    inbox = folder_ids(kit.admin, account["id"], "INBOX")
    chosen = [inbox[u] for u in uids[5:20]]  # 5 read, 10 unread

    task = delete(kit.admin, account["id"], chosen)
    assert task["state"] == "succeeded", task
    assert task["result"]["moved"] == 15 and task["result"]["deleted"] == 0
    assert task["result"]["gone"] == [] and task["result"]["trash_folder"] == "Trash"

    assert dovecot.uids(*mailbox_user, "INBOX") == uids[:5] + uids[20:]
    trash_uids = dovecot.uids(*mailbox_user, "Trash")
    assert len(trash_uids) == 18
    for ident in chosen:  # the same id, now in Trash with its Trash UID
        shown = kit.admin.get(f"/api/messages/{ident}").get_json()
        assert shown["folder"] == "Trash" and shown["uid"] in trash_uids[3:], shown
    assert sorted(kit.admin.get(f"/api/messages/{i}").get_json()["uid"] for i in chosen) == trash_uids[3:]
    folders = {
        f["name"]: f for f in kit.admin.get(f"/api/accounts/{account['id']}/folders").get_json()["items"]
    }
    assert (folders["INBOX"]["message_count"], folders["INBOX"]["unread_count"]) == (15, 10)
    assert (folders["Trash"]["message_count"], folders["Trash"]["unread_count"]) == (18, 13)
    assert_counts_exact(sessions, account["id"])
    with sessions() as session:  # the next sync goes on above the moved messages
        trash = session.scalar(
            select(Folder).where(Folder.account_id == account["id"], Folder.name == "Trash")
        )
        assert trash.last_seen_uid == max(trash_uids)

    before = rows(sessions, account["id"])
    task = sync(kit.admin, account["id"])
    assert rows(sessions, account["id"]) == before
    assert task["result"]["imap_commands"]["by_command"].get("UID FETCH", 0) <= 1, task["result"]
    assert_counts_exact(sessions, account["id"])

    # Deleting from Trash is permanent, whatever `permanent` says.
    task = delete(kit.admin, account["id"], chosen[:4])
    assert task["state"] == "succeeded" and task["result"]["deleted"] == 4, task
    assert len(dovecot.uids(*mailbox_user, "Trash")) == 14
    for ident in chosen[:4]:
        assert kit.admin.get(f"/api/messages/{ident}").status_code == 404
    assert_counts_exact(sessions, account["id"])


def test_permanent_delete_expunges_exactly_the_requested_uids(
    kit, account, dovecot, mailbox_user, sessions
) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 12)
    # Another client marked one message \Deleted without expunging it: it must stay.
    dovecot.set_flags(*mailbox_user, "INBOX", [uids[0]], [b"\\Deleted"])
    sync(kit.admin, account["id"])
    inbox = folder_ids(kit.admin, account["id"], "INBOX")
    chosen = [inbox[u] for u in uids[3:8]]

    task = delete(kit.admin, account["id"], chosen, permanent=True)
    assert task["state"] == "succeeded", task
    assert task["result"]["deleted"] == 5 and task["result"]["moved"] == 0
    assert dovecot.uids(*mailbox_user, "INBOX") == uids[:3] + uids[8:]
    assert dovecot.uids(*mailbox_user, "Trash") == []
    for ident in chosen:
        assert kit.admin.get(f"/api/messages/{ident}").status_code == 404
    assert set(folder_ids(kit.admin, account["id"], "INBOX")) == set(uids[:3] + uids[8:])
    assert_counts_exact(sessions, account["id"])
    before = rows(sessions, account["id"])
    sync(kit.admin, account["id"])
    assert rows(sessions, account["id"]) == before


def test_other_tenants_and_other_users_ids_are_404_and_nothing_is_queued(
    kit, other_kit, account, dovecot, smtp, mailbox_user, sessions
) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 4)
    sync(kit.admin, account["id"])
    own = list(folder_ids(kit.admin, account["id"], "INBOX").values())

    other_user = "u" + uuid.uuid4().hex[:10]
    dovecot.add_user(other_user, "pw-" + other_user)
    seed(dovecot, (other_user, "pw-" + other_user), "INBOX", 2)
    created = other_kit.admin.post(
        "/api/accounts", json=account_body(dovecot, smtp, (other_user, "pw-" + other_user))
    )
    other_account = created.get_json()
    sync(other_kit.admin, other_account["id"])
    theirs = list(folder_ids(other_kit.admin, other_account["id"], "INBOX").values())

    # Another tenant's message among one's own: the whole request is a 404.
    response = kit.admin.post(f"/api/accounts/{account['id']}/delete", json={"message_ids": own + theirs[:1]})
    assert response.status_code == 404
    assert error_of(response)["details"]["message_ids"] == theirs[:1]
    # The other tenant's account, or its messages through one's own key: 404.
    response = kit.admin.post(f"/api/accounts/{other_account['id']}/delete", json={"message_ids": theirs})
    assert response.status_code == 404
    # A member may not delete from the admin's account.
    response = kit.member.post(f"/api/accounts/{account['id']}/delete", json={"message_ids": own[:1]})
    assert response.status_code == 404
    # An id that is not an id is a 422 before any query.
    response = kit.admin.post(f"/api/accounts/{account['id']}/delete", json={"message_ids": ["x\u0000y"]})
    assert response.status_code == 422
    error_of(response)

    with sessions() as session:
        queued = session.scalar(
            select(func.count())
            .select_from(TaskRecord)
            .where(
                TaskRecord.type == "delete", TaskRecord.tenant_id.in_([kit.tenant_id, other_kit.tenant_id])
            )
        )
    assert queued == 0
    assert dovecot.uids(*mailbox_user, "INBOX") == uids
    assert len(dovecot.uids(other_user, "pw-" + other_user, "INBOX")) == 2


def test_ids_already_gone_are_reported_not_an_error(kit, account, dovecot, mailbox_user, sessions) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 6)
    sync(kit.admin, account["id"])
    inbox = folder_ids(kit.admin, account["id"], "INBOX")
    dovecot.expunge(*mailbox_user, "INBOX", [uids[1]])  # another client deleted it meanwhile

    task = delete(kit.admin, account["id"], [inbox[uids[0]], inbox[uids[1]], inbox[uids[2]]])
    assert task["state"] == "succeeded", task
    assert task["result"]["moved"] == 2 and task["result"]["gone"] == [inbox[uids[1]]]
    assert dovecot.uids(*mailbox_user, "INBOX") == uids[3:]
    assert_counts_exact(sessions, account["id"])
    sync(kit.admin, account["id"])
    assert kit.admin.get(f"/api/messages/{inbox[uids[1]]}").status_code == 404
    assert kit.admin.get(f"/api/messages/{inbox[uids[0]]}").get_json()["folder"] == "Trash"


def test_uidvalidity_changed_since_the_last_sync_refuses_and_touches_nothing(
    kit, account, dovecot, mailbox_user
) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 3)
    sync(kit.admin, account["id"])
    inbox = folder_ids(kit.admin, account["id"], "INBOX")
    dovecot.set_uidvalidity(mailbox_user[0], "INBOX", 777)
    task = delete(kit.admin, account["id"], list(inbox.values()), permanent=True)
    assert task["state"] == "failed" and task["error"]["code"] == "sync_required", task
    assert dovecot.uids(*mailbox_user, "INBOX") == uids


@contextmanager
def own_server(
    password: str, capability: str | None = None
) -> Iterator[tuple[DovecotServer, tuple[str, str]]]:
    """A private Dovecot logging its commands (rawlog), with ``capability`` if given, and a
    fresh mailbox user on it; stopped afterwards."""
    server = DovecotServer(imap_capability=capability, rawlog=True).start()
    try:
        user = ("u" + uuid.uuid4().hex[:10], password)
        server.add_user(*user)
        yield server, user
    finally:
        server.stop()


def synced_account(kit: Any, server: DovecotServer, smtp: Any, user: tuple[str, str]) -> str:
    """An account of ``kit``'s admin on ``user``'s mailbox, synced once; its id."""
    created = kit.admin.post("/api/accounts", json=account_body(server, smtp, user))
    account_id: str = created.get_json()["id"]
    sync(kit.admin, account_id)
    return account_id


def test_a_server_without_move_copies_and_expunges_exactly_those_uids(kit, smtp, sessions) -> None:
    with own_server("pw-nomove", WITHOUT_MOVE) as (server, user):
        uids = seed(server, user, "INBOX", 8)
        server.set_flags(*user, "INBOX", [uids[7]], [b"\\Deleted"])
        account_id = synced_account(kit, server, smtp, user)
        inbox = folder_ids(kit.admin, account_id, "INBOX")
        chosen = [inbox[u] for u in uids[:4]]
        mark = server.rawlog_mark(user[0])

        task = delete(kit.admin, account_id, chosen)
        assert task["state"] == "succeeded" and task["result"]["moved"] == 4, task
        verbs = server.imap_command_counts(user[0], since=mark)
        assert verbs["UID MOVE"] == 0 and verbs["UID COPY"] == 1 and verbs["UID EXPUNGE"] == 1, verbs
        assert verbs["EXPUNGE"] == 0 and verbs["CLOSE"] == 0, verbs
        assert server.uids(*user, "INBOX") == uids[4:]  # the other \Deleted one stays
        trash = server.uids(*user, "Trash")
        assert sorted(kit.admin.get(f"/api/messages/{i}").get_json()["uid"] for i in chosen) == trash
        assert_counts_exact(sessions, account_id)
        before = rows(sessions, account_id)
        sync(kit.admin, account_id)
        assert rows(sessions, account_id) == before


def test_the_delete_asks_for_expunges_as_uid_ranges_where_qresync_is_offered(kit, smtp, sessions) -> None:
    """ENABLE QRESYNC before the first SELECT: the server then answers a MOVE and a UID
    EXPUNGE with VANISHED ranges, which the delete reads as it read EXPUNGE lines."""
    with own_server("pw-qresync") as (server, user):
        uids = seed(server, user, "INBOX", 6)
        account_id = synced_account(kit, server, smtp, user)
        inbox = folder_ids(kit.admin, account_id, "INBOX")
        mark = server.rawlog_mark(user[0])

        moved = delete(kit.admin, account_id, [inbox[u] for u in uids[:3]])
        assert moved["state"] == "succeeded" and moved["result"]["moved"] == 3, moved
        gone = delete(kit.admin, account_id, [inbox[u] for u in uids[3:5]], permanent=True)
        assert gone["state"] == "succeeded" and gone["result"]["deleted"] == 2, gone
        commands = server.imap_commands(user[0], since=mark)
        enables = [i for i, c in enumerate(commands) if c == "ENABLE QRESYNC"]
        selects = [i for i, c in enumerate(commands) if c.startswith("SELECT")]
        assert len(enables) == 2 and len(selects) == 2, commands  # one session per task
        assert enables[0] < selects[0] < enables[1] < selects[1], commands
        assert server.uids(*user, "INBOX") == uids[5:]
        assert len(server.uids(*user, "Trash")) == 3
        assert_counts_exact(sessions, account_id)
        before = rows(sessions, account_id)
        sync(kit.admin, account_id)
        assert rows(sessions, account_id) == before


def test_mail_another_client_put_in_trash_meanwhile_is_still_synced(
    kit, account, dovecot, mailbox_user, sessions
) -> None:
    uids = seed(dovecot, mailbox_user, "INBOX", 4)
    sync(kit.admin, account["id"])
    inbox = folder_ids(kit.admin, account["id"], "INBOX")
    seed(dovecot, mailbox_user, "Trash", 1, tag="elsewhere ")  # not synced yet
    chosen = [inbox[u] for u in uids[:2]]

    def trash_last_seen() -> int | None:
        with sessions() as session:
            return session.scalar(
                select(Folder.last_seen_uid).where(Folder.account_id == account["id"], Folder.name == "Trash")
            )

    before = trash_last_seen()
    assert before is not None
    task = delete(kit.admin, account["id"], chosen)
    assert task["state"] == "succeeded" and task["result"]["moved"] == 2, task
    assert trash_last_seen() == before  # the other message lies between: not skipped
    sync(kit.admin, account["id"])
    trash = kit.admin.get(f"/api/accounts/{account['id']}/messages?folder=Trash").get_json()["items"]
    assert sorted(m["subject"] for m in trash) == ["Delete me 0", "Delete me 1", "Delete me elsewhere 0"]
    assert {m["id"] for m in trash} >= set(chosen)
    assert sorted(m["uid"] for m in trash) == dovecot.uids(*mailbox_user, "Trash")
    assert_counts_exact(sessions, account["id"])
