"""Exact counts and kept ids whatever order the writes come in: a batch that another sync of
the account stored meanwhile (PostgreSQL and SQLite), an expunge while mail arrives on a
server without QRESYNC, and renamed or deleted folders whose messages are found elsewhere
in another order than one plain sync (the old name coming back, the renamed folder synced
alone first, mail moved out before its folder was deleted)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.models import Folder, Message
from services.settings import Settings
from services.sync import state
from services.sync.fetch import message_row
from tests.servers.dovecot import WITHOUT_QRESYNC, DovecotServer
from tests.services.conftest import make_settings
from tests.services.mailboxes import Mailbox, make_messages, new_mailbox


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def backend(
    request: pytest.FixtureRequest,
    db_sessions: sessionmaker[Session],
    sync_settings: Settings,
    fernet_key: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    """The module's PostgreSQL database, or a migrated SQLite file."""
    if request.param == "postgresql":
        yield db_sessions, sync_settings
        return
    path: Path = tmp_path_factory.mktemp("sqlite") / "mailroom.db"
    settings = make_settings(f"sqlite:///{path}", fernet_key)
    engine = make_engine(settings)
    upgrade(engine)
    yield unrestricted_unsafe_sessions(make_sessionmaker(engine)), settings
    engine.dispose()


def test_a_batch_another_sync_stored_meanwhile_is_skipped_and_counted_exactly(
    backend: tuple[sessionmaker[Session], Settings], sync_dovecot: DovecotServer, box: SecretBox
) -> None:
    # Two syncs of one account store the same batch: the second waits for the first one's
    # rows (PostgreSQL's unique index, SQLite's write lock), then finds two of its four
    # stored already. It must skip them (on PostgreSQL its COPY fails and the batch goes in
    # row by row) and count only the two it inserted.
    sessions, settings = backend
    mb = new_mailbox(sync_dovecot, sessions, settings, box)
    mb.sync()
    inbox = mb.folder("INBOX")
    scope = state.FolderScope(mb.principal.tenant_id, mb.account_id, inbox.id)
    rows = [
        message_row(uid, {b"FLAGS": [b"\\Seen"] if uid % 2 else [], b"RFC822.SIZE": 100 + uid})
        for uid in (1, 2, 3, 4)
    ]
    results: list[tuple[int, int]] = []

    def store(session: Session, batch: list[dict[str, Any]]) -> tuple[int, int]:
        return state.insert_messages(
            session, scope, batch, pending=False, moves=state.MoveTracker(), track_inserts=False
        )

    def second_writer() -> None:
        with transaction(sessions) as session:
            results.append(store(session, rows))

    first = sessions()
    try:
        store(first, rows[:2])
        writer = threading.Thread(target=second_writer)
        writer.start()
        time.sleep(1)  # the second writer is blocked on the first one's rows by now
        first.commit()
    finally:
        first.close()
    writer.join(timeout=30)

    assert results == [(2, 0)]  # stored, of which kept an earlier id
    folder = mb.folder("INBOX")
    with transaction(sessions) as session:
        stored = session.scalar(select(func.count()).where(Message.folder_id == inbox.id))
    assert (folder.message_count, folder.unread_count) == (stored, 2) == (4, 2)


def test_a_renamed_folder_whose_old_name_comes_back_keeps_its_ids(mailbox: Mailbox) -> None:
    # "Alpha" (the renamed folder) is walked before the new "Zeta", whose rebuild (another
    # UIDVALIDITY) drops the old rows only at the end of its walk: they must hand their ids
    # to the copies Alpha stored earlier in the same run.
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Zeta")
    mailbox.append("Zeta", make_messages(8, prefix="zeta"))
    mailbox.sync()
    before = mailbox.ids_by_message_id("Zeta")
    mailbox.server.rename_folder(mailbox.user, mailbox.password, "Zeta", "Alpha")
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Zeta")
    mailbox.append("Zeta", make_messages(1, prefix="newcomer"))

    mailbox.sync()

    assert mailbox.ids_by_message_id("Alpha") == before
    assert list(mailbox.ids_by_message_id("Zeta")) == ["<newcomer-0@test>"]
    for name in ("Alpha", "Zeta"):
        folder = mailbox.folder(name)
        assert folder.message_count == len(mailbox.messages(name))


