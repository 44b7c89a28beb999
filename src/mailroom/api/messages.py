"""What sync stored: folders and messages, and a message's full body on demand."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from mailroom.api.common import ERRORS, SECURITY
from mailroom.auth import principal
from mailroom.context import db_session, state
from mailroom.schemas import AccountPath, ErrorResponse, Lenient, MessagePath
from services import bodies, mailbox
from services.models import Folder, Message

tag = Tag(name="messages", description="Folders and messages stored by sync")
bp = APIBlueprint("messages", __name__, url_prefix="/api", abp_tags=[tag], abp_security=SECURITY)


class FolderOut(BaseModel):
    id: str
    name: str
    special_use: str | None
    delimiter: str | None
    flags: list[str]
    message_count: int = Field(description="Messages stored by Mailroom.")
    unread_count: int
    server_message_count: int | None = Field(description="Messages on the server at the last sync.")
    uidvalidity: int | None
    uidnext: int | None
    highestmodseq: int | None
    last_synced_at: datetime | None
    last_error: str | None = Field(description="Why the last sync of this folder failed, if it did.")


class FolderList(BaseModel):
    items: list[FolderOut]


class IndicatorOut(BaseModel):
    name: str = Field(description="A stable reason name, e.g. link_text_mismatch, statistical_tokens.")
    weight: float = Field(description="What it added to the score's log-odds (negative: points to ham).")
    detail: str = Field(description="A short explanation a person can read.")


class MessageOut(BaseModel):
    id: str
    account_id: str
    folder_id: str
    folder: str
    uid: int
    message_id: str | None = Field(description="The Message-ID header.")
    in_reply_to: str | None
    subject: str
    from_: str = Field(alias="from")
    to: list[str]
    cc: list[str]
    date: datetime | None
    internal_date: datetime | None
    flags: list[str]
    seen: bool
    flagged: bool
    size: int
    snippet: str
    attachments: list[str]
    spam_score: float | None = Field(description="Calibrated probability of spam (0..1); null until checked.")
    is_spam: bool | None = Field(
        description="The verdict at the tenant's threshold (the user's own label wins); null until checked."
    )
    indicators: list[IndicatorOut] = Field(description="The reasons behind the score; [] until checked.")
    spam_label: Literal["spam", "ham"] | None = Field(description="What a user said it is, if anyone did.")


class BodyAttachmentOut(BaseModel):
    filename: str = Field(description="The part's file name, or `untitled`.")
    content_type: str
    size: int = Field(description="Bytes, decoded (estimated from the encoded size when truncated).")


class BodyPartOut(BaseModel):
    section: str = Field(description="The IMAP section number: 1, 2.1, ...")
    content_type: str
    encoding: str = Field(description="The Content-Transfer-Encoding, lower-cased.")
    charset: str | None
    size: int
    disposition: str | None
    filename: str | None


class MessageBody(BaseModel):
    text: str | None = Field(description="The text/plain body; cut to fit when truncated.")
    html: str | None = Field(description="The text/html body; cut to fit when truncated.")
    headers: dict[str, str] = Field(
        description="Header fields, decoded; a repeated field's values joined by newlines."
    )
    attachments: list[BodyAttachmentOut]
    truncated: bool = Field(description="The message is larger than the body cap: see `parts`.")
    size: int | None = Field(default=None, description="The message's size, when truncated.")
    parts: list[BodyPartOut] | None = Field(default=None, description="Every MIME leaf part, when truncated.")


class MessageDetailOut(MessageOut):
    body: MessageBody | None = Field(default=None, description="Only with `?body=1`.")


class MessagePage(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class MessageQuery(Lenient):
    folder: str | None = Field(default=None, max_length=1000, description="Folder name or id.")
    unread: bool | None = None
    flagged: bool | None = None
    is_spam: bool | None = Field(
        default=None, description="Only messages checked and judged spam (true) or not (false)."
    )
    from_: str | None = Field(
        default=None, alias="from", max_length=320, description="Substring of From, in any case."
    )
    subject: str | None = Field(
        default=None, max_length=998, description="Substring of the subject, in any case."
    )
    since: datetime | None = Field(default=None, description="Messages dated at or after (ISO 8601).")
    until: datetime | None = Field(default=None, description="Messages dated before (ISO 8601).")
    limit: int = Field(default=50, ge=1, le=mailbox.MAX_LIMIT)
    cursor: str | None = Field(default=None, max_length=500)


class BodyQuery(Lenient):
    body: bool = Field(
        default=False,
        description="Fetch the body from the IMAP server (cached; large messages are truncated).",
    )


def folder_out(folder: Folder) -> dict[str, Any]:
    return FolderOut.model_validate(folder, from_attributes=True).model_dump(mode="json")


def message_out(message: Message, folder_name: str) -> dict[str, Any]:
    return MessageOut(
        id=message.id,
        account_id=message.account_id,
        folder_id=message.folder_id,
        folder=folder_name,
        uid=message.uid,
        message_id=message.message_id_header,
        in_reply_to=message.in_reply_to,
        subject=message.subject,
        **{"from": message.from_addr},
        to=message.to_addrs or [],
        cc=message.cc_addrs or [],
        date=message.date,
        internal_date=message.internal_date,
        flags=message.flags or [],
        seen=message.seen,
        flagged=message.flagged,
        size=message.size,
        snippet=message.snippet,
        attachments=message.attachments or [],
        spam_score=message.spam_score,
        is_spam=message.is_spam,
        indicators=message.indicators or [],  # type: ignore[arg-type]
        spam_label=message.spam_label,  # type: ignore[arg-type]
    ).model_dump(mode="json", by_alias=True)


@bp.get("/accounts/<account_id>/folders", responses={200: FolderList, **ERRORS})
def list_folders(path: AccountPath) -> Response:
    """The account's folders with counts and sync state."""
    folders = mailbox.list_folders(db_session(), principal(), path.account_id)
    return jsonify({"items": [folder_out(f) for f in folders]})


@bp.get("/accounts/<account_id>/messages", responses={200: MessagePage, **ERRORS})
def list_messages(path: AccountPath, query: MessageQuery) -> Response:
    """Stored messages, newest first, filtered; cursor-paginated."""
    session = db_session()
    # The folder names come with the page (a join), not from a read of every folder.
    rows, next_cursor = mailbox.list_messages_named(
        session,
        principal(),
        path.account_id,
        folder=query.folder,
        unread=query.unread,
        flagged=query.flagged,
        is_spam=query.is_spam,
        from_=query.from_,
        subject=query.subject,
        since=query.since,
        until=query.until,
        limit=query.limit,
        cursor=query.cursor,
    )
    return jsonify({"items": [message_out(m, name) for m, name in rows], "next_cursor": next_cursor})


@bp.get("/messages/<message_id>", responses={200: MessageDetailOut, 502: ErrorResponse, **ERRORS})
def get_message(path: MessagePath, query: BodyQuery) -> Response:
    """One message's headers and snippet; with ``?body=1`` its text, HTML, headers and
    attachments, fetched from the IMAP server on demand (or from the body cache). A message
    larger than the configured cap answers with its parts and `truncated: true`; more
    concurrent body fetches than the tenant may run answer 429 with Retry-After."""
    session = db_session()
    message = mailbox.get_message(session, principal(), path.message_id)
    folder = session.get(Folder, message.folder_id)
    out = message_out(message, folder.name if folder else "")
    if query.body:
        st = state()
        out["body"] = bodies.fetch_body(session, principal(), message.id, box=st.box, settings=st.settings)
    return jsonify(out)
