"""A message's full content for ``GET /api/messages/{id}?body=1``: fetched from the IMAP
server on demand, bounded, and cached.

What it promises:

* **Size.** At most ``body_max_bytes`` of the message crosses the wire. A larger message
  answers with its headers, its MIME parts as BODYSTRUCTURE describes them (section, type,
  size, file name) and its text and HTML parts cut to half the cap each, with
  ``truncated: true``. BODYSTRUCTURE plus part fetches rather than a prefix
  (``BODY.PEEK[]<0.N>``): a prefix of a large message is mostly the start of its first
  attachment, cut mid-part, and says nothing of the parts after the cut; the structure
  lists every part at no transfer cost and the text parts are fetched by section.
* **Time.** ``body_fetch_timeout_seconds`` bounds connect, login and each command, and the
  commands after login share one deadline of that length.
* **Concurrency.** At most ``body_fetch_concurrency`` fetches per tenant at once across all
  API processes (:class:`services.tenant_slots.TenantSlots` on the broker Redis); one more
  is a 429 with Retry-After.
* **Cache.** A fetched body is kept in ``body_cache`` (the database) under folder,
  UIDVALIDITY and UID, for ``body_cache_ttl_seconds``, at most ``body_cache_tenant_bytes``
  per tenant (oldest dropped first); a second read does not touch the IMAP server. The
  database rather than Redis: the only Redis servers are the broker and the result
  backend, which must never evict (a lost task message is a lost task), so filling them
  with bodies would put tasks at risk; a table is tenant-scoped like every other row,
  disappears with its account or folder (cascade) and needs no new server.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from email.message import Message as HeaderBlock
from email.parser import BytesParser
from typing import Any

import imapclient
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.accounts import imap_endpoint
from services.crypto import SecretBox
from services.errors import NotFound, TransientMailError
from services.mail.imap import imap_session
from services.mailbox import get_message
from services.models import Account, BodyCacheEntry, Folder, Message, utcnow
from services.settings import Settings
from services.sync.bodystructure import _disposition, _param, decode_transfer
from services.sync.parse import bytes_to_text, decode_charset, decode_words
from services.tenancy import Principal, get_scoped
from services.tenant_slots import TenantSlots, broker_redis

#: Header block of a truncated message: more than this is not a real mail header.
HEADER_BYTES = 256 * 1024
#: Parts listed for a truncated message.
MAX_PARTS = 200


def body_slots(settings: Settings) -> TenantSlots:
    """The per-tenant limit on body fetches. A slot outlives a dead holder by at most the
    worst case of one fetch: connect, login and the shared deadline, one timeout each."""
    return TenantSlots(
        broker_redis(settings),
        "body fetches",
        limit=settings.body_fetch_concurrency,
        hold_seconds=3 * settings.body_fetch_timeout_seconds + 2,
    )


def fetch_body(
    session: Session, principal: Principal, message_id: str, *, box: SecretBox, settings: Settings
) -> dict[str, Any]:
    """The message's content: ``{"text", "html", "headers", "attachments", "truncated"}``
    (plus ``"parts"`` when truncated), from the cache or from the IMAP server
    (``BODY.PEEK``, so it is not marked read). A message the server no longer has (or whose
    folder changed UIDVALIDITY since the last sync) is a :class:`NotFound` saying so;
    connection faults and timeouts are transient mail errors (502); over the tenant's
    concurrency limit, :class:`TooManyRequests` (429)."""
    message = get_message(session, principal, message_id)
    account = get_scoped(session, Account, message.account_id, principal, what="account")
    folder = session.get(Folder, message.folder_id)
    if folder is None or message.uid <= 0:
        raise NotFound("this message is being re-synchronised with the server; try again after the next sync")
    cached = _cached(session, folder, message)
    if cached is not None:
        return cached
    with body_slots(settings).slot(principal.tenant_id):
        body = _fetch(account, folder, message, box=box, settings=settings)
    _store(session, folder, message, body, settings)
    return body


# --- IMAP --------------------------------------------------------------------------------


def _fetch(
    account: Account, folder: Folder, message: Message, *, box: SecretBox, settings: Settings
) -> dict[str, Any]:
    cap = settings.body_max_bytes
    timeout = settings.body_fetch_timeout_seconds
    with imap_session(
        imap_endpoint(account, box), timeout=timeout, allow_private=settings.allow_private_hosts
    ) as c:
        deadline = time.monotonic() + timeout

        def command() -> imapclient.IMAPClient:
            # One deadline for everything after login, not a fresh timeout per command.
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransientMailError("body fetch: timed out talking to the IMAP server")
            c.socket().settimeout(left)
            return c

        selected = command().select_folder(folder.name, readonly=True)
        if folder.uidvalidity is not None and selected.get(b"UIDVALIDITY") != folder.uidvalidity:
            raise NotFound("the folder changed on the server since the last sync; sync the account again")
        if message.size <= cap:
            # The stored size says it fits; fetch one byte more than the cap to be sure.
            data = command().fetch([message.uid], [f"BODY.PEEK[]<0.{cap + 1}>"]).get(message.uid, {})
            raw = next((v for k, v in data.items() if k.startswith(b"BODY[]")), None)
            if raw is None:
                raise NotFound(
                    "the message is no longer on the server (deleted or moved since the last sync)"
                )
            if len(raw) <= cap:
                return {**parse_body(raw), "truncated": False}
        return _fetch_truncated(command, message.uid, cap)


def _fetch_truncated(command: Any, uid: int, cap: int) -> dict[str, Any]:
    items = ["BODYSTRUCTURE", f"BODY.PEEK[HEADER]<0.{HEADER_BYTES}>", "RFC822.SIZE"]
    data = command().fetch([uid], items).get(uid, {})
    structure = data.get(b"BODYSTRUCTURE")
    if structure is None:
        raise NotFound("the message is no longer on the server (deleted or moved since the last sync)")
    header = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER]")), b"") or b""
    parts = list_parts(structure)
    chosen = {
        sub: next((p for p in parts if p["content_type"] == f"text/{sub}" and not p["filename"]), None)
        for sub in ("plain", "html")
    }
    wanted = {sub: p for sub, p in chosen.items() if p is not None}
    texts: dict[str, str | None] = {"plain": None, "html": None}
    if wanted:
        per_part = cap // 2
        fetched = command().fetch(
            [uid], [f"BODY.PEEK[{p['section']}]<0.{per_part}>" for p in wanted.values()]
        )
        answer = fetched.get(uid, {})
        for sub, part in wanted.items():
            raw = next(
                (v for k, v in answer.items() if k.startswith(f"BODY[{part['section']}]".encode())), b""
            )
            texts[sub] = decode_charset(
                decode_transfer(raw or b"", part["encoding"]), part["charset"] or "us-ascii"
            )
    parsed = BytesParser(policy=policy.default).parsebytes(header, headersonly=True)
    return {
        "text": texts["plain"],
        "html": texts["html"],
        "headers": _headers(parsed),
        "attachments": [
            {"filename": p["filename"] or "untitled", "content_type": p["content_type"], "size": p["size"]}
            for p in parts
            if p["filename"] or p["disposition"] == "attachment"
        ],
        "truncated": True,
        "size": int(data.get(b"RFC822.SIZE") or 0),
        "parts": parts,
    }


def list_parts(structure: Any) -> list[dict[str, Any]]:
    """The leaf parts BODYSTRUCTURE describes, with their IMAP section numbers ("1",
    "2.1", …), type, transfer encoding, charset, size (decoded, estimated for base64),
    disposition and file name. Attached messages are one part, not descended into."""
    parts: list[dict[str, Any]] = []

    def walk(part: Any, section: str) -> None:
        if len(parts) >= MAX_PARTS or not isinstance(part, (tuple, list)) or not part:
            return
        if isinstance(part[0], list):  # multipart: children first, then the subtype
            for number, child in enumerate(part[0], start=1):
                walk(child, f"{section}.{number}" if section else str(number))
            return
        if len(part) < 7:
            return
        encoding = _str(part[5]).lower() or "7bit"
        encoded = int(part[6]) if isinstance(part[6], int) else 0
        disposition, disposition_params = _disposition(part)
        parts.append(
            {
                "section": section or "1",
                "content_type": f"{_str(part[0]).lower()}/{_str(part[1]).lower()}",
                "encoding": encoding,
                "charset": _param(part[2], "charset"),
                "size": encoded * 3 // 4 if encoding == "base64" else encoded,
                "disposition": disposition or None,
                "filename": _param(disposition_params, "filename") or _param(part[2], "name"),
            }
        )

    walk(structure, "")
    return parts


def _str(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")


# --- parsing a whole message -------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """Text, HTML, headers and attachment list of a whole RFC 5322 message. Repeated
    header fields (Received) are joined with newlines."""
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    text_part = parsed.get_body(preferencelist=("plain",))
    html_part = parsed.get_body(preferencelist=("html",))
    attachments = []
    for part in parsed.walk():
        if part.is_multipart() or part is text_part or part is html_part:
            continue
        filename = _filename(part)
        if part.get_content_disposition() != "attachment" and not filename:
            continue
        payload = part.get_payload(decode=True)
        attachments.append(
            {
                "filename": filename or "untitled",
                "content_type": part.get_content_type(),
                "size": len(payload) if isinstance(payload, bytes) else 0,
            }
        )
    return {
        "text": _content(text_part),
        "html": _content(html_part),
        "headers": _headers(parsed),
        "attachments": attachments,
    }


def _headers(parsed: Any) -> dict[str, str]:
    """Every header field, unfolded and decoded as the message list decodes them (encoded
    words; raw 8-bit bytes as UTF-8 where valid, else Latin-1, never U+FFFD)."""
    headers: dict[str, str] = {}
    for name, value in parsed.raw_items():
        text = decode_words(_FOLD.sub("", value))
        headers[name] = f"{headers[name]}\n{text}" if name in headers else text
    return headers


_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _filename(part: Any) -> str | None:
    """The part's file name; one written in raw 8-bit bytes is read as the message list reads
    it (UTF-8 where valid, else Latin-1) instead of with U+FFFD for each byte."""
    filename = part.get_filename()
    if not filename or "\ufffd" not in filename:
        return filename  # type: ignore[no-any-return]
    header = HeaderBlock()
    for name, value in part.raw_items():
        if name.lower() in ("content-disposition", "content-type"):
            header[name] = bytes_to_text(value.encode("utf-8", "surrogateescape"))
    return header.get_filename() or filename  # type: ignore[no-any-return]


def _content(part: Any) -> str | None:
    if part is None:
        return None
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError, ValueError):
        payload = part.get_payload(decode=True)  # an unknown or lying charset
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None


# --- the cache ---------------------------------------------------------------------------


def _cached(session: Session, folder: Folder, message: Message) -> dict[str, Any] | None:
    entry = session.scalar(
        select(BodyCacheEntry).where(
            BodyCacheEntry.tenant_id == message.tenant_id,
            BodyCacheEntry.folder_id == folder.id,
            BodyCacheEntry.uidvalidity == (folder.uidvalidity or 0),
            BodyCacheEntry.uid == message.uid,
            BodyCacheEntry.expires_at > utcnow(),
        )
    )
    return json.loads(entry.content) if entry is not None else None  # type: ignore[no-any-return]


def _store(
    session: Session, folder: Folder, message: Message, body: dict[str, Any], settings: Settings
) -> None:
    """Keep ``body``; then drop the tenant's expired entries and, past its byte budget, its
    oldest ones. Runs in the request's transaction, committed with the response."""
    budget = settings.body_cache_tenant_bytes
    content = json.dumps(body, separators=(",", ":"))
    size = len(content.encode())
    if size > budget:
        return
    now = utcnow()
    tenant = BodyCacheEntry.tenant_id == message.tenant_id
    key = (
        tenant,
        BodyCacheEntry.folder_id == folder.id,
        BodyCacheEntry.uidvalidity == (folder.uidvalidity or 0),
        BodyCacheEntry.uid == message.uid,
    )
    session.execute(delete(BodyCacheEntry).where(tenant, BodyCacheEntry.expires_at <= now))
    session.execute(delete(BodyCacheEntry).where(*key))  # an expired entry of the same key
    entries = session.execute(
        select(BodyCacheEntry.id, BodyCacheEntry.size)
        .where(tenant)
        .order_by(BodyCacheEntry.created_at.desc())
    ).all()
    kept, evict = size, []
    for entry_id, entry_size in entries:
        kept += entry_size
        if kept > budget:
            evict.append(entry_id)
    if evict:
        session.execute(delete(BodyCacheEntry).where(tenant, BodyCacheEntry.id.in_(evict)))
    entry = BodyCacheEntry(
        tenant_id=message.tenant_id,
        account_id=message.account_id,
        folder_id=folder.id,
        uidvalidity=folder.uidvalidity or 0,
        uid=message.uid,
        content=content,
        size=size,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.body_cache_ttl_seconds),
    )
    try:
        with session.begin_nested():  # another request may have stored the same body just now
            session.add(entry)
    except IntegrityError:
        pass
