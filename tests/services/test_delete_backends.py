"""The delete service on PostgreSQL and on SQLite: each backend has its own statement for
moving a batch's rows (a join with unnest, with json_each), and both must leave the same rows, ids and
counts, agreeing with Dovecot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.models import Folder, Message
from services.settings import Settings
from tests.servers.dovecot import DovecotServer
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


def stored(mb: Mailbox) -> dict[str, tuple[str, int]]:
    return {m.id: (m.folder_id, m.uid) for m in mb.messages()}


def counts_exact(mb: Mailbox) -> bool:
    with transaction(mb.sessions) as session:
        for folder in session.scalars(select(Folder).where(Folder.account_id == mb.account_id)):
            total, unread = session.execute(
                select(func.count(), func.count().filter(Message.seen.is_(False))).where(
                    Message.folder_id == folder.id
                )
            ).one()
            if (folder.message_count, folder.unread_count) != (total, unread or 0):
                return False
    return True


def test_move_and_permanent_delete_agree_with_the_server_on_both_backends(
    backend: tuple[sessionmaker[Session], Settings], sync_dovecot: DovecotServer, box: SecretBox
) -> None:
    sessions, settings = backend
    mb = new_mailbox(sync_dovecot, sessions, settings, box)
    uids = mb.append("INBOX", make_messages(12, prefix="backend"))
    sync_dovecot.set_flags(mb.user, mb.password, "INBOX", uids[:4], [b"\\Seen"])
    sync_dovecot.set_flags(mb.user, mb.password, "INBOX", [uids[11]], [b"\\Deleted"])
    mb.sync()
    by_uid = {m.uid: m.id for m in mb.messages("INBOX")}

    moved = [by_uid[u] for u in uids[2:7]]
    result = mb.delete(moved, permanent=False, batch_size=2)
    assert result["moved"] == 5 and result["gone"] == []
    trash = mb.folder("Trash")
    trash_uids = mb.server_uids("Trash")
    rows = stored(mb)
    assert sorted(rows[i][1] for i in moved) == trash_uids
    assert all(rows[i][0] == trash.id for i in moved)
    assert counts_exact(mb)

    expunged = [by_uid[u] for u in uids[7:10]]
    result = mb.delete(expunged, permanent=True, batch_size=2)
    assert result["deleted"] == 3
    assert mb.server_uids("INBOX") == uids[:2] + uids[10:]  # the other \Deleted one stays
    assert set(stored(mb)) == set(by_uid.values()) - set(expunged)
    assert counts_exact(mb)

    before = stored(mb)
    mb.sync()
    assert stored(mb) == before
    assert counts_exact(mb)
