"""The API's half of a send: check, build once, store, commit, dispatch.

Promises:

* Nothing is queued unless the whole request is valid, the content fits
  ``send_max_bytes`` (else :class:`PayloadTooLarge`, a 413) and the account is the
  caller's (the caller hands over the account ``accounts.get_account`` gave it, which is a
  404 for anyone else's; dispatch checks it again in the statement that records the task).
* The message is built here, once; its bytes are stored in the outbox row, committed
  together with the task record, and only the row's id travels in the broker message.
* ``Idempotency-Key``: the same key and the same body (same account) from the same tenant
  return the first request's task for as long as its outbox row exists: a final row is kept
  for ``outbox_retention_hours`` after the request (at least 24 h; services.send.retention),
  one still in flight until it ends. The same key with another body is a 409, which names
  the first task only to a caller who may see it (an admin, or the member who sent it).
* Whether the Sent copy is filed is decided here, once: the request's ``save_sent`` when
  given, else the account's ``save_sent_copy`` at this moment (a later change of the
  account's setting does not change messages already accepted).
  The key is unique per tenant in the database, so two requests racing with one key make
  one send: the loser waits on the winner's insert and then finds it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from services import task_records
from services.errors import Conflict, MailroomError, ServiceUnavailable, ValidationFailed
from services.models import Account, OutboxEntry, OutboxState, TaskRecord, TaskState, new_id, utcnow
from services.queueing import Queue
from services.send.mime import build_message
from services.send.request import SendRequest
from services.tenancy import Principal


class PayloadTooLarge(MailroomError):
    code = "payload_too_large"
    status = 413


@dataclass(frozen=True)
class Accepted:
    record: TaskRecord
    outbox: OutboxEntry
    #: False when an earlier request with the same Idempotency-Key is answered instead.
    created: bool


def request_hash(account_id: str, body: SendRequest) -> str:
    """What "the same body" means: the validated request, normalised, for this account."""
    digest = hashlib.sha256(account_id.encode())
    digest.update(b"\n")
    digest.update(body.model_dump_json().encode())
    return digest.hexdigest()


def check_size(body: SendRequest, limit: int) -> None:
    size = body.content_bytes()
    if size > limit:
        raise PayloadTooLarge(
            f"the message content is {size} bytes; this server takes at most {limit}",
            details={"size": size, "limit": limit},
        )


def scheduled_time(body: SendRequest, max_delay: float) -> datetime | None:
    """When to send: None for now (no ``send_at``, or one already past)."""
    if body.send_at is None:
        return None
    ahead = (body.send_at - utcnow()).total_seconds()
    if ahead <= 0:
        return None
    if ahead > max_delay:
        raise ValidationFailed(
            f"send_at: at most {int(max_delay)} seconds ahead",
            field="send_at",
        )
    return body.send_at


def _replay(session: Session, principal: Principal, key: str, digest: str) -> Accepted | None:
    row = session.scalar(
        select(OutboxEntry).where(
            OutboxEntry.tenant_id == principal.tenant_id, OutboxEntry.idempotency_key == key
        )
    )
    if row is None:
        return None
    # The key is the tenant's, but its task is only for those who may see it (scoped: an
    # admin, or the member who sent it): to anyone else the key is just taken, and the
    # answer names no task, not even for the same body (another account's, or the
    # admin's send from this member's account).
    visible = principal.is_admin or row.user_id == principal.user_id
    if row.request_hash != digest or not visible:
        raise Conflict(
            "this Idempotency-Key was used with a different request; use a new key for a new message",
            code="idempotency_key_reused",
            details={"task_id": row.task_id} if visible else None,
        )
    record = task_records.load_record(session, row.task_id) if row.task_id else None
    if record is None:
        raise Conflict(
            "a request with this Idempotency-Key is still being accepted; retry in a moment",
            code="idempotency_in_progress",
        )
    return Accepted(record, row, created=False)


def accept_send(
    queue: Queue,
    session: Session,
    principal: Principal,
    account: Account | Row[Any],
    body: SendRequest,
    *,
    idempotency_key: str | None,
    max_bytes: int,
    max_delay: float,
) -> Accepted:
    """Validate, build, store and queue (through ``queue``) one send from ``account`` (the
    principal's, as checked by the caller), or answer a replay of one. A ``send_at`` in the
    future is published to run then (at most ``max_delay`` ahead). When the broker cannot
    take the task, :class:`ServiceUnavailable` (503) and the Idempotency-Key is free again."""
    check_size(body, max_bytes)
    eta = scheduled_time(body, max_delay)
    digest = request_hash(account.id, body)
    if idempotency_key is not None:
        earlier = _replay(session, principal, idempotency_key, digest)
        if earlier is not None:
            return earlier
    built = build_message(body, sender=account.email, sender_name=account.name)
    # The task's id is chosen here, so that the row carries it from its INSERT and commits
    # with its task record in dispatch's one commit (no second commit to write it).
    task_id = new_id()
    now = utcnow()
    values: dict[str, Any] = {
        "id": new_id(),
        "task_id": task_id,
        "tenant_id": principal.tenant_id,
        "account_id": account.id,
        "user_id": principal.user_id,
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "state": (OutboxState.SCHEDULED if eta else OutboxState.QUEUED).value,
        "send_at": body.send_at,
        "message_id_header": built.message_id,
        "subject": body.subject,
        "envelope_from": built.envelope_from,
        "recipients": built.recipients,
        "raw": built.raw,
        "size": len(built.raw),
        "save_sent": account.save_sent_copy if body.save_sent is None else body.save_sent,
        "created_at": now,
        "updated_at": now,
    }
    try:
        # One Core INSERT (the unit of work's flush of a new object cost more than the
        # statement); the row object then joins the session as if loaded.
        session.execute(_INSERT_ROW, values)
    except IntegrityError:
        # Another request with this key inserted first (and has committed: the unique
        # index made this insert wait for it).
        session.rollback()
        assert idempotency_key is not None
        earlier = _replay(session, principal, idempotency_key, digest)
        if earlier is None:
            raise
        return earlier
    row = OutboxEntry(**values)
    make_transient_to_detached(row)
    session.add(row)
    # The row, holding its task id already, and the task record commit together inside
    # dispatch.
    try:
        result = queue(
            session,
            type="send",
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            account_id=account.id,
            params=_params(row),
            visible_to=principal,
            eta=eta,
            task_id=task_id,
        )
    except ServiceUnavailable:
        # Nothing was queued (dispatch recorded its task as failed, and the client gets a
        # 503 saying "try again"): the row ends failed and lets go of its Idempotency-Key,
        # so that the retry with the same key sends the message instead of finding this row.
        row.idempotency_key = None
        row.state, row.raw = OutboxState.FAILED.value, None
        row.error = "the task queue was unavailable; nothing was sent"
        session.commit()
        raise
    return Accepted(result.record, row, created=True)


_INSERT_ROW = insert(cast(Table, OutboxEntry.__table__))


def _params(row: OutboxEntry) -> dict[str, Any]:
    # What the task record shows and the broker message carries: never the message.
    return {"outbox_id": row.id, "message_id": row.message_id_header}


def effective_state(row: OutboxEntry, task_state: str | None) -> str:
    """The row's state; for a row still waiting, ``cancelled`` or ``failed`` when its task
    ended so (cancelled before it ran, or out of retries after 4xx replies): the worker
    then never wrote the row again, so the task record is what says so."""
    waiting = row.state in (OutboxState.QUEUED.value, OutboxState.SCHEDULED.value)
    if waiting and task_state == TaskState.CANCELLED.value:
        return OutboxState.CANCELLED.value
    if waiting and task_state == TaskState.FAILED.value:
        return OutboxState.FAILED.value
    return row.state


def outbox_view(row: OutboxEntry, task_state: str | None) -> dict[str, Any]:
    """What a client sees of an outbox row."""
    return {
        "id": row.id,
        "account_id": row.account_id,
        "task_id": row.task_id,
        "state": effective_state(row, task_state),
        "message_id": row.message_id_header,
        "subject": row.subject,
        "recipients": row.recipients,
        "size": row.size,
        "send_at": row.send_at,
        "accepted_at": row.accepted_at,
        "sent_at": row.sent_at,
        "smtp_reply": row.smtp_reply,
        "refused": row.refused or {},
        "sent_copy": {"folder": row.sent_folder, "uid": row.sent_uid, "message_id": row.sent_message_id}
        if row.sent_folder
        else None,
        "error": row.error,
        "created_at": row.created_at,
    }
