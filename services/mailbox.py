"""The read side of what sync stored: folders and messages (filtered, cursor-paginated).
A message's full body is :mod:`services.bodies`.

Every function takes the caller's :class:`Principal` and goes through the tenant-scoped
path: an account or message of another tenant, or (for a member) of another user, is a
:class:`NotFound`, never a hint that it exists.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import String, and_, literal, or_, select, true, tuple_
from sqlalchemy.orm import Session

from services.db import unicode_collation
from services.errors import InvalidRequest, NotFound
from services.models import Account, Folder, Message, UTCDateTime, is_id
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
        if not is_id(ident):  # never let a crafted cursor put arbitrary text into the query
            raise ValueError("not an id")
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
    is_spam: bool | None = None,
    from_: str | None = None,
    subject: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Message], str | None]:
    """One page of the account's stored messages, newest first (date, then id, both
    descending; undated messages last), and the cursor of the next page (None on the last).
    Walking the cursors returns every message exactly once.

    Filters combine with AND: ``folder`` (name or id), ``unread``, ``flagged``, ``is_spam``
    (checked messages with that verdict; unchecked ones match neither), ``from_`` and
    ``subject`` (case-insensitive substrings), ``since`` (at or after) and ``until``
    (before). ``limit`` is clamped to 1..:data:`MAX_LIMIT`. A malformed cursor raises
    :class:`InvalidRequest`."""
    rows, next_cursor = list_messages_named(
        session,
        principal,
        account_id,
        folder=folder,
        unread=unread,
        flagged=flagged,
        is_spam=is_spam,
        from_=from_,
        subject=subject,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )
    return [message for message, _name in rows], next_cursor


def list_messages_named(
    session: Session,
    principal: Principal,
    account_id: str,
    *,
    folder: str | None = None,
    unread: bool | None = None,
    flagged: bool | None = None,
    is_spam: bool | None = None,
    from_: str | None = None,
    subject: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[tuple[Message, str]], str | None]:
    """:func:`list_messages` with each message's folder name, read in the same query."""
    account = _account(session, principal, account_id)
    query = select(Message, Folder.name).join(Folder, Folder.id == Message.folder_id)
    query = query.where(Message.tenant_id == principal.tenant_id)
    if folder is not None:
        # The folder was found in this account, so its id alone says whose messages these
        # are. Adding account_id would let the planner pick the account's index and filter
        # it for the folder: fast for INBOX, a scan of the whole account for a small folder.
        query = query.where(Message.folder_id == _folder(session, account, folder).id)
    else:
        query = query.where(Message.account_id == account.id)
    if unread is not None:
        query = query.where(Message.seen.is_(not unread))
    if flagged is not None:
        query = query.where(Message.flagged.is_(flagged))
    if is_spam is not None:
        query = query.where(Message.is_spam.is_(is_spam))
    if from_ or subject:
        # Case folded for every letter, not only A to Z (services.db.unicode_collation;
        # SQLite's lower() is Python's there).
        collation = unicode_collation(session)

        def folded(column: Any) -> Any:
            return column.collate(collation) if collation else column

        if from_:
            query = query.where(folded(Message.from_addr).icontains(from_, autoescape=True))
        if subject:
            query = query.where(folded(Message.subject).icontains(subject, autoescape=True))
    if since is not None:
        query = query.where(Message.date >= since)
    if until is not None:
        query = query.where(Message.date < until)
    limit = max(1, min(limit, MAX_LIMIT))

    # The ORDER BY is exactly the index's column order — (folder_id | account_id, date DESC
    # NULLS LAST, id DESC), see migration 0004 — so every query below is an index range scan
    # that stops after limit + 1 rows: no Sort node, whatever the folder's size. A cursor
    # is a row comparison, which the index answers as one range; "or undated" would turn
    # it into a scan of the whole folder, so undated rows (last in the order) are a second
    # query, run only when the dated ones run out.
    def page(extra: Any, want: int) -> list[tuple[Message, str]]:
        ordered = query.where(extra).order_by(Message.date.desc().nulls_last(), Message.id.desc())
        return [(row[0], row[1]) for row in session.execute(ordered.limit(want))]

    want = limit + 1
    dated_only = since is not None or until is not None
    if not cursor:
        rows = page(true(), want)
    else:
        after_date, after_id = _decode_cursor(cursor)
        if after_date is None:
            rows = page(and_(Message.date.is_(None), Message.id < after_id), want)
        else:
            after = tuple_(literal(after_date, UTCDateTime()), literal(after_id, String()))
            rows = page(tuple_(Message.date, Message.id) < after, want)
            if len(rows) < want and not dated_only:
                rows += page(Message.date.is_(None), want - len(rows))
    if len(rows) > limit:
        return rows[:limit], _encode_cursor(rows[limit - 1][0])
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
