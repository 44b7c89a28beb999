"""The task entry points. Each is a few lines: load the tenant-checked account, call a
service, report progress. The life around them (states, retries, cancel) is in lifecycle."""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app
from sqlalchemy.orm import Session

from services import accounts, mail_delete, spam_check, spam_store, task_records
from services.errors import MailroomError, Superseded, TaskCancelled
from services.send import deliver as send_deliver
from services.sync import SyncOptions, sync_account
from services.task_inputs import DeleteParams, SendParams, SpamCheckParams, SyncParams, VerifyParams
from tasks.dispatch import dispatch
from tasks.lifecycle import TaskContext, mailroom_task
from tasks.queues import QUEUES

log = logging.getLogger("mailroom.tasks")


@mailroom_task("mailroom.sync_emails", SyncParams, max_retries=QUEUES["sync"].max_retries)
def sync_emails(ctx: TaskContext) -> dict[str, Any]:
    """Bring the account's stored folders and messages up to date with the IMAP server."""
    account_id = ctx.account_id or ""
    with ctx.session() as session:
        # Confirm this task holds the account's sync lock (the API claimed it at dispatch).
        # Another holder in flight means this one was given up as lost and replaced: it
        # must not run beside the sync that replaced it.
        holder = accounts.claim_sync_lock(session, account_id, ctx.task_id)
    if holder is not None:
        raise Superseded(
            f"another sync of this account is in flight (task {holder}); this one stopped",
            details={"sync_task_id": holder},
        )
    params: SyncParams = ctx.params
    summary = sync_account(
        ctx.runtime.sessions,
        account_id,
        box=ctx.runtime.box,
        settings=ctx.settings,
        options=SyncOptions(folders=params.folders, full=params.full),
        progress=ctx.progress,
    )
    with ctx.session() as session:
        accounts.release_sync_lock(session, account_id, ctx.task_id)
    left_junk = summary.pop("left_junk", [])
    summary["left_junk"] = len(left_junk)
    _queue_spam_work(ctx, summary, left_junk)
    return summary


@mailroom_task("mailroom.verify_account", VerifyParams, max_retries=QUEUES["sync"].max_retries)
def verify_account(ctx: TaskContext) -> dict[str, Any]:
    """Log in to the account's IMAP and SMTP servers and report their capabilities."""
    ctx.progress(10, "logging in to IMAP and SMTP", force=True)
    with ctx.session() as session:
        account = ctx.load_account(session)
        result = accounts.verify_account(
            account,
            ctx.runtime.box,
            timeout=ctx.settings.mail_timeout_seconds,
            allow_private=ctx.settings.allow_private_hosts,
        )
        account.capabilities = result["imap"]["capabilities"]
    return result


def _claim_outbox_row(session: Session, ctx: TaskContext) -> None:
    # In the transaction that marks the record running: the attempt's first step is free.
    params: SendParams = ctx.params
    ctx.started = send_deliver.claim(
        session,
        params.outbox_id,
        account_id=ctx.account_id or "",
        task_id=ctx.task_id,
        box=ctx.runtime.box,
    )


@mailroom_task(
    "mailroom.send_email", SendParams, max_retries=QUEUES["send"].max_retries, begin=_claim_outbox_row
)
def send_email(ctx: TaskContext) -> dict[str, Any]:
    """Send one outbox message through the account's SMTP server and file its copy in
    \\Sent, each at most once however often the task is delivered (services.send.deliver)."""
    return send_deliver.deliver(
        ctx.runtime.sessions,
        ctx.started,
        account_id=ctx.account_id or "",
        settings=ctx.settings,
        progress=lambda percent, stage: ctx.progress(percent, stage, force=True),
        # The record ends ``succeeded`` in the commit that marks the row ``sent``.
        finish=ctx.succeed,
    )


