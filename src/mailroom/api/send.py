"""``POST /api/accounts/{id}/send`` and the account's outbox.

The send route alone takes bodies larger than the API's 1 MiB: its limit follows
``MAILROOM_SEND_MAX_BYTES`` (content after base64 decoding), raised for this route only by
:func:`allow_large_send_bodies` before the body is read."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from flask import Response, g, jsonify, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailroom.api.accounts import accepted
from mailroom.api.common import ERRORS, SECURITY
from mailroom.auth import principal
from mailroom.context import db_session, state
from mailroom.schemas import AccountPath, ErrorResponse, TaskAccepted
from services import accounts
from services.errors import NotFound, ValidationFailed
from services.models import OutboxEntry, TaskRecord, is_id
from services.send.outbox import accept_send, outbox_view
from services.send.request import SendRequest
from services.settings import Settings
from tasks.dispatch import dispatch

tag = Tag(name="send", description="Sending mail from an account")
bp = APIBlueprint("send", __name__, url_prefix="/api/accounts", abp_tags=[tag], abp_security=SECURITY)

SEND_RULE = "/api/accounts/<account_id>/send"
#: Room for the JSON around the base64 text (field names, bodies' escaping).
BODY_SLACK = 1024 * 1024
_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


def body_limit(max_bytes: int) -> int:
    """The send route's HTTP body limit: base64 makes content 4/3 larger, plus slack."""
    return max_bytes * 4 // 3 + BODY_SLACK


def allow_large_send_bodies() -> None:
    """``before_request``, registered before the body is first read: the send route's body
    may be as large as its content limit needs; every other route keeps the 1 MiB."""
    rule = request.url_rule.rule if request.url_rule is not None else ""
    if request.method == "POST" and rule == SEND_RULE:
        request.max_content_length = body_limit(state().settings.send_max_bytes)


def max_schedule_delay(settings: Settings) -> float:
    """How far ahead ``send_at`` may be: the setting, and below the time a worker may hold
    the message before the broker hands it to another (its visibility timeout) less one
    attempt's hard limit and the longest retry delay."""
    held = settings.broker_visibility_timeout - settings.task_hard_time_limit - settings.retry_max_seconds
    return max(0.0, min(float(settings.send_schedule_max_seconds), held))


class SendAccepted(TaskAccepted):
    outbox_id: str
    message_id: str = Field(description="The Message-ID header Mailroom gave the message.")


class SentCopy(BaseModel):
    folder: str
    uid: int | None
    message_id: str | None = Field(description="The Mailroom id of the stored Sent copy.")


class OutboxOut(BaseModel):
    id: str
    account_id: str
    task_id: str | None
    state: str = Field(description="queued, sending, accepted (the SMTP server took it), sent, failed")
    message_id: str
    subject: str
    recipients: list[str]
    size: int
    send_at: datetime | None
    accepted_at: datetime | None
    sent_at: datetime | None
    smtp_reply: str | None
    refused: dict[str, str] = Field(description="Recipients the server refused: address → code and text.")
    sent_copy: SentCopy | None
    error: str | None
    created_at: datetime


class OutboxPath(AccountPath):
    outbox_id: str


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not set(key) <= _KEY_CHARS:
        raise ValidationFailed(
            "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces",
            details=[{"loc": ["header", "Idempotency-Key"], "msg": "invalid", "type": "value_error"}],
        )
    return key


@bp.before_request
def _account_first() -> None:
    """Another tenant's (or an unknown) account is a 404 before the body is validated, as on
    every route: whether a body would have been valid says nothing about someone else's
    account."""
    account_id = (request.view_args or {}).get("account_id")
    if request.method == "POST" and isinstance(account_id, str):
        # Kept for the route: the send reads the account once per request.
        g.send_account = accounts.sending_account(db_session(), account_id, principal())


@bp.post(
    "/<account_id>/send",
    responses={200: SendAccepted, 202: SendAccepted, 413: ErrorResponse, **ERRORS},
)
def send_message(path: AccountPath, body: SendRequest) -> tuple[Response, int]:
    """Queue a message. Mailroom builds it once (From is the account, plus Date and a
    Message-ID on its domain), stores it and sends it exactly once. With an
    ``Idempotency-Key`` header, repeating the request returns the first one's task (200);
    the same key with another body is a 409. Content over the size limit is a 413."""
    st = state()
    result = accept_send(
        partial(dispatch, st.celery),
        db_session(),
        principal(),
        g.send_account,
        body,
        idempotency_key=_idempotency_key(),
        max_bytes=st.settings.send_max_bytes,
        max_delay=max_schedule_delay(st.settings),
    )
    return accepted(
        result.record,
        created=result.created,
        model=SendAccepted,
        status=202 if result.created else 200,
        outbox_id=result.outbox.id,
        message_id=result.outbox.message_id_header,
    )


def _task_states(session: Session, rows: list[OutboxEntry]) -> dict[str, str]:
    ids = [r.task_id for r in rows if r.task_id]
    if not ids:
        return {}
    return dict(session.execute(select(TaskRecord.id, TaskRecord.state).where(TaskRecord.id.in_(ids))).all())


def _outbox_json(row: OutboxEntry, task_state: str | None) -> dict[str, Any]:
    return OutboxOut.model_validate(outbox_view(row, task_state)).model_dump(mode="json")


@bp.get("/<account_id>/outbox/<outbox_id>", responses={200: OutboxOut, **ERRORS})
def get_outbox_entry(path: OutboxPath) -> Response:
    """One message sent (or being sent) from the account: its state, the server's reply,
    refused recipients and where its Sent copy is."""
    session = db_session()
    account = accounts.get_account(session, path.account_id, principal())
    row = session.get(OutboxEntry, path.outbox_id) if is_id(path.outbox_id) else None
    if row is None or row.account_id != account.id:
        raise NotFound("outbox entry not found")
    return jsonify(_outbox_json(row, _task_states(session, [row]).get(row.task_id or "")))


class OutboxPage(BaseModel):
    items: list[OutboxOut]


class OutboxQuery(BaseModel):
    state: str | None = Field(
        default=None,
        pattern="^(scheduled|queued|sending|accepted|sent|failed|cancelled)$",
        description="Only messages in this state, e.g. scheduled ones still waiting (cancellable).",
    )


@bp.get("/<account_id>/outbox", responses={200: OutboxPage, **ERRORS})
def list_outbox(path: AccountPath, query: OutboxQuery) -> Response:
    """The account's newest 100 messages sent through Mailroom (of one ``state`` if given),
    newest first. A scheduled one is cancelled with ``POST /api/tasks/{task_id}/cancel``."""
    session = db_session()
    account = accounts.get_account(session, path.account_id, principal())
    wanted = OutboxEntry.account_id == account.id
    if query.state in ("queued", "scheduled", "cancelled", "failed"):
        # A waiting row's cancel or failure shows in its task record: decide below.
        stored = ["queued", "scheduled", query.state]
    else:
        stored = [query.state] if query.state else []
    statement = select(OutboxEntry).where(wanted)
    if stored:
        statement = statement.where(OutboxEntry.state.in_(stored))
    rows = list(
        session.scalars(statement.order_by(OutboxEntry.created_at.desc(), OutboxEntry.id.desc()).limit(100))
    )
    states = _task_states(session, rows)
    items = [_outbox_json(r, states.get(r.task_id or "")) for r in rows]
    if query.state:
        items = [i for i in items if i["state"] == query.state]
    return jsonify({"items": items})
