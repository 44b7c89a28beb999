"""The worker's half of a send: SMTP once, then the Sent copy once, whatever dies when.

The outbox row moves ``queued → sending → accepted → sent`` and each step is committed
before the next one starts:

1. ``sending`` is committed before the SMTP transaction opens.
2. ``accepted`` is committed the moment the server's reply to DATA is read, before the
   Sent copy is filed and before anything else.
3. ``sent`` is committed once the copy is filed (or is not wanted).

An attempt that finds the row ``accepted`` (its predecessor died after DATA) never talks
SMTP again: it only files the copy, after looking for the Message-ID in Sent, so the copy
is never appended twice. An attempt that finds the row ``sending`` (its predecessor died
during the SMTP transaction) first looks for the Message-ID in Sent — present when a
server files sent mail itself, or when the predecessor filed the copy and died before
recording it — and only sends when it is absent. It looks whether or not this message
wants a copy filed by Mailroom: an account whose server files sent mail itself
(``save_sent_copy`` off) is exactly where the lookup finds one.

A row that reaches ``sent``, ``failed`` or ``cancelled`` drops its message bytes in the
same transaction: no later attempt can need them (services.send.retention sweeps the rows
whose task ended without the worker writing the row).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from services import accounts
from services.crypto import SecretBox
from services.db import SCOPE_PARAM, ScopedStatement, transaction
from services.errors import MailError, NotFound, TaskCancelled
from services.mail.hosts import resolve_host
from services.mail.imap import ImapEndpoint
from services.mail.smtp import SendOutcome, process_pool
from services.models import Account, OutboxEntry, OutboxState, TaskRecord, TaskState, utcnow
from services.send import imap_pool, sent
from services.settings import Settings

#: Called with the session of the transaction that marks a row ``sent`` and the task's result.
Finish = Callable[[Session, dict[str, Any]], None]

#: States in which the SMTP transaction may still have to happen.
NOT_YET_SENT = {OutboxState.QUEUED.value, OutboxState.SCHEDULED.value, OutboxState.SENDING.value}


def _load(session: Session, outbox_id: str, account_id: str) -> OutboxEntry:
    row = session.get(OutboxEntry, outbox_id, with_for_update=True)
    if row is None or row.account_id != account_id:
        raise NotFound("outbox entry not found")
    return row


@dataclass
class _Claimed:
    """What an attempt knows of its row once it has claimed it (and learns as it goes): the
    task's result is made from this, not from another read of the row."""

    outbox_id: str
    tenant_id: str
    before: str
    message_id: str
    recipients: list[str]
    smtp_reply: str | None
    refused: dict[str, str]
    error: str | None
    sent_copy: dict[str, Any] | None

    def result(self, state: str) -> dict[str, Any]:
        return {
            "outbox_id": self.outbox_id,
            "state": state,
            "message_id": self.message_id,
            "recipients": self.recipients,
            "accepted": [r for r in self.recipients if r not in self.refused],
            "refused": self.refused,
            "smtp_reply": self.smtp_reply,
            "error": self.error,
            "sent_copy": self.sent_copy,
        }


OUTBOX = cast(Table, OutboxEntry.__table__)
ACCOUNTS = cast(Table, Account.__table__)
TASKS = cast(Table, TaskRecord.__table__)

#: What an attempt reads of its row and account (Core columns, no ORM objects).
_CLAIM_COLUMNS = (
    *(
        OUTBOX.c[name]
        for name in (
            "id",
            "tenant_id",
            "task_id",
            "state",
            "raw",
            "message_id_header",
            "save_sent",
            "envelope_from",
            "recipients",
            "smtp_reply",
            "refused",
            "error",
            "sent_folder",
            "sent_uid",
            "sent_message_id",
        )
    ),
    *(
        ACCOUNTS.c[f"{kind}_{name}"]
        for kind in ("imap", "smtp")
        for name in ("host", "port", "tls", "username", "password_enc")
    ),
)


def _claim(scoped: bool) -> Any:
    """The row (locked), its account's servers and whether the attempt of ``:task_id`` may
    go on (task_records.must_stop, inverted): one SELECT, one round trip."""
    running = (
        select(TASKS.c.id)
        .where(
            TASKS.c.id == bindparam("task_id"),
            TASKS.c.state == TaskState.RUNNING.value,
            TASKS.c.cancel_requested.is_(False),
        )
        .exists()
        .label("running")
    )
    query = (
        select(*_CLAIM_COLUMNS, running)
        .join_from(OUTBOX, ACCOUNTS, ACCOUNTS.c.id == OUTBOX.c.account_id)
        .where(OUTBOX.c.id == bindparam("outbox_id"), OUTBOX.c.account_id == bindparam("account_id"))
        .with_for_update(of=OUTBOX)
    )
    return query.where(OUTBOX.c.tenant_id == bindparam(SCOPE_PARAM)) if scoped else query


