"""``sync_account``: one IMAP session that lists the account's folders, asks each for its
STATUS, and brings every folder that changed up to date, INBOX first."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy import func, select, update
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

from services.accounts import imap_endpoint
from services.crypto import SecretBox
from services.db import transaction
from services.errors import AuthenticationFailed, MailError, NotFound, TaskCancelled, TransientMailError
from services.mail.imap import classify_imap_error, imap_session
from services.models import Account, Folder, Message, utcnow
from services.settings import Settings
from services.sync.changes import drop_folders, offer_vanished
from services.sync.commands import CommandCounter, folder_status, prepare
from services.sync.folder_sync import (
    FolderOutcome,
    FolderSnapshot,
    RunContext,
    estimate,
    is_unchanged,
    sync_folder,
)
from services.sync.folders import is_selectable, list_remote_folders, store_folders
from services.sync.progress import ProgressTracker
from services.sync.state import MoveTracker, chunks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncOptions:
    """``folders``: only these folders (by name); ``full``: ignore stored sync state and
    rebuild every folder, keeping message ids wherever messages match again."""

    folders: list[str] | None = None
    full: bool = False


def sync_account(
    sessions: sessionmaker[Session],
    account_id: str,
    *,
    box: SecretBox,
    settings: Settings,
    options: SyncOptions,
    progress: Callable[[float, str], None],
) -> dict[str, Any]:
    """Bring the account's stored folders and messages up to date with its IMAP server.

    Promises: every batch is committed with the folder state describing it, so a cancel
    (``progress`` raising :class:`TaskCancelled`), a crash or a network fault
    (:class:`TransientMailError`) leaves state that the next call resumes from, and a
    message is never stored twice. Bad credentials raise :class:`AuthenticationFailed` at
    once. A folder the server refuses is recorded on ``folder.last_error`` and skipped.
    Returns a JSON-able summary; a successful sync of all folders sets
    ``account.last_sync_at`` (and clears ``last_sync_error``)."""
    started = time.monotonic()
    with transaction(sessions) as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFound("account not found")
        endpoint = imap_endpoint(account, box)
        tenant_id = account.tenant_id
    counter = CommandCounter()
    tracker = ProgressTracker(progress)
    try:
        with imap_session(
            endpoint, timeout=settings.mail_timeout_seconds, allow_private=settings.allow_private_hosts
        ) as client:
            counter.attach(client)
            caps, raw_caps = prepare(client)
            tracker.report(0, "listing folders")
            remote = list_remote_folders(client)
            if not any(f.special_use == "inbox" for f in remote):
                # Every IMAP account has an INBOX. A listing without one is a server in
                # trouble, and taking it at its word would delete every stored folder.
                raise TransientMailError("the IMAP server listed no INBOX; not touching stored folders")
            moves = MoveTracker()
            with transaction(sessions) as session:
                folders, gone = store_folders(
                    session, tenant_id=tenant_id, account_id=account_id, remote=remote
                )
                _set_account(session, account_id, capabilities=raw_caps)
                snapshots = _snapshots(session, account_id, folders)
                moves.junk_ids = frozenset(f.id for f in folders if f.special_use == "junk")
                moves.trash_ids = frozenset(f.id for f in folders if f.special_use == "trash")
                # A folder gone from the server may have been renamed: its messages are
                # matched like moved ones while the other folders sync (see state.py).
                offer_vanished(session, [f.id for f in gone], moves)
            ctx = RunContext(
                sessions=sessions,
                client=client,
                caps=caps,
                tenant_id=tenant_id,
                account_id=account_id,
                batch_size=settings.sync_batch_size,
                full=options.full,
                tracker=tracker,
                moves=moves,
                track_walks=any(f.message_count for f in folders + gone),
            )
            unselectable = {f.name for f in folders if not is_selectable(f)}
            summary = _sync_folders(ctx, snapshots, options, unselectable=unselectable)
            named = set(options.folders or ())
            if options.folders is not None and _may_have_seen_half_a_move(ctx, snapshots, named):
                # A sync of some folders (the watcher's) that removed messages, or stored
                # ones the account holds in another folder, may have seen one half of a
                # move by another client. The other folders sync in the same run, so the
                # message keeps its id whichever half came first (and one taken out of
                # Junk counts as ham); unchanged folders cost one STATUS each.
                others = [s.name for s in snapshots if s.name not in named and s.name not in unselectable]
                if others:
                    more = _sync_folders(
                        ctx, snapshots, SyncOptions(folders=others), unselectable=unselectable
                    )
                    summary = _merged(summary, more)
            deleted = []
            if gone and options.folders is None and not summary["failed_folders"]:
                # Every folder had its chance to take over the vanished folders' messages.
                with transaction(sessions) as session:
                    drop_folders(session, [f.id for f in gone])
                deleted = [f.name for f in gone]
    except (MailError, IMAPClientError, OSError) as exc:
        error = classify_imap_error(exc, "sync")
        with transaction(sessions) as session:
            _set_account(session, account_id, last_sync_error=error.message[:2000])
        if error is exc:
            raise
        raise error from exc
    if options.folders is None:
        # Only a sync of every folder counts as the account's sync: Beat schedules the next
        # one from last_sync_at, and a refresh of INBOX alone must not postpone the rest.
        with transaction(sessions) as session:
            _set_account(session, account_id, last_sync_at=utcnow(), last_sync_error=None)
    tracker.report(100, "done")
    summary.update(
        deleted_folders=deleted,
        imap_commands=counter.as_dict(),
        capabilities={"condstore": caps.condstore, "qresync": caps.qresync},
        seconds=round(time.monotonic() - started, 3),
        # Messages a user moved out of Junk: now labelled ham, for the spam filter to learn.
        left_junk=moves.left_junk,
    )
    return summary


def _may_have_seen_half_a_move(ctx: RunContext, snapshots: list[FolderSnapshot], names: set[str]) -> bool:
    """Whether the run removed a message no folder of it took over, or stored one whose
    Message-ID a row of another folder of the account still holds."""
    if any(ctx.moves.removed.values()):
        return True
    message_ids = sorted({key[0] for key, entries in ctx.moves.inserted.items() if entries and key[0]})
    if not message_ids:
        return False
    synced = [s.id for s in snapshots if s.name in names]
    with transaction(ctx.sessions) as session:
        for chunk in chunks(message_ids):
            found = session.scalar(
                select(Message.id)
                .where(
                    Message.account_id == ctx.account_id,
                    Message.message_id_header.in_(chunk),
                    Message.folder_id.not_in(synced),
                )
                .limit(1)
            )
            if found is not None:
                return True
    return False


def _merged(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two summaries of :func:`_sync_folders` as one."""
    merged = dict(first)
    for key in ("folders_synced", "folders_unchanged", "new", "kept_ids", "updated_flags", "removed"):
        merged[key] = first[key] + second[key]
    merged["folders"] = {**first["folders"], **second["folders"]}
    merged["failed_folders"] = first["failed_folders"] + second["failed_folders"]
    return merged


