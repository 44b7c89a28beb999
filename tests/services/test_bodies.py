"""Body fetches (services.bodies) against the real Dovecot with its command log, the real
broker Redis and PostgreSQL: the size cap, the cache, the per-tenant concurrency limit."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from services import bodies
from services.crypto import SecretBox
from services.db import transaction
from services.errors import TooManyRequests, TransientMailError
from services.models import Account, BodyCacheEntry
from services.settings import Settings
from services.tenant_slots import TenantSlots
from tests.servers import mailgen
from tests.servers.dovecot import DovecotServer
from tests.servers.redis import RedisServer
from tests.services.conftest import make_settings
from tests.services.mailboxes import Mailbox, new_mailbox

CAP = 16 * 1024
ATTACHMENT = bytes(range(256)) * 400  # 100 KiB, 133 KiB in base64


@pytest.fixture(scope="module")
def body_settings(sync_settings: Settings, fernet_key: str, broker: RedisServer) -> Settings:
    return make_settings(
        sync_settings.database_url,
        fernet_key,
        broker_url=broker.url,
        body_max_bytes=CAP,
        body_fetch_concurrency=2,
    )


@pytest.fixture(scope="module")
def mb(
    sync_dovecot: DovecotServer, db_sessions: sessionmaker[Session], body_settings: Settings, box: SecretBox
) -> Mailbox:
    """INBOX: a small message, one with a 100 KiB attachment, one with a 40 KiB text."""
    mailbox = new_mailbox(sync_dovecot, db_sessions, body_settings, box)
    mailbox.append(
        "INBOX",
        [
            mailgen.message("small", "Just a line.", sender="a@example.com", to="me@example.com"),
            mailgen.message(
                "with attachment",
                "See the attached file.",
                sender="a@example.com",
                to="me@example.com",
                attachment=("data.bin", ATTACHMENT),
            ),
            mailgen.message("long text", "word " * 8000, sender="a@example.com", to="me@example.com"),
        ],
    )
    mailbox.sync()
    return mailbox


def _message_id(mb: Mailbox, subject: str) -> str:
    return next(m.id for m in mb.messages("INBOX") if m.subject == subject)


def _fetch(mb: Mailbox, subject: str, settings: Settings | None = None) -> dict[str, Any]:
    with transaction(mb.sessions) as session:
        return bodies.fetch_body(
            session, mb.principal, _message_id(mb, subject), box=mb.box, settings=settings or mb.settings
        )


def _fetches(mb: Mailbox, mark: dict[str, int]) -> list[str]:
    return [c for c in mb.server.imap_commands(mb.user, since=mark) if "FETCH" in c]


def test_small_message_whole_then_from_the_cache(mb: Mailbox) -> None:
    mark = mb.server.rawlog_mark(mb.user)
    body = _fetch(mb, "small")
    assert body["truncated"] is False and body["text"].strip() == "Just a line."
    assert body["headers"]["Subject"] == "small"
    # Never more than the cap plus one byte on the wire, even when the stored size fits.
    assert any(f"BODY.PEEK[]<0.{CAP + 1}>" in c for c in _fetches(mb, mark))

    again_mark = mb.server.rawlog_mark(mb.user)
    assert _fetch(mb, "small") == body
    # The second read sent the IMAP server nothing at all: no session, no command.
    assert mb.server.imap_commands(mb.user, since=again_mark) == []
    assert set(mb.server.rawlog_mark(mb.user)) == set(again_mark)


def test_large_attachment_answers_with_parts_and_text(mb: Mailbox) -> None:
    mark = mb.server.rawlog_mark(mb.user)
    body = _fetch(mb, "with attachment")
    assert body["truncated"] is True
    assert body["text"].strip() == "See the attached file."
    assert body["headers"]["Subject"] == "with attachment"
    assert body["size"] > 100 * 1024
    sections = {p["section"]: p for p in body["parts"]}
    assert sections["1"]["content_type"] == "text/plain"
    assert sections["2"]["filename"] == "data.bin" and sections["2"]["encoding"] == "base64"
    # Size from BODYSTRUCTURE (base64 length * 3/4): within a line break per 76 chars.
    assert abs(sections["2"]["size"] - len(ATTACHMENT)) < len(ATTACHMENT) * 0.03
    assert [a["filename"] for a in body["attachments"]] == ["data.bin"]
    fetches = _fetches(mb, mark)
    # The attachment never crossed the wire: only its structure and the text part did.
    assert not any("BODY.PEEK[2]" in c for c in fetches), fetches
    assert any("BODYSTRUCTURE" in c for c in fetches) and any("BODY.PEEK[1]<0." in c for c in fetches)


def test_long_text_is_cut_to_half_the_cap(mb: Mailbox) -> None:
    body = _fetch(mb, "long text")
    assert body["truncated"] is True
    assert body["text"].startswith("word word") and len(body["text"]) <= CAP // 2
    assert body["parts"] == [
        {
            "section": "1",
            "content_type": "text/plain",
            "encoding": body["parts"][0]["encoding"],
            "charset": "utf-8",
            "size": body["parts"][0]["size"],
            "disposition": None,
            "filename": None,
        }
    ]
    assert body["parts"][0]["size"] >= 40_000


def test_tenant_limit_holds_across_clients(mb: Mailbox, broker: RedisServer, body_settings: Settings) -> None:
    tenant = f"t-{uuid.uuid4().hex}"
    # Two clients with their own connections, as two API processes would have.
    first = TenantSlots(redis.Redis.from_url(broker.url), "test", limit=2, hold_seconds=30, wait_seconds=0)
    second = TenantSlots(redis.Redis.from_url(broker.url), "test", limit=2, hold_seconds=30, wait_seconds=0)
    a, b = first.try_take(tenant), second.try_take(tenant)
    assert a and b and second.try_take(tenant) is None and first.try_take(tenant) is None
    assert first.try_take(f"other-{tenant}") is not None  # another tenant is not affected
    first.release(tenant, a)
    c = second.try_take(tenant)
    assert c is not None
    with pytest.raises(TooManyRequests) as refused, second.slot(tenant):
        pass
    assert refused.value.status == 429 and refused.value.retry_after == 1


def test_a_dead_holders_slot_expires(broker: RedisServer) -> None:
    tenant = f"t-{uuid.uuid4().hex}"
    slots = TenantSlots(redis.Redis.from_url(broker.url), "test", limit=1, hold_seconds=0.5, wait_seconds=0)
    assert slots.try_take(tenant) is not None  # never released, as by a killed process
    assert slots.try_take(tenant) is None
    time.sleep(0.7)
    assert slots.try_take(tenant) is not None


def test_fetch_over_the_limit_is_refused_and_cached_bodies_still_served(mb: Mailbox) -> None:
    _fetch(mb, "small")  # cached (maybe already)
    slots = bodies.body_slots(mb.settings)
    held = [slots.try_take(mb.principal.tenant_id) for _ in range(2)]
    assert all(held)
    try:
        with transaction(mb.sessions) as session:
            fresh = next(m for m in mb.messages("INBOX") if m.subject == "with attachment")
            # Drop its cache entry so the read needs the server again.
            session.execute(
                delete(BodyCacheEntry).where(
                    BodyCacheEntry.tenant_id == mb.principal.tenant_id,
                    BodyCacheEntry.uid == fresh.uid,
                )
            )
        mark = mb.server.rawlog_mark(mb.user)
        with pytest.raises(TooManyRequests):
            _fetch(mb, "with attachment")
        assert _fetch(mb, "small")["truncated"] is False
        assert mb.server.imap_commands(mb.user, since=mark) == []
    finally:
        for token in held:
            assert token is not None
            slots.release(mb.principal.tenant_id, token)
    assert _fetch(mb, "with attachment")["truncated"] is True


def test_cache_is_bounded_per_tenant(mb: Mailbox, body_settings: Settings) -> None:
    tight = body_settings.model_copy(update={"body_cache_tenant_bytes": 6000})
    with transaction(mb.sessions) as session:
        session.execute(delete(BodyCacheEntry).where(BodyCacheEntry.tenant_id == mb.principal.tenant_id))
    for subject in ("small", "long text", "with attachment"):
        _fetch(mb, subject, tight)
    with transaction(mb.sessions) as session:
        sizes = session.scalars(
            select(BodyCacheEntry.size).where(BodyCacheEntry.tenant_id == mb.principal.tenant_id)
        ).all()
    assert sum(sizes) <= 6000 and len(sizes) >= 1


def test_a_server_that_does_not_answer_times_out(mb: Mailbox, body_settings: Settings) -> None:
    """A server that accepts the connection and then says nothing: the fetch gives up after
    body_fetch_timeout_seconds with a transient mail error (502), and frees its slot."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    silent = body_settings.model_copy(update={"body_fetch_timeout_seconds": 0.5})
    message = next(m for m in mb.messages("INBOX") if m.subject == "long text")
    with transaction(mb.sessions) as session:
        account = session.get(Account, mb.account_id)
        assert account is not None
        real_port, account.imap_port = account.imap_port, listener.getsockname()[1]
    try:
        with transaction(mb.sessions) as session:
            session.execute(delete(BodyCacheEntry).where(BodyCacheEntry.uid == message.uid))
            with pytest.raises(TransientMailError, match="timed out"):
                bodies.fetch_body(session, mb.principal, message.id, box=mb.box, settings=silent)
        assert bodies.body_slots(silent).holders(mb.principal.tenant_id) == 0
    finally:
        with transaction(mb.sessions) as session:
            session.execute(update(Account).where(Account.id == mb.account_id).values(imap_port=real_port))
        listener.close()
        for connection in accepted:
            connection.close()


