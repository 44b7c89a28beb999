"""The read side of what sync stored: folders, messages (filtered, cursor-paginated) and a
message's full body, fetched from the IMAP server on demand.

Every function takes the caller's :class:`Principal` and goes through the tenant-scoped
path: an account or message of another tenant, or (for a member) of another user, is a
:class:`NotFound`, never a hint that it exists.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, cast

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from services.accounts import imap_endpoint
from services.crypto import SecretBox
from services.errors import InvalidRequest, NotFound
from services.mail.imap import imap_session
from services.models import Account, Folder, Message
from services.settings import Settings
from services.sync.folders import visit_key
from services.tenancy import Principal, get_scoped, scoped

MAX_LIMIT = 500


def _account(session: Session, principal: Principal, account_id: str) -> Account:
    return get_scoped(session, Account, account_id, principal, what="account")


def list_folders(session: Session, principal: Principal, account_id: str) -> list[Folder]:
    """The account's folders as the last sync saw them: INBOX first, then the other
    special-use folders, then the rest by name."""
    account = _account(session, principal, account_id)
    folders = session.scalars(select(Folder).where(Folder.account_id == account.id))
    return sorted(folders, key=visit_key)


def _folder(session: Session, account: Account, ref: str) -> Folder:
    folder = session.scalar(
        select(Folder).where(Folder.account_id == account.id, or_(Folder.id == ref, Folder.name == ref))
    )
    if folder is None:
        raise NotFound(f"folder {ref!r} not found in this account")
    return folder


# --- cursor: the last row's sort key, opaque to clients ------------------------------------


def _encode_cursor(message: Message) -> str:
    key = [message.date.isoformat() if message.date else None, message.id]
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime | None, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, ident = json.loads(raw)
        if not isinstance(ident, str) or not (stamp is None or isinstance(stamp, str)):
            raise ValueError("wrong types")
        date = datetime.fromisoformat(stamp) if stamp is not None else None
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("malformed cursor; pass next_cursor from the previous page unchanged") from None
    if date is not None and date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    return date, ident


def list_messages(
    session: Session,
    principal: Principal,
    account_id: str,
    *,
    folder: str | None = None,
    unread: bool | None = None,
    flagged: bool | None = None,
    from_: str | None = None,
    subject: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Message], str | None]:
    """One page of the account's stored messages, newest first (date, then id, both
    descending; undated messages last), and the cursor of the next page (None on the last).

    Filters combine with AND: ``folder`` (name or id), ``unread``, ``flagged``, ``from_`` and
    ``subject`` (case-insensitive substrings), ``since`` (at or after) and ``until``
    (before). A malformed cursor raises :class:`InvalidRequest`."""
    account = _account(session, principal, account_id)
    query = select(Message).where(Message.account_id == account.id, Message.tenant_id == principal.tenant_id)
    if folder is not None:
        query = query.where(Message.folder_id == _folder(session, account, folder).id)
    if unread is not None:
        query = query.where(Message.seen.is_(not unread))
    if flagged is not None:
        query = query.where(Message.flagged.is_(flagged))
    if from_:
        query = query.where(Message.from_addr.icontains(from_, autoescape=True))
    if subject:
        query = query.where(Message.subject.icontains(subject, autoescape=True))
    if since is not None:
        query = query.where(Message.date >= since)
    if until is not None:
        query = query.where(Message.date < until)
    if cursor:
        after_date, after_id = _decode_cursor(cursor)
        if after_date is None:
            query = query.where(Message.date.is_(None), Message.id < after_id)
        else:
            query = query.where(
                or_(
                    Message.date < after_date,
                    and_(Message.date == after_date, Message.id < after_id),
                    Message.date.is_(None),
                )
            )
    limit = max(1, min(limit, MAX_LIMIT))
    rows = list(
        session.scalars(query.order_by(Message.date.desc().nulls_last(), Message.id.desc()).limit(limit + 1))
    )
    if len(rows) > limit:
        return rows[:limit], _encode_cursor(rows[limit - 1])
    return rows, None


def get_message(session: Session, principal: Principal, message_id: str) -> Message:
    """One stored message of an account the caller may see."""
    # cast: tenancy.scoped is typed Select[tuple[M]], which SQLAlchemy 2.1 reads as rows.
    message = cast(
        Message | None, session.scalar(scoped(Message, principal).where(Message.id == str(message_id)))
    )
    if message is None:
        raise NotFound("message not found")
    try:
        _account(session, principal, message.account_id)
    except NotFound:
        raise NotFound("message not found") from None
    return message


def fetch_body(
    session: Session, principal: Principal, message_id: str, *, box: SecretBox, settings: Settings
) -> dict[str, Any]:
    """The message's full content, fetched from the IMAP server now (``BODY.PEEK[]``, so it
    is not marked read): ``{"text", "html", "headers", "attachments"}``. A message the
    server no longer has (or whose folder changed UIDVALIDITY since the last sync) is a
    :class:`NotFound` saying so; connection faults come out as transient mail errors."""
    message = get_message(session, principal, message_id)
    account = _account(session, principal, message.account_id)
    folder = session.get(Folder, message.folder_id)
    if folder is None or message.uid <= 0:
        raise NotFound("this message is being re-synchronised with the server; try again after the next sync")
    endpoint = imap_endpoint(account, box)
    with imap_session(
        endpoint, timeout=settings.mail_timeout_seconds, allow_private=settings.allow_private_hosts
    ) as client:
        selected = client.select_folder(folder.name, readonly=True)
        if folder.uidvalidity is not None and selected.get(b"UIDVALIDITY") != folder.uidvalidity:
            raise NotFound("the folder changed on the server since the last sync; sync the account again")
        data = client.fetch([message.uid], ["BODY.PEEK[]"]).get(message.uid, {})
    raw = data.get(b"BODY[]")
    if not isinstance(raw, bytes):
        raise NotFound("the message is no longer on the server (deleted or moved since the last sync)")
    return parse_body(raw)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Text, HTML, headers and attachment list of a whole RFC 5322 message. Repeated
    header fields (Received) are joined with newlines."""
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    headers: dict[str, str] = {}
    for name, value in parsed.items():
        text = str(value)
        headers[name] = f"{headers[name]}\n{text}" if name in headers else text
    text_part = parsed.get_body(preferencelist=("plain",))
    html_part = parsed.get_body(preferencelist=("html",))
    attachments = []
    for part in parsed.walk():
        if part.is_multipart() or part is text_part or part is html_part:
            continue
        filename = part.get_filename()
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
        "headers": headers,
        "attachments": attachments,
    }


def _content(part: Any) -> str | None:
    if part is None:
        return None
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError, ValueError):
        payload = part.get_payload(decode=True)  # an unknown or lying charset
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
