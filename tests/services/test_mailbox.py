"""The read side (services.mailbox) over what a real sync stored, on PostgreSQL and SQLite."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.orm import Session, sessionmaker

from services import bodies, read_stats, tenancy
from services import mailbox as reads
from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.errors import InvalidRequest, NotFound
from services.migrate import upgrade
from services.models import Folder, Message
from services.settings import Settings
from services.tenancy import Principal
from tests.servers import mailgen
from tests.servers.dovecot import DovecotServer
from tests.servers.redis import RedisServer
from tests.services.conftest import make_settings
from tests.services.mailboxes import BASE_DATE, Mailbox, make_messages, new_mailbox


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def backend(
    request: pytest.FixtureRequest,
    db_sessions: sessionmaker[Session],
    sync_settings: Settings,
    fernet_key: str,
    broker: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    """The module's PostgreSQL database, or a migrated SQLite file; body fetches count
    their concurrency in the session's broker Redis."""
    if request.param == "postgresql":
        yield db_sessions, make_settings(sync_settings.database_url, fernet_key, broker_url=broker.url)
        return
    path: Path = tmp_path_factory.mktemp("sqlite") / "mailroom.db"
    settings = make_settings(f"sqlite:///{path}", fernet_key, broker_url=broker.url)
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


def test_subject_and_sender_search_ignore_case_beyond_ascii(synced: Mailbox) -> None:
    """As PostgreSQL's ILIKE does, SQLite's search folds the case of every letter, not only
    of A to Z (its own lower() knows only ASCII)."""
    session = synced.sessions()
    try:
        changed = session.execute(
            update(Message)
            .where(Message.account_id == synced.account_id, Message.subject == "msg number 26")
            .values(subject="ÜNÏCÖDÉ Résumé ΣΟΦΊΑ", from_addr="Ærøskøbing Ølbryggeri <ØL@example.test>")
        )

        def subjects(**filters: object) -> set[str]:
            return {m.subject for m in _all_pages(synced, session, limit=50, **filters)}

        assert changed.rowcount == 1  # type: ignore[attr-defined]
        found = {"ÜNÏCÖDÉ Résumé ΣΟΦΊΑ"}
        assert subjects(subject="ÜNÏCÖDÉ") == found, len(subjects())
        assert subjects(subject="ünïcödé") == found
        assert subjects(subject="RÉSUMÉ") == found
        assert subjects(subject="σοφία") == found
        assert subjects(from_="ærøskøbing ølbryggeri <øl@") == found
        assert subjects(subject="unicode") == set()  # no folding of accents, as ILIKE
    finally:
        session.rollback()
        session.close()


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
        body = bodies.fetch_body(session, synced.principal, rich.id, box=synced.box, settings=synced.settings)
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
            bodies.fetch_body(session, synced.principal, sent.id, box=synced.box, settings=synced.settings)


# --- the order and the cursor: ties, undated messages, the index ---------------------------


def _seed_folder(mb: Mailbox, name: str, dates: list[datetime | None]) -> str:
    """A folder of ``mb``'s account holding one message per entry of ``dates``, inserted
    directly (sync never stores an undated message: it falls back to INTERNALDATE)."""
    with transaction(mb.sessions) as session:
        folder = Folder(tenant_id=mb.principal.tenant_id, account_id=mb.account_id, name=name, flags=[])
        session.add(folder)
        session.flush()
        session.add_all(
            Message(
                tenant_id=mb.principal.tenant_id,
                account_id=mb.account_id,
                folder_id=folder.id,
                uid=n + 1,
                date=date,
                subject=f"{name} {n}",
            )
            for n, date in enumerate(dates)
        )
        return folder.id


def _newest_first(rows: list[Message]) -> list[str]:
    """The promised order, computed here: date descending, undated last, then id descending."""
    floor = datetime.min.replace(tzinfo=UTC)
    return [
        r.id for r in sorted(rows, key=lambda r: (r.date is not None, r.date or floor, r.id), reverse=True)
    ]


@pytest.fixture(scope="module")
def seeded(synced: Mailbox) -> str:
    """Folder "Seeded": 15 messages sharing one date, 12 undated, 18 with dates of their own
    (some older, some newer than the shared one), interleaved."""
    shared = BASE_DATE + timedelta(days=3)
    dates: list[datetime | None] = []
    for n in range(45):
        if n % 3 == 0:
            dates.append(shared)
        elif n % 15 in (1, 4, 7, 10):
            dates.append(None)
        else:
            dates.append(shared + timedelta(hours=n - 20))
    return _seed_folder(synced, "Seeded", dates)