@mailroom_task("mailroom.delete_emails", DeleteParams, max_retries=QUEUES["delete"].max_retries)
def delete_emails(ctx: TaskContext) -> dict[str, Any]:
    """Move the given messages to Trash or delete them for good (services.mail_delete).

    The delete holds the account's sync lock while it runs, and waits (retries with the
    queue's backoff) while a sync or another delete holds it. A sync beside it could see a
    moved message vanish from its folder before the delete writes its row's new place, and
    drop the row or store the Trash copy under a new id; holding the one lock rules that
    out, and a delete is short. While it runs, a sync requested for the account is answered
    with this task (as for a sync already in flight) and Beat skips the account."""
    account_id = ctx.account_id or ""
    with ctx.session() as session:
        holder = accounts.claim_sync_lock(session, account_id, ctx.task_id)
    if holder is not None:
        raise mail_delete.AccountBusy(
            f"another task is working on this account's messages (task {holder}); will retry",
            details={"task_id": holder},
        )
    params: DeleteParams = ctx.params

    def report(session: Session, percent: float, stage: str) -> BaseException | None:
        # Each batch's progress (a cancel checkpoint) commits with the batch's rows.
        return (
            TaskCancelled()
            if task_records.report_progress(session, ctx.task_id, int(percent), stage)
            else None
        )

    def finish(session: Session, result: dict[str, Any]) -> None:
        # The lock given back and the record ended ``succeeded`` in the commit of the last
        # batch's rows, instead of in two more transactions after the body returns.
        accounts.release_sync_lock(session, account_id, ctx.task_id)
        ctx.succeed(session, result)

    try:
        return mail_delete.delete_messages(
            ctx.runtime.sessions,
            account_id,
            params.message_ids,
            permanent=params.permanent,
            in_trash=params.in_trash,
            box=ctx.runtime.box,
            settings=ctx.settings,
            progress=lambda percent, stage: ctx.progress(percent, stage, force=True),
            report=report,
            finish=finish,
            batch_size=ctx.settings.delete_batch_size,
        )
    except BaseException:
        with ctx.session() as session:
            accounts.release_sync_lock(session, account_id, ctx.task_id)
        raise


@mailroom_task("mailroom.check_spam", SpamCheckParams, max_retries=QUEUES["spam"].max_retries)
def check_spam(ctx: TaskContext) -> dict[str, Any]:
    """Score messages for spam, store the verdicts and move spam to \\Junk where the
    account says so; or learn from a user's label (services.spam_check)."""
    return spam_check.check_spam(
        ctx.runtime.sessions,
        ctx.account_id or "",
        ctx.params,
        task_id=ctx.task_id,
        box=ctx.runtime.box,
        settings=ctx.settings,
        # Every batch writes its progress: each is a cancel checkpoint.
        progress=lambda percent, stage: ctx.progress(percent, stage, force=True),
    )


def _queue_spam_work(ctx: TaskContext, summary: dict[str, Any], left_junk: list[str]) -> None:
    """After a sync: teach the tenant's filter from messages a user moved out of Junk (the
    sync labelled them ham), and, where the account has ``spam_auto_scan`` and the sync
    stored new INBOX mail, queue one check of its unchecked INBOX messages. Both go on the
    spam queue, never inline: a flood of spam work must not hold up a sync worker. A check
    already queued and not started will find the new messages too, so none is added then."""
    work: list[dict[str, Any]] = [
        {"message_ids": left_junk[i : i + 1000], "learn": "ham"} for i in range(0, len(left_junk), 1000)
    ]
    if summary.get("folders", {}).get("INBOX", {}).get("new"):
        with ctx.session() as session:
            account = ctx.load_account(session)
            if account.spam_auto_scan and not spam_store.auto_scan_queued(session, account.id):
                work.append({"folder": "INBOX", "only_unscored": True})
    for params in work:
        try:
            dispatch(
                current_app,
                ctx.runtime.sessions,
                type="spam_check",
                tenant_id=ctx.tenant_id,
                user_id=ctx.user_id,
                account_id=ctx.account_id,
                params=params,
                origin=spam_store.AUTO_SCAN_ORIGIN if "folder" in params else "sync",
            )
        except MailroomError as exc:
            # Over the tenant's cap, or the broker down: the sync itself succeeded; the next
            # sync or a client's spam-check picks unchecked messages up (only_unscored).
            log.warning("task %s: spam check not queued: %s", ctx.task_id, exc.message)