def _set_account(session: Session, account_id: str, **values: Any) -> None:
    session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def _snapshots(session: Session, account_id: str, folders: list[Folder]) -> list[FolderSnapshot]:
    """Each selectable folder's stored state. Counts are exact after every batch, so the
    stored rows of a folder are its message_count, except while a walk is under way, when
    pending rows (of a rebuild) are not yet the folder's messages: only those folders are
    counted, and an unchanged account costs no scan of its messages."""
    walking = [f.id for f in folders if f.backfill_below_uid is not None]
    counts: dict[str, int] = {}
    if walking:
        query = (
            select(Message.folder_id, func.count())
            .where(Message.folder_id.in_(walking), Message.uid > 0)
            .group_by(Message.folder_id)
        )
        counts = {folder_id: int(count) for folder_id, count in session.execute(query)}
    return [
        FolderSnapshot.of(f, counts.get(f.id, 0) if f.backfill_below_uid is not None else f.message_count)
        for f in folders
        if is_selectable(f)
    ]


def _folder_error(exc: BaseException, name: str) -> MailError | None:
    """The error to record for a failed folder, or None when the fault is not the
    folder's and must end the whole sync (a lost connection, a timeout, credentials, our
    own bugs). A tagged NO or BAD is the folder's even when its response code sounds
    temporary ([SERVERBUG], [UNAVAILABLE]): the session still works, the other folders
    should not wait for this one, and the next sync tries it again anyway."""
    if isinstance(exc, DataError):
        return MailError(f"folder {name!r}: a value could not be stored: {exc.orig}")
    if isinstance(exc, (IMAPClientAbortError, OSError)):
        return None
    if isinstance(exc, IMAPClientError):
        return classify_imap_error(exc, f"folder {name!r}")
    if isinstance(exc, MailError) and not exc.transient and not isinstance(exc, AuthenticationFailed):
        return exc
    return None


