"""The delete task's path through the service on PostgreSQL and on SQLite: each batch's
report is made inside the batch's own transaction (beside its rows and counts, which
PostgreSQL writes in one statement), a cancel it returns stops the run at the next batch
with server and rows in agreement, and ``finish`` sees the result inside the run's last
transaction, after every row is written and the journal is cleared, with no report
after it."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services import mail_delete
from services.crypto import SecretBox
from services.errors import NotFound, TaskCancelled
from services.models import DeleteJournalEntry, Message
from tests.servers.dovecot import DovecotServer
from tests.services.mailboxes import Mailbox, make_messages, new_mailbox
from tests.test_delete_journal import agree, backend  # noqa: F401 - the fixture

UNREAD_EVERY = 3


def seeded(backend: Any, dovecot: DovecotServer, count: int) -> tuple[Mailbox, list[int], dict[int, str]]:  # noqa: F811
    sessions, settings = backend
    mb = new_mailbox(dovecot, sessions, settings, SecretBox(settings.encryption_keys()))
    uids = mb.append("INBOX", make_messages(count, prefix="inbatch"))
    with mb.imap() as client:  # some read, some not: the unread counts move too
        client.select_folder("INBOX")
        client.add_flags([u for u in uids if u % UNREAD_EVERY], [b"\\Seen"], silent=True)
    mb.sync()
    return mb, uids, {m.uid: m.id for m in mb.messages("INBOX")}


def left_in(session: Session, folder_id: str, ids: list[str]) -> set[str]:
    return set(session.scalars(select(Message.id).where(Message.id.in_(ids), Message.folder_id == folder_id)))


@pytest.mark.parametrize("permanent", [False, True])
def test_reports_in_the_batch_transaction_and_a_cancel_stops_at_the_next_batch(
    backend: Any,  # noqa: F811
    dovecot: DovecotServer,
    permanent: bool,
) -> None:
    mb, uids, by_uid = seeded(backend, dovecot, 13)
    chosen = [by_uid[u] for u in uids[:12]]
    inbox = mb.folder("INBOX").id
    seen: list[tuple[float, set[str]]] = []

    def report(session: Session, percent: float, stage: str) -> BaseException | None:
        # The batch's rows are written in this very transaction: its ids left INBOX.
        seen.append((percent, set(chosen) - left_in(session, inbox, chosen)))
        return TaskCancelled() if len(seen) == 3 else None  # the start, then two batches

    def finish(session: Session, result: dict[str, Any]) -> None:
        raise AssertionError("a cancelled run never finishes")

    with pytest.raises(TaskCancelled):
        mb.delete(
            chosen,
            permanent=permanent,
            report=report,
            finish=finish,
            batch_size=4,
        )
    # The start, then two reports, each after its batch's rows in the same transaction; the
    # cancel from the second is raised once batch 3 (done on the server meanwhile) is written too.
    assert [p for p, _ in seen] == [0, pytest.approx(100 * 4 / 12), pytest.approx(100 * 8 / 12)]
    assert [done for _, done in seen] == [set(), set(chosen[:4]), set(chosen[:8])]
    assert mb.server_uids("INBOX") == uids[12:]
    agree(mb)


@pytest.mark.parametrize("permanent", [False, True])
def test_finish_runs_in_the_last_transaction_with_the_result_and_nothing_reports_after_it(
    backend: Any,  # noqa: F811
    dovecot: DovecotServer,
    permanent: bool,
) -> None:
    mb, uids, by_uid = seeded(backend, dovecot, 11)
    chosen = [by_uid[u] for u in uids[:10]]
    inbox = mb.folder("INBOX").id
    calls: list[str] = []
    finished: list[dict[str, Any]] = []

    def report(session: Session, percent: float, stage: str) -> BaseException | None:
        calls.append(f"report {round(percent)}")
        return None

    def finish(session: Session, result: dict[str, Any]) -> None:
        calls.append("finish")
        # Every row is written and the journal cleared in this transaction already.
        left = left_in(session, inbox, chosen)
        journal = session.scalar(
            select(func.count())
            .select_from(DeleteJournalEntry)
            .where(DeleteJournalEntry.account_id == mb.account_id)
        )
        assert (left, journal) == (set(), 0)
        finished.append(result)

    result = mb.delete(
        chosen,
        permanent=permanent,
        progress=lambda percent, stage: calls.append(f"progress {round(percent)}"),
        report=report,
        finish=finish,
        batch_size=4,
    )
    # The start in the plan's transaction, batches 1 and 2 in theirs; the last batch's
    # transaction holds the finish and no report; ``progress`` is never called.
    assert calls == ["report 0", "report 40", "report 80", "finish"]
    assert finished == [result]
    assert result["moved" if not permanent else "deleted"] == 10 and result["gone"] == []
    assert mb.server_uids("INBOX") == uids[10:]
    trash = {m.id: m.uid for m in mb.messages("Trash")}
    assert set(trash) == (set() if permanent else set(chosen))  # moved ones keep their ids
    agree(mb)  # rows and both folders' counts (total and unread) exact


def test_finish_runs_once_when_every_id_is_gone(backend: Any, dovecot: DovecotServer) -> None:  # noqa: F811
    mb, uids, by_uid = seeded(backend, dovecot, 3)
    chosen = [by_uid[u] for u in uids]
    with mb.imap() as client:  # another client deleted them; the rows still name them
        client.select_folder("INBOX")
        client.add_flags(uids, [b"\\Deleted"], silent=True)
        client.uid_expunge(uids)
    finished: list[dict[str, Any]] = []
    result = mb.delete(
        chosen,
        permanent=True,
        report=lambda session, percent, stage: None,
        finish=lambda session, result: finished.append(result),
    )
    assert finished == [result] and sorted(result["gone"]) == sorted(chosen)


def test_a_cancel_seen_at_the_start_touches_nothing(backend: Any, dovecot: DovecotServer) -> None:  # noqa: F811
    mb, uids, by_uid = seeded(backend, dovecot, 3)
    with pytest.raises(TaskCancelled):
        mb.delete(
            [by_uid[u] for u in uids],
            permanent=False,
            report=lambda session, percent, stage: TaskCancelled(),
            finish=lambda session, result: None,
        )
    assert mb.server_uids("INBOX") == uids and mb.server_uids("Trash") == []
    agree(mb)


def test_the_api_check_names_trash_ids_in_request_order_and_unknown_ids(
    backend: Any,  # noqa: F811
    dovecot: DovecotServer,
) -> None:
    mb, uids, by_uid = seeded(backend, dovecot, 6)
    mb.delete([by_uid[u] for u in uids[:3]], permanent=False)
    in_trash = [by_uid[u] for u in uids[:3]]
    asked = [by_uid[uids[4]], in_trash[2], by_uid[uids[3]], in_trash[0], in_trash[2]]
    with mb.sessions() as session:
        assert mail_delete.check_deletable(session, mb.principal, mb.account_id, asked) == [
            in_trash[2],
            in_trash[0],
        ]
        assert mail_delete.check_deletable(session, mb.principal, mb.account_id, [by_uid[uids[5]]]) == []
        unknown = "00000000-0000-4000-8000-000000000000"
        with pytest.raises(NotFound) as refused:
            mail_delete.check_deletable(session, mb.principal, mb.account_id, [in_trash[1], unknown])
    assert refused.value.details == {"message_ids": [unknown]}