def test_raw_8bit_headers_and_file_names_read_as_in_the_list(mb: Mailbox) -> None:
    """A Subject and a file name in raw 8-bit bytes (no encoded words), as old mailers write
    them: the body's headers and attachments show what the message list shows (UTF-8 where
    valid, else Latin-1), never U+FFFD."""
    mb.append(
        "INBOX",
        [
            b"From: Ren\xe9 <rene@example.test>\r\nTo: me@example.com\r\nSubject: raw 8bit \xe9t\xe9\r\n"
            b"X-Folded: one\r\n two\r\nDate: Mon, 02 Feb 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--B\r\nContent-Type: application/pdf\r\n"
            b'Content-Disposition: attachment; filename="r\xe9sum\xe9.pdf"\r\n\r\nxx\r\n'
            b"--B\r\nContent-Type: application/pdf\r\n"
            b'Content-Disposition: attachment; filename="caf\xc3\xa9.pdf"\r\n\r\nxx\r\n--B--\r\n'
        ],
    )
    mb.sync()
    listed = next(m for m in mb.messages("INBOX") if m.subject.startswith("raw 8bit"))
    assert listed.subject == "raw 8bit été"
    body = _fetch(mb, listed.subject)
    assert body["headers"]["Subject"] == listed.subject
    assert body["headers"]["From"] == "René <rene@example.test>"
    assert body["headers"]["X-Folded"] == "one two"
    assert [a["filename"] for a in body["attachments"]] == ["résumé.pdf", "café.pdf"] == listed.attachments
