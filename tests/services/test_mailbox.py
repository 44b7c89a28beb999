"""The read side (services.mailbox) over what a real sync stored, on PostgreSQL and SQLite."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services import mailbox as reads
from services import tenancy
from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.errors import InvalidRequest, NotFound
from services.migrate import upgrade
from services.models import Message
from services.settings import Settings
from services.tenancy import Principal
from tests.servers import mailgen
from tests.servers.dovecot import DovecotServer
from tests.services.conftest import make_settings
from tests.services.mailboxes import BASE_DATE, Mailbox, make_messages, new_mailbox


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


@pytest.fixture(scope="module")
def synced(
    backend: tuple[sessionmaker[Session], Settings], sync_dovecot: DovecotServer, box: SecretBox
) -> Mailbox:
    """A mailbox with 30 dated messages in INBOX (some read, some flagged, three sharing one
    date), a multipart one, and 3 in Sent, synced once."""
    sessions, settings = backend
    mb = new_mailbox(sync_dovecot, sessions, settings, box)
    uids = mb.append("INBOX", make_messages(27))
    same_time = [
        mailgen.message(
            f"tie {n}",
            "tied",
            sender="tie@example.com",
            to="me@example.com",
            date=BASE_DATE + timedelta(days=10),
            message_id=f"<tie-{n}@test>",
        )
        for n in range(3)
    ]
    mb.append("INBOX", same_time)
    mb.append(
        "INBOX",
        [
            b"From: Rich <rich@example.com>\r\nSubject: rich text\r\n"
            b"Date: Fri, 01 Mar 2024 08:00:00 +0000\r\nMessage-ID: <rich@test>\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
            b'--outer\r\nContent-Type: multipart/alternative; boundary="inner"\r\n\r\n'
            b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nPlain caf=C3=A9 text\r\n"
            b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>HTML <b>caf\xc3\xa9</b></p>\r\n"
            b"--inner--\r\n"
            b'--outer\r\nContent-Type: text/csv; name="data.csv"\r\n'
            b'Content-Disposition: attachment; filename="data.csv"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\nYSxiCjEsMgo=\r\n--outer--\r\n"
        ],
    )
    mb.append("Sent", make_messages(3, prefix="sent"), flags=["\\Seen"])
    mb.server.set_flags(mb.user, mb.password, "INBOX", uids[:5], ["\\Seen"])
    mb.server.set_flags(mb.user, mb.password, "INBOX", uids[5:8], ["\\Seen", "\\Flagged"])
    mb.sync()
    return mb


def _all_pages(mb: Mailbox, session: Session, *, limit: int, **filters: object) -> list[Message]:
    rows: list[Message] = []
    cursor = None
    for _ in range(100):
        page, cursor = reads.list_messages(
            session,
            mb.principal,
            mb.account_id,
            limit=limit,
            cursor=cursor,
            **filters,  # type: ignore[arg-type]
        )
        assert len(page) <= limit
        rows += page
        if cursor is None:
            return rows
    raise AssertionError("pagination did not end")


def _other_principal(mb: Mailbox, *, same_tenant: bool, role: str = "member") -> Principal:
    with transaction(mb.sessions) as session:
        if same_tenant:
            tenant_id = mb.principal.tenant_id
        else:
            tenant_id = tenancy.create_tenant(session, name=f"Other {uuid.uuid4().hex}").id
        email = f"{role}-{uuid.uuid4().hex[:8]}@x.test"
        user = tenancy.create_user(session, tenant_id=tenant_id, email=email, role=role)
        return Principal(tenant_id=tenant_id, user_id=user.id, role=role)


def test_list_folders_inbox_first_and_scoped(synced: Mailbox) -> None:
    with transaction(synced.sessions) as session:
        folders = reads.list_folders(session, synced.principal, synced.account_id)
        names = [f.name for f in folders]
        assert names[:3] == ["INBOX", "Sent", "Drafts"]
        assert {f.name: f.message_count for f in folders}["INBOX"] == 31
        with pytest.raises(NotFound):
            reads.list_folders(session, _other_principal(synced, same_tenant=False), synced.account_id)


def test_cursor_pages_cover_everything_newest_first(synced: Mailbox) -> None:
    with transaction(synced.sessions) as session:
        rows = _all_pages(synced, session, limit=7)
        assert len(rows) == 34 and len({r.id for r in rows}) == 34
        keys = [(r.date, r.id) for r in rows]
        assert keys == sorted(keys, reverse=True)
        # The three messages sharing one date are ordered by id and none is skipped.
        ties = [r for r in rows if r.subject.startswith("tie ")]
        assert len(ties) == 3 and [t.id for t in ties] == sorted((t.id for t in ties), reverse=True)


def test_filters(synced: Mailbox) -> None:
    with transaction(synced.sessions) as session:

        def subjects(**filters: object) -> set[str]:
            return {m.subject for m in _all_pages(synced, session, limit=50, **filters)}

        inbox = reads.list_folders(session, synced.principal, synced.account_id)[0]
        assert len(subjects(folder="INBOX")) == 31
        assert subjects(folder=inbox.id) == subjects(folder="INBOX")
        assert len(subjects(folder="Sent")) == 3
        assert len(subjects(unread=False, folder="INBOX")) == 8
        assert len(subjects(unread=True)) == 31 - 8
        assert subjects(flagged=True) == {f"msg number {n}" for n in (5, 6, 7)}
        assert subjects(from_="SENDER 3 <SENDER3@") == {f"msg number {n}" for n in (3, 10, 17, 24)}
        assert subjects(subject="NUMBER 2") == {"msg number 2", "sent number 2"} | {
            f"msg number {n}" for n in range(20, 27)
        }
        assert subjects(subject="100%_") == set()  # LIKE wildcards are literal
        window = subjects(since=BASE_DATE + timedelta(minutes=3), until=BASE_DATE + timedelta(minutes=6))
        assert window == {"msg number 3", "msg number 4", "msg number 5"}
        with pytest.raises(NotFound):
            reads.list_messages(session, synced.principal, synced.account_id, folder="Nope")


@pytest.mark.parametrize(
    "cursor",
    ["!!!", base64.urlsafe_b64encode(b"not json").decode(), base64.urlsafe_b64encode(b'["x", 1]').decode()],
)
def test_malformed_cursor_is_invalid(synced: Mailbox, cursor: str) -> None:
    with transaction(synced.sessions) as session, pytest.raises(InvalidRequest):
        reads.list_messages(session, synced.principal, synced.account_id, cursor=cursor)


def test_other_tenants_and_other_members_get_not_found(synced: Mailbox) -> None:
    with transaction(synced.sessions) as session:
        message = reads.list_messages(session, synced.principal, synced.account_id, limit=1)[0][0]
        assert reads.get_message(session, synced.principal, message.id).id == message.id
        stranger = _other_principal(synced, same_tenant=False)
        colleague = _other_principal(synced, same_tenant=True)
        admin = _other_principal(synced, same_tenant=True, role="admin")
        for principal in (stranger, colleague):
            with pytest.raises(NotFound):
                reads.get_message(session, principal, message.id)
            with pytest.raises(NotFound):
                reads.list_messages(session, principal, synced.account_id)
        assert reads.get_message(session, admin, message.id).id == message.id
        with pytest.raises(NotFound):
            reads.get_message(session, synced.principal, "no-such-id")


def test_fetch_body(synced: Mailbox) -> None:
    with transaction(synced.sessions) as session:
        rich = next(m for m in _all_pages(synced, session, limit=50) if m.message_id_header == "<rich@test>")
        assert rich.snippet == "Plain café text" and rich.attachments == ["data.csv"]
        body = reads.fetch_body(session, synced.principal, rich.id, box=synced.box, settings=synced.settings)
    assert body["text"].strip() == "Plain café text"
    assert "<b>café</b>" in body["html"]
    assert body["headers"]["Subject"] == "rich text"
    assert body["attachments"] == [{"filename": "data.csv", "content_type": "text/csv", "size": 8}]
    # Fetching the body must not mark the message read on the server.
    with synced.imap() as client:
        client.select_folder("INBOX", readonly=True)
        assert b"\\Seen" not in client.get_flags([rich.uid])[rich.uid]


def test_fetch_body_of_a_message_gone_from_the_server(synced: Mailbox) -> None:
    with transaction(synced.sessions) as session:
        sent = reads.list_messages(session, synced.principal, synced.account_id, folder="Sent", limit=1)[0][0]
        synced.server.expunge(synced.user, synced.password, "Sent", [sent.uid])
        with pytest.raises(NotFound, match="no longer on the server"):
            reads.fetch_body(session, synced.principal, sent.id, box=synced.box, settings=synced.settings)