_CLAIM = ScopedStatement(_claim)


def _row_update(keys: frozenset[str]) -> ScopedStatement:
    def build(scoped: bool) -> Any:
        where = [OUTBOX.c.id == bindparam("outbox_id")]
        if scoped:
            where.append(OUTBOX.c.tenant_id == bindparam(SCOPE_PARAM))
        values = {key: bindparam(f"v_{key}", type_=OUTBOX.c[key].type) for key in keys}
        return update(OUTBOX).where(*where).values(values)

    return ScopedStatement(build)


#: One statement per set of columns written (a handful), built on first use.
_ROW_UPDATES: dict[frozenset[str], ScopedStatement] = {}


def _update(session: Session, outbox_id: str, **values: Any) -> None:
    """Write ``values`` to the row in one UPDATE (no read first: this attempt holds the task's
    message, so no other attempt writes the row meanwhile)."""
    values["updated_at"] = utcnow()
    keys = frozenset(values)
    statement = _ROW_UPDATES.get(keys)
    if statement is None:
        statement = _ROW_UPDATES[keys] = _row_update(keys)
    params = {f"v_{key}": value for key, value in values.items()}
    params["outbox_id"] = outbox_id
    if statement.execute(session, params).rowcount == 0:
        raise NotFound("outbox entry not found")  # its account was deleted meanwhile


@dataclass
class Claim:
    """What :func:`claim` read and decided: the body of the attempt goes on from this."""

    claimed: _Claimed
    #: The attempt must stop (it was cancelled before the send began).
    stop: bool
    raw: bytes | None
    save_sent: bool
    sender: str
    smtp: Any
    imap: ImapEndpoint


def claim(session: Session, outbox_id: str, *, account_id: str, task_id: str, box: SecretBox) -> Claim:
    """Take the row for the attempt of ``task_id`` in ``session``'s transaction (the one
    that marks the task's record running, so the claim costs no transaction of its own):
    lock it, read it with its account's servers, and move a row not yet sent to
    ``sending`` (or ``cancelled``, when a cancel came in before the attempt started).
    Everything that may fail is read before the one write."""
    row = _CLAIM.execute(
        session, {"outbox_id": outbox_id, "account_id": account_id, "task_id": task_id}
    ).first()
    if row is None:
        raise NotFound("outbox entry not found")
    before = row.state
    stop = before in NOT_YET_SENT and not row.running
    smtp = accounts.smtp_endpoint(row, box)
    imap = accounts.imap_endpoint(row, box)
    changes: dict[str, Any] = {}
    if row.task_id is None:
        changes["task_id"] = task_id  # the API died between its two commits
    if before in NOT_YET_SENT:
        changes["state"] = (OutboxState.CANCELLED if stop else OutboxState.SENDING).value
        if stop:
            changes["raw"] = None
    if changes:
        _update(session, outbox_id, **changes)
    claimed = _Claimed(
        outbox_id=row.id,
        tenant_id=row.tenant_id,
        before=before,
        message_id=row.message_id_header,
        recipients=list(row.recipients),
        smtp_reply=row.smtp_reply,
        refused=dict(row.refused or {}),
        error=row.error,
        sent_copy=_copy_of(row.sent_folder, row.sent_uid, row.sent_message_id),
    )
    return Claim(claimed, stop, row.raw, row.save_sent, row.envelope_from, smtp, imap)