def _sync_folders(
    ctx: RunContext, snapshots: list[FolderSnapshot], options: SyncOptions, *, unselectable: set[str]
) -> dict[str, Any]:
    failed: list[dict[str, str]] = []
    if options.folders is not None:
        known = {s.name for s in snapshots}
        for name in options.folders:
            if name in unselectable:
                failed.append({"folder": name, "error": "the folder cannot be selected (\\Noselect)"})
            elif name not in known:
                failed.append({"folder": name, "error": "no such folder on the server"})
        wanted = set(options.folders)
        snapshots = [s for s in snapshots if s.name in wanted]

    statuses: dict[str, dict[str, int]] = {}
    for snapshot in snapshots:
        try:
            statuses[snapshot.name] = folder_status(ctx.client, snapshot.name, ctx.caps)
        except Exception as exc:  # noqa: BLE001 - classified by _folder_error
            _record_failure(ctx, snapshot, exc, failed)
    todo = [s for s in snapshots if s.name in statuses]
    unchanged = [s for s in todo if is_unchanged(s, statuses[s.name], ctx.caps, full=ctx.full)]
    todo = [s for s in todo if s not in unchanged]
    ctx.tracker.plan({s.name: estimate(s, statuses[s.name], full=ctx.full) for s in todo})

    outcomes: list[FolderOutcome] = []
    for snapshot in todo:
        try:
            outcomes.append(sync_folder(ctx, snapshot, statuses[snapshot.name]))
        except TaskCancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - classified by _folder_error
            _record_failure(ctx, snapshot, exc, failed)
            ctx.tracker.finish(snapshot.name, f"{snapshot.name}: failed")
    if unchanged:
        with transaction(ctx.sessions) as session:
            session.execute(
                update(Folder)
                .where(Folder.id.in_([s.id for s in unchanged]))
                .values(last_synced_at=utcnow(), last_error=None)
                .execution_options(synchronize_session=False)
            )
    return {
        "folders_synced": len(outcomes) + len(unchanged),
        "folders_unchanged": len(unchanged),
        "new": sum(o.new for o in outcomes),
        "kept_ids": sum(o.kept_ids for o in outcomes),
        "updated_flags": sum(o.updated for o in outcomes),
        "removed": sum(o.removed for o in outcomes),
        "folders": {o.name: o.as_dict() for o in outcomes},
        "failed_folders": failed,
    }


def _record_failure(
    ctx: RunContext, snapshot: FolderSnapshot, exc: BaseException, failed: list[dict[str, str]]
) -> None:
    error = _folder_error(exc, snapshot.name)
    if error is None:
        raise exc
    log.warning("sync of folder %r of account %s failed: %s", snapshot.name, ctx.account_id, error.message)
    failed.append({"folder": snapshot.name, "error": error.message})
    with transaction(ctx.sessions) as session:
        session.execute(
            update(Folder)
            .where(Folder.id == snapshot.id)
            .values(last_error=error.message[:2000])
            .execution_options(synchronize_session=False)
        )