def test_an_expunge_while_mail_arrives_is_found_without_qresync(
    private_dovecot: Any, mailbox: Mailbox
) -> None:
    # Two expunged and two new: EXISTS equals the stored count again, and (as a server
    # without QRESYNC may do) the expunge left HIGHESTMODSEQ where the appends put it.
    server: DovecotServer = private_dovecot(imap_capability=WITHOUT_QRESYNC)
    box = new_mailbox(server, mailbox.sessions, mailbox.settings, mailbox.box)
    uids = box.append("INBOX", make_messages(20))
    assert box.sync()["capabilities"] == {"condstore": True, "qresync": False}
    server.expunge(box.user, box.password, "INBOX", uids[3:5])
    box.append("INBOX", make_messages(2, start=100))
    with box.imap() as client:
        modseq = client.folder_status("INBOX", ["HIGHESTMODSEQ"])[b"HIGHESTMODSEQ"]
    with transaction(box.sessions) as session:
        session.execute(
            update(Folder)
            .where(Folder.account_id == box.account_id, Folder.name == "INBOX")
            .values(highestmodseq=modseq)
        )

    summary = box.sync()

    assert (summary["new"], summary["removed"]) == (2, 2)
    assert [m.uid for m in box.messages("INBOX")] == box.server_uids("INBOX")
    assert box.folder("INBOX").message_count == 20


def test_a_renamed_folder_synced_on_its_own_first_keeps_its_ids(mailbox: Mailbox) -> None:
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Letters")
    mailbox.append("Letters", make_messages(10, prefix="letters"))
    mailbox.sync()
    before = mailbox.ids_by_message_id("Letters")
    mailbox.server.rename_folder(mailbox.user, mailbox.password, "Letters", "Correspondence")

    mailbox.sync(folders=["Correspondence"])
    summary = mailbox.sync()

    assert mailbox.ids_by_message_id("Correspondence") == before
    assert summary["deleted_folders"] == ["Letters"] and "Letters" not in mailbox.folders()


def test_messages_moved_out_of_a_folder_deleted_afterwards_keep_their_ids(mailbox: Mailbox) -> None:
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Old")
    mailbox.append("Old", make_messages(6, prefix="old"))
    mailbox.append("Archive", make_messages(2, prefix="archived"))
    mailbox.sync()
    before = mailbox.ids_by_message_id("Old")
    with mailbox.imap() as client:
        client.select_folder("Old")
        client.move(client.search(["ALL"]), "Archive")
    mailbox.server.delete_folder(mailbox.user, mailbox.password, "Old")

    summary = mailbox.sync()

    archived = mailbox.ids_by_message_id("Archive")
    assert {key: archived[key] for key in before} == before
    assert summary["deleted_folders"] == ["Old"]
    assert mailbox.folder("Archive").message_count == 8


def test_a_folder_renamed_back_before_a_whole_sync_keeps_its_messages(mailbox: Mailbox) -> None:
    # Renamed, the new name synced alone (its messages take over the old folder's rows),
    # then renamed back: the old folder's rows are gone, though the server still has its
    # messages under the same UIDVALIDITY and UIDs. They must be fetched again, not lost.
    mailbox.server.create_folder(mailbox.user, mailbox.password, "Trips")
    mailbox.append("Trips", make_messages(5, prefix="trip"))
    mailbox.sync()
    before = mailbox.ids_by_message_id("Trips")
    mailbox.server.rename_folder(mailbox.user, mailbox.password, "Trips", "Travel")
    mailbox.sync(folders=["Travel"])
    assert mailbox.ids_by_message_id("Travel") == before
    mailbox.server.rename_folder(mailbox.user, mailbox.password, "Travel", "Trips")

    mailbox.sync()

    assert mailbox.ids_by_message_id("Trips") == before
    assert "Travel" not in mailbox.folders()
    assert mailbox.folder("Trips").message_count == 5