@pytest.mark.parametrize("limit", [1, 4, 15, 44, 45, 500])
def test_cursor_walk_ties_and_undated_each_once(synced: Mailbox, seeded: str, limit: int) -> None:
    with transaction(synced.sessions) as session:
        walked = _all_pages(synced, session, limit=limit, folder="Seeded")
        assert len(walked) == 45 and sum(m.date is None for m in walked) == 12
        assert [m.id for m in walked] == _newest_first(walked)
        everything = _all_pages(synced, session, limit=limit)
        assert len({m.id for m in everything}) == len(everything) == 45 + 34
        assert [m.id for m in everything] == _newest_first(everything)
        # Undated messages come last, and a date filter leaves them out.
        assert all(m.date is None for m in everything[-12:])
        dated = _all_pages(synced, session, limit=limit, since=BASE_DATE - timedelta(days=1))
        assert len(dated) == 45 + 34 - 12 and [m.id for m in dated] == _newest_first(dated)


def test_page_names_each_message_folder(synced: Mailbox, seeded: str) -> None:
    with transaction(synced.sessions) as session:
        rows, _ = reads.list_messages_named(session, synced.principal, synced.account_id, limit=500)
        names = {f.id: f.name for f in reads.list_folders(session, synced.principal, synced.account_id)}
        assert len(rows) == 79 and all(name == names[m.folder_id] for m, name in rows)
        assert {name for _, name in rows} == {"INBOX", "Sent", "Seeded"}


@pytest.fixture(scope="module")
def big_folder(synced: Mailbox) -> str:
    """5,000 messages in one folder, analysed as sync does after a large first walk."""
    folder_id = _seed_folder(
        synced, "Big", [BASE_DATE + timedelta(seconds=n // 2) if n % 97 else None for n in range(5000)]
    )
    with transaction(synced.sessions) as session:
        session.execute(update(Folder).where(Folder.id == folder_id).values(message_count=5000))
        assert read_stats.analyze_after_first_walk(session, folder_id)
    return folder_id


def _plan_of_list(mb: Mailbox, **kwargs: Any) -> list[str]:
    """The database's plan for the SELECT that list_messages really runs."""
    engine = mb.sessions.kw["bind"]
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM messages" in statement:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with transaction(mb.sessions) as session:
            reads.list_messages(session, mb.principal, mb.account_id, **kwargs)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    statement, parameters = seen[-1]
    explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(explain + statement, parameters).all()
    return [str(row[-1]) for row in rows]


@pytest.mark.parametrize("cursor_page", [False, True])
def test_newest_page_is_an_index_range_scan(synced: Mailbox, big_folder: str, cursor_page: bool) -> None:
    cursor = None
    if cursor_page:
        with transaction(synced.sessions) as session:
            _, cursor = reads.list_messages(
                session, synced.principal, synced.account_id, folder="Big", limit=20
            )
    plan = "\n".join(_plan_of_list(synced, folder="Big", limit=20, cursor=cursor))
    if synced.sessions.kw["bind"].dialect.name == "sqlite":
        assert "USING INDEX ix_messages_folder_order" in plan and "TEMP B-TREE" not in plan, plan
    else:
        assert "Index Scan using ix_messages_folder_order" in plan and "Sort" not in plan, plan
    account_plan = "\n".join(_plan_of_list(synced, limit=20, cursor=cursor))
    assert "ix_messages_account_order" in account_plan, account_plan
    assert "Sort" not in account_plan and "TEMP B-TREE" not in account_plan, account_plan


def test_first_sync_of_a_large_folder_analyses(synced: Mailbox, backend: Any) -> None:
    sessions, settings = backend
    mb = new_mailbox(synced.server, sessions, settings, synced.box)
    mb.append("INBOX", make_messages(read_stats.ANALYZE_MIN_ROWS, size_hint=300))
    engine = sessions.kw["bind"]

    def analysed() -> Any:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                return connection.exec_driver_sql(
                    "SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'messages'"
                ).scalar()
            # last_analyze is set by a manual ANALYZE only, never by autovacuum.
            return connection.exec_driver_sql(
                "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'messages'"
            ).scalar()

    if engine.dialect.name == "sqlite":
        with engine.begin() as connection:  # forget earlier statistics
            connection.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE tbl = 'messages'")
    before = analysed()
    mb.sync()
    assert mb.folder("INBOX").message_count == read_stats.ANALYZE_MIN_ROWS
    after = analysed()
    assert after and after != before
