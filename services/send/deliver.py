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
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services import accounts, task_records
from services.crypto import SecretBox
from services.db import transaction
from services.errors import MailError, NotFound, TaskCancelled
from services.mail.hosts import resolve_host
from services.mail.imap import ImapEndpoint
from services.mail.smtp import SendOutcome, process_pool
from services.models import Account, OutboxEntry, OutboxState, utcnow
from services.send import imap_pool, sent
from services.settings import Settings

#: States in which the SMTP transaction may still have to happen.
NOT_YET_SENT = {OutboxState.QUEUED.value, OutboxState.SCHEDULED.value, OutboxState.SENDING.value}


def _load(session: Session, outbox_id: str, account_id: str) -> OutboxEntry:
    row = session.get(OutboxEntry, outbox_id, with_for_update=True)
    if row is None or row.account_id != account_id:
        raise NotFound("outbox entry not found")
    return row


def deliver(
    sessions: sessionmaker[Session],
    outbox_id: str,
    *,
    account_id: str,
    task_id: str,
    box: SecretBox,
    settings: Settings,
    progress: Callable[[float, str], None],
) -> dict[str, Any]:
    """Send the outbox row's message and file its Sent copy; returns the task's result.
    ``progress`` is called (a cancel checkpoint) only while waiting for the send rate."""
    with transaction(sessions) as session:
        row = _load(session, outbox_id, account_id)
        if row.task_id is None:
            row.task_id = task_id  # the API died between its two commits
        before = row.state
        stop = before in NOT_YET_SENT and task_records.must_stop(session, task_id)
        if before in NOT_YET_SENT:
            # A cancel that came in since the attempt started still stops the send here.
            row.state = (OutboxState.CANCELLED if stop else OutboxState.SENDING).value
            if stop:
                row.raw = None
        account = session.get(Account, account_id)
        assert account is not None
        smtp = accounts.smtp_endpoint(account, box)
        imap = accounts.imap_endpoint(account, box)
        raw, message_id, save_sent = row.raw, row.message_id_header, row.save_sent
        sender, recipients = row.envelope_from, list(row.recipients)
    if stop:
        raise TaskCancelled()
    if before in (OutboxState.SENT.value, OutboxState.FAILED.value, OutboxState.CANCELLED.value):
        return _result(sessions, outbox_id, account_id)
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
            outcome = _smtp_send(sessions, outbox_id, account_id, smtp, settings, sender, recipients, raw)
        else:
            outcome = SendOutcome(reply="found in Sent after an interrupted attempt", refused={})
        # THE REMAINING WINDOW: between the server's reply to DATA (inside _smtp_send) and
        # this commit. A worker killed there leaves the row ``sending`` although the server
        # has the message; the next attempt finds no copy in Sent (the copy is filed only
        # after this commit) and sends again. It cannot be closed from our side: SMTP has
        # no transaction id or two-phase commit, so "the server accepted" and "we recorded
        # it" can never be one atomic step; the gap is one round trip's reply plus one
        # commit, with no other work in it. Servers that file sent mail themselves close it
        # (the Message-ID lookup above finds their copy, whatever save_sent says). What it
        # costs when it opens: one more delivery of the same bytes with the same Message-ID
        # (receivers that deduplicate on Message-ID show it once), and still one Sent copy.
        with transaction(sessions) as session:
            row = _load(session, outbox_id, account_id)
            row.state = OutboxState.ACCEPTED.value
            row.accepted_at = utcnow()
            row.smtp_reply = outcome.reply
            row.refused = outcome.refused or None

    problem = None
    if save_sent:
        try:
            # An attempt that took over a row ``sending`` or ``accepted`` may find a copy
            # filed before (by its predecessor or by the server): it never appends another.
            return _file_copy(
                sessions,
                outbox_id,
                account_id,
                imap,
                settings,
                raw,
                message_id,
                resumed=before not in ("queued", "scheduled"),
            )
        except MailError as exc:
            if exc.transient:
                raise  # the next attempt resumes at ``accepted``: no second SMTP send
            problem = f"sent, but the copy could not be filed in Sent: {exc.message}"
    with transaction(sessions) as session:
        row = _load(session, outbox_id, account_id)
        _mark_sent(row, problem)
        return _result_of(row)


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
            return sent.find_copy(pooled.client, _sent_folder(pooled), message_id)
    except MailError as exc:
        if exc.transient:
            raise
        return None


def _file_copy(
    sessions: sessionmaker[Session],
    outbox_id: str,
    account_id: str,
    imap: ImapEndpoint,
    settings: Settings,
    raw: bytes,
    message_id: str,
    *,
    resumed: bool,
) -> dict[str, Any]:
    """APPEND the copy (never a second one) and, in one transaction, store its row and mark
    the outbox row ``sent``."""
    with _imap(account_id, imap, settings) as pooled:
        client = pooled.client
        folder = _sent_folder(pooled)
        # Only an attempt that took over a row left ``sending`` or ``accepted`` can find a
        # copy filed before; a first attempt reaches this point once and skips the search.
        copy = sent.find_copy(client, folder, message_id) if resumed else None
        if copy is None:
            copy = sent.append_copy(client, folder, raw, message_id)
        with transaction(sessions) as session:
            row = _load(session, outbox_id, account_id)
            row.sent_folder, row.sent_uid = copy.folder, copy.uid
            row.sent_message_id = sent.store_copy(
                session, client, copy, tenant_id=row.tenant_id, account_id=account_id
            )
            _mark_sent(row, None)
            return _result_of(row)


def _mark_sent(row: OutboxEntry, problem: str | None) -> None:
    row.state = OutboxState.SENT.value
    row.sent_at = utcnow()
    row.error = problem
    row.raw = None  # the server and the Sent folder have it now


def _result(sessions: sessionmaker[Session], outbox_id: str, account_id: str) -> dict[str, Any]:
    with transaction(sessions) as session:
        return _result_of(_load(session, outbox_id, account_id))


def _result_of(row: OutboxEntry) -> dict[str, Any]:
    return {
        "outbox_id": row.id,
        "state": row.state,
        "message_id": row.message_id_header,
        "recipients": row.recipients,
        "accepted": [r for r in row.recipients if r not in (row.refused or {})],
        "refused": row.refused or {},
        "smtp_reply": row.smtp_reply,
        "error": row.error,
        "sent_copy": {"folder": row.sent_folder, "uid": row.sent_uid, "message_id": row.sent_message_id}
        if row.sent_folder
        else None,
    }
