"""The delete journal on PostgreSQL and on SQLite: a delete that finds the journal an
attempt left when it died (the server had done some of the work, the rows said nothing of
it) puts the rows right first, then finishes. The dead attempt's state is made for real:
the journal is written by the delete's own code, and the server's half of the work is
done on Dovecot with the same IMAP commands over another connection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services import mail_delete
from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.mail_delete_journal import write_journal
from services.mail_delete_rows import plan_delete
from services.migrate import upgrade
from services.models import DeleteJournalEntry, Folder, Message
from services.settings import Settings, load_settings
from tests.servers.dovecot import DovecotServer
from tests.services.mailboxes import Mailbox, make_messages, new_mailbox


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def backend(
    request: pytest.FixtureRequest, base_values: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    """The session's PostgreSQL database, or a migrated SQLite file."""
    if request.param == "postgresql":
        settings = load_settings(**base_values)
    else:
        path: Path = tmp_path_factory.mktemp("sqlite") / "mailroom.db"
        settings = load_settings(**{**base_values, "database_url": f"sqlite:///{path}"})
    engine = make_engine(settings)
    if request.param == "sqlite":
        upgrade(engine)
    yield unrestricted_unsafe_sessions(make_sessionmaker(engine)), settings
    engine.dispose()


def died_after(mb: Mailbox, ids: list[str], *, permanent: bool) -> None:
    """What an attempt leaves when killed before writing any rows: its journal, committed."""
    with transaction(mb.sessions) as session:
        plan = plan_delete(session, mb.account_id, ids, permanent, set())
        with mb.imap() as client:
            uidnext = int(client.folder_status("Trash", [b"UIDNEXT"])[b"UIDNEXT"])
        write_journal(session, mb.principal.tenant_id, mb.account_id, plan, uidnext)


def agree(mb: Mailbox) -> None:
    """Rows name exactly the server's UIDs in INBOX and Trash, counts are exact, and no
    journal is left."""
    with transaction(mb.sessions) as session:
        for name in ("INBOX", "Trash"):
            folder = session.scalar(
                select(Folder).where(Folder.account_id == mb.account_id, Folder.name == name)
            )
            assert folder is not None
            uids = sorted(session.scalars(select(Message.uid).where(Message.folder_id == folder.id)))
            assert uids == mb.server_uids(name), name
            unread = session.scalar(
                select(func.count()).where(Message.folder_id == folder.id, Message.seen.is_(False))
            )
            assert (folder.message_count, folder.unread_count) == (len(uids), unread), name
        left = session.scalar(
            select(func.count())
            .select_from(DeleteJournalEntry)
            .where(DeleteJournalEntry.account_id == mb.account_id)
        )
        assert left == 0


def test_a_move_killed_after_the_server_moved_and_copied_keeps_ids_and_copies_nothing_twice(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer
) -> None:
    sessions, settings = backend
    mb = new_mailbox(dovecot, sessions, settings, SecretBox(settings.encryption_keys()))
    uids = mb.append("INBOX", make_messages(14, prefix="journal"))
    mb.sync()
    by_uid = {m.uid: m.id for m in mb.messages("INBOX")}
    chosen = [by_uid[u] for u in uids[:10]]

    died_after(mb, chosen, permanent=False)
    with mb.imap() as client:
        client.select_folder("INBOX")
        moved = mail_delete.move_uids(client, uids[:4], "Trash")  # the first batch: moved
        client.copy(uids[4:6], "Trash")  # a server without MOVE: copied, not yet expunged
    assert len(mb.server_uids("Trash")) == 6

    result = mb.delete(chosen, permanent=False, batch_size=4)
    assert result["moved"] == 10 and result["gone"] == [], result
    assert mb.server_uids("INBOX") == uids[10:]
    trash = mb.server_uids("Trash")
    assert len(trash) == 10  # the two copies were used, not made again
    rows = {m.id: m.uid for m in mb.messages("Trash")}
    assert set(rows) == set(chosen)  # every id kept
    assert {rows[by_uid[u]] for u in uids[:4]} == set(moved.values())
    assert sorted(rows.values()) == trash
    agree(mb)
    before = {m.id: (m.folder_id, m.uid) for m in mb.messages()}
    mb.sync()
    assert {m.id: (m.folder_id, m.uid) for m in mb.messages()} == before


def test_a_permanent_delete_killed_after_the_server_expunged_deletes_those_rows(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer
) -> None:
    sessions, settings = backend
    mb = new_mailbox(dovecot, sessions, settings, SecretBox(settings.encryption_keys()))
    uids = mb.append("INBOX", make_messages(9, prefix="journal-x"))
    mb.sync()
    by_uid = {m.uid: m.id for m in mb.messages("INBOX")}
    chosen = [by_uid[u] for u in uids[:6]]

    died_after(mb, chosen, permanent=True)
    with mb.imap() as client:
        client.select_folder("INBOX")
        client.add_flags(uids[:4], [b"\\Deleted"], silent=True)
        client.uid_expunge(uids[:4])
        client.add_flags(uids[4:5], [b"\\Deleted"], silent=True)  # flagged, not expunged

    result = mb.delete(chosen, permanent=True, batch_size=4)
    assert result["deleted"] == 6 and result["gone"] == [], result
    assert mb.server_uids("INBOX") == uids[6:]
    assert {m.id for m in mb.messages()} == {by_uid[u] for u in uids[6:]}
    agree(mb)


def test_a_journal_naming_a_folder_gone_from_the_server_does_not_block_later_deletes(
    backend: tuple[sessionmaker[Session], Settings], dovecot: DovecotServer
) -> None:
    sessions, settings = backend
    mb = new_mailbox(dovecot, sessions, settings, SecretBox(settings.encryption_keys()))
    with mb.imap() as client:
        client.create_folder("Projects")
    work = mb.append("Projects", make_messages(3, prefix="journal-gone"))
    inbox = mb.append("INBOX", make_messages(2, prefix="journal-stay"))
    mb.sync()
    died_after(mb, [m.id for m in mb.messages("Projects")], permanent=False)
    with mb.imap() as client:
        client.delete_folder("Projects")  # another client removed the folder meanwhile
    assert work and mb.server_uids("Trash") == []

    result = mb.delete([m.id for m in mb.messages("INBOX")], permanent=False, batch_size=4)
    assert result["moved"] == 2, result
    assert mb.server_uids("INBOX") == [] and len(mb.server_uids("Trash")) == len(inbox)
    with transaction(mb.sessions) as session:
        left = session.scalar(
            select(func.count())
            .select_from(DeleteJournalEntry)
            .where(DeleteJournalEntry.account_id == mb.account_id)
        )
    assert left == 0