def deliver(
    sessions: sessionmaker[Session],
    taken: Claim,
    *,
    account_id: str,
    settings: Settings,
    progress: Callable[[float, str], None],
    finish: Finish | None = None,
) -> dict[str, Any]:
    """Send the message of the row ``taken`` (by :func:`claim`, committed) and file its Sent
    copy; returns the task's result. ``progress`` is called (a cancel checkpoint) only
    while waiting for the send rate. ``finish(session, result)``, if given, is called
    inside the transaction that marks the row ``sent`` (the task's record then ends with
    it, in one commit)."""
    claimed, stop = taken.claimed, taken.stop
    outbox_id, before, message_id = claimed.outbox_id, claimed.before, claimed.message_id
    raw, save_sent, sender = taken.raw, taken.save_sent, taken.sender
    smtp, imap = taken.smtp, taken.imap
    if stop:
        raise TaskCancelled()
    if before in (OutboxState.SENT.value, OutboxState.FAILED.value, OutboxState.CANCELLED.value):
        return claimed.result(before)
    assert raw is not None

    if before in NOT_YET_SENT:
        already = None
        if before == OutboxState.SENDING.value:
            already = _look_in_sent(account_id, imap, message_id, settings)
        if already is None:
            try:
                _take_turn(sessions, outbox_id, account_id, settings.send_rate_per_account, progress)
            except TaskCancelled:
                _cancel(sessions, outbox_id, account_id)
                raise
            outcome = _smtp_send(
                sessions, outbox_id, account_id, smtp, settings, sender, claimed.recipients, raw
            )
        else:
            outcome = SendOutcome(reply="found in Sent after an interrupted attempt", refused={})
        # THE REMAINING WINDOW: between the server's reply to DATA (inside _smtp_send) and
        # this commit. A worker killed there leaves the row ``sending`` although the server
        # has the message; the next attempt finds no copy in Sent (the copy is filed only
        # after this commit) and sends again. It cannot be closed from our side: SMTP has
        # no transaction id or two-phase commit, so "the server accepted" and "we recorded
        # it" can never be one atomic step; the gap is one round trip's reply plus one
        # commit of one UPDATE, with no other work in it. Servers that file sent mail
        # themselves close it (the Message-ID lookup above finds their copy, whatever
        # save_sent says). What it costs when it opens: one more delivery of the same bytes
        # with the same Message-ID (receivers that deduplicate on Message-ID show it once),
        # and still one Sent copy.
        claimed.smtp_reply, claimed.refused = outcome.reply, outcome.refused
        with transaction(sessions) as session:
            _update(
                session,
                outbox_id,
                state=OutboxState.ACCEPTED.value,
                accepted_at=utcnow(),
                smtp_reply=outcome.reply,
                refused=outcome.refused or None,
            )

    if save_sent:
        try:
            # An attempt that took over a row ``sending`` or ``accepted`` may find a copy
            # filed before (by its predecessor or by the server): it never appends another.
            return _file_copy(
                sessions,
                claimed,
                account_id,
                imap,
                settings,
                raw,
                resumed=before not in (OutboxState.QUEUED.value, OutboxState.SCHEDULED.value),
                finish=finish,
            )
        except MailError as exc:
            if exc.transient:
                raise  # the next attempt resumes at ``accepted``: no second SMTP send
            claimed.error = f"sent, but the copy could not be filed in Sent: {exc.message}"
    result = claimed.result(OutboxState.SENT.value)
    with transaction(sessions) as session:
        _update(session, outbox_id, **_sent_values(claimed.error))
        if finish is not None:
            finish(session, result)
    return result


def _take_turn(
    sessions: sessionmaker[Session],
    outbox_id: str,
    account_id: str,
    rate: float,
    progress: Callable[[float, str], None],
) -> None:
    """Wait until the account may send again (``rate`` messages per second, over every
    worker), then record this send's start. The account row's lock makes the check and the
    record one step, so two workers never take the same turn. Waiting holds this worker;
    each wait is at most one interval and a cancel checkpoint."""
    if rate <= 0:
        return
    interval = timedelta(seconds=1 / rate)
    while True:
        with transaction(sessions) as session:
            session.execute(select(Account.id).where(Account.id == account_id).with_for_update())
            last = session.scalar(
                select(func.max(OutboxEntry.sending_at)).where(OutboxEntry.account_id == account_id)
            )
            now = utcnow()
            if last is None or now >= last + interval:
                _load(session, outbox_id, account_id).sending_at = now
                return
            wait = (last + interval - now).total_seconds()
        progress(10, "waiting for the account's send rate")
        time.sleep(wait)


def _cancel(sessions: sessionmaker[Session], outbox_id: str, account_id: str) -> None:
    with transaction(sessions) as session:
        row = _load(session, outbox_id, account_id)
        row.state = OutboxState.CANCELLED.value
        row.raw = None


def _smtp_send(
    sessions: sessionmaker[Session],
    outbox_id: str,
    account_id: str,
    smtp: Any,
    settings: Settings,
    sender: str,
    recipients: list[str],
    raw: bytes,
) -> SendOutcome:
    pinned = resolve_host(
        smtp.host, smtp.port, allow_private=settings.allow_private_hosts, field="smtp.host", tls=smtp.tls
    )
    pool = process_pool(settings.smtp_idle_seconds, settings.smtp_messages_per_connection)
    try:
        return pool.send(
            (account_id, smtp),
            pinned,
            smtp,
            timeout=settings.mail_timeout_seconds,
            sender=sender,
            recipients=recipients,
            raw=raw,
        )
    except MailError as exc:
        with transaction(sessions) as session:
            row = _load(session, outbox_id, account_id)
            if exc.transient:
                # A reply (4xx) means the server did not take the message: the next attempt
                # need not look in Sent. A network fault may have hit after DATA: stay
                # ``sending`` so it does.
                if _server_answered(exc):
                    row.state = OutboxState.QUEUED.value
            else:
                row.state = OutboxState.FAILED.value
                row.error = exc.message
                row.refused = (exc.details or {}).get("refused") if isinstance(exc.details, dict) else None
                row.raw = None
        raise


def _server_answered(exc: MailError) -> bool:
    import aiosmtplib

    cause = exc.__cause__
    return isinstance(cause, (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused))


def _imap(account_id: str, imap: ImapEndpoint, settings: Settings) -> Any:
    pool = imap_pool.process_pool(settings.smtp_idle_seconds, settings.smtp_messages_per_connection)
    return pool.session(
        (account_id, imap),
        imap,
        timeout=settings.mail_timeout_seconds,
        allow_private=settings.allow_private_hosts,
    )


def _sent_folder(pooled: Any) -> str:
    if pooled.sent_folder is None:
        pooled.sent_folder = sent.sent_folder(pooled.client)
    return str(pooled.sent_folder)


def _look_in_sent(
    account_id: str, imap: ImapEndpoint, message_id: str, settings: Settings
) -> sent.FiledCopy | None:
    """The copy of ``message_id`` in Sent, if any. A mailbox where the lookup cannot work
    (no \\Sent folder, login refused) counts as holding none, so the message is still sent;
    a transient fault retries the attempt, which looks again."""
    try:
        with _imap(account_id, imap, settings) as pooled:
            folder = _sent_folder(pooled)
            return sent.find_copy(pooled.client, folder, pooled.select(folder), message_id)
    except MailError as exc:
        if exc.transient:
            raise
        return None


def _file_copy(
    sessions: sessionmaker[Session],
    claimed: _Claimed,
    account_id: str,
    imap: ImapEndpoint,
    settings: Settings,
    raw: bytes,
    *,
    resumed: bool,
    finish: Finish | None,
) -> dict[str, Any]:
    """APPEND the copy (never a second one) and FETCH what its message row needs, then, in
    one transaction, store that row and mark the outbox row ``sent``. The IMAP work is done
    before the transaction, so the Sent folder's row is locked only for the database's part."""
    with _imap(account_id, imap, settings) as pooled:
        folder = _sent_folder(pooled)
        uidvalidity = pooled.select(folder)
        # Only an attempt that took over a row left ``sending`` or ``accepted`` can find a
        # copy filed before; a first attempt reaches this point once and skips the search.
        copy = sent.find_copy(pooled.client, folder, uidvalidity, claimed.message_id) if resumed else None
        if copy is None:
            copy = sent.append_copy(pooled.client, folder, uidvalidity, raw, claimed.message_id)
        fetched = sent.fetch_copy(pooled.client, copy)
    with transaction(sessions) as session:
        # The row of the copy first; the Sent folder's counts (a row every send of the
        # account updates) last, so that its lock is held only until the commit.
        inserted = sent.store_copy(session, copy, fetched, tenant_id=claimed.tenant_id, account_id=account_id)
        stored = inserted.message_id if inserted is not None else None
        _update(
            session,
            claimed.outbox_id,
            sent_folder=copy.folder,
            sent_uid=copy.uid,
            sent_message_id=stored,
            **_sent_values(None),
        )
        claimed.error = None
        claimed.sent_copy = _copy_of(copy.folder, copy.uid, stored)
        result = claimed.result(OutboxState.SENT.value)
        if finish is not None:
            finish(session, result)
        if inserted is not None:
            inserted.count(session)
    return result


def _sent_values(problem: str | None) -> dict[str, Any]:
    # raw: the server and the Sent folder have the message now; no attempt needs it again.
    return {"state": OutboxState.SENT.value, "sent_at": utcnow(), "error": problem, "raw": None}


def _copy_of(folder: str | None, uid: int | None, message_id: str | None) -> dict[str, Any] | None:
    return {"folder": folder, "uid": uid, "message_id": message_id} if folder else None
