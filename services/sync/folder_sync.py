"""Synchronising one folder: the first sync (a walk from the newest UID down, in batches),
the incremental pass (new mail, flag changes, expunges), and the rebuild after a
UIDVALIDITY change.

Durable state per folder and what it promises (all written in the same transaction as the
messages it describes, so it is never ahead of the data):

* ``uidvalidity`` — the UID space the stored rows belong to.
* ``backfill_below_uid`` — set while the first walk runs: every UID at or above it (and
  below the walk's start) is stored; None once the walk has reached the bottom.
* ``last_seen_uid`` — every UID up to it is covered (by the walk, once it completes, and
  by incremental passes); new mail is ``last_seen_uid + 1 : *``.
* ``highestmodseq`` / ``uidnext`` / ``server_message_count`` — the server's values when the
  last complete pass began: flag changes since then are ``CHANGEDSINCE highestmodseq``, and
  a STATUS equal to all three (and the same UIDVALIDITY) means nothing changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import imapclient
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from services.db import transaction
from services.models import Folder, Message, utcnow
from services.read_stats import analyze_after_first_walk
from services.sync import changes, state
from services.sync.commands import (
    Capabilities,
    Selected,
    examine,
    take_vanished,
    uid_fetch,
    uid_search,
    uid_set,
)
from services.sync.fetch import FLAG_ITEMS, fetch_messages, flag_names, message_row, modseq_of
from services.sync.pipeline import BatchWriter
from services.sync.progress import ProgressTracker, count_stage


@dataclass(frozen=True)
class FolderSnapshot:
    """The stored state of one folder, read before the folder is synced."""

    id: str
    name: str
    uidvalidity: int | None
    uidnext: int | None
    highestmodseq: int | None
    last_seen_uid: int | None
    backfill_below_uid: int | None
    server_message_count: int | None
    stored: int

    @classmethod
    def of(cls, folder: Folder, stored: int) -> FolderSnapshot:
        return cls(
            id=folder.id,
            name=folder.name,
            uidvalidity=folder.uidvalidity,
            uidnext=folder.uidnext,
            highestmodseq=folder.highestmodseq,
            last_seen_uid=folder.last_seen_uid,
            backfill_below_uid=folder.backfill_below_uid,
            server_message_count=folder.server_message_count,
            stored=stored,
        )


@dataclass
class RunContext:
    """What every folder of one account sync shares."""

    sessions: sessionmaker[Session]
    client: imapclient.IMAPClient
    caps: Capabilities
    tenant_id: str
    account_id: str
    batch_size: int
    full: bool
    tracker: ProgressTracker
    moves: state.MoveTracker = field(default_factory=state.MoveTracker)
    # Whether walks remember what they insert, so that a row another folder drops later in
    # the run (an expunge, a rebuild's leftovers) hands its id to a copy stored earlier.
    # Off for an account's first sync, where nothing stored could be dropped: it would
    # only hold every message of the account in memory (~47 MiB per 100,000).
    track_walks: bool = True


@dataclass
class FolderOutcome:
    name: str
    new: int = 0
    kept_ids: int = 0
    updated: int = 0
    removed: int = 0
    rebuilt: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "new": self.new,
            "kept_ids": self.kept_ids,
            "updated_flags": self.updated,
            "removed": self.removed,
            "rebuilt": self.rebuilt,
        }


def needs_rebuild(folder: FolderSnapshot, uidvalidity: int | None, *, full: bool) -> bool:
    """Whether the stored rows cannot be continued: never synced, another UIDVALIDITY, or
    ``full`` asked for (unless a rebuild is already under way, which a retry continues)."""
    if folder.uidvalidity is None or folder.uidvalidity != uidvalidity:
        return True
    return full and folder.backfill_below_uid is None


def is_unchanged(folder: FolderSnapshot, status: dict[str, int], caps: Capabilities, *, full: bool) -> bool:
    """True when STATUS proves there is nothing to do, so the folder is not even selected.
    Without CONDSTORE flag changes are invisible to STATUS, so that is never proof.

    The proof: UIDNEXT unchanged means no message arrived, so the server's UIDs are a
    subset of those stored; MESSAGES equal to the number of stored rows means the subset
    is all of them. Comparing MESSAGES only with the last pass's EXISTS is not enough
    without QRESYNC, where an expunge need not raise HIGHESTMODSEQ: an expunge the last
    pass missed would then be hidden for good."""
    if full or not caps.condstore or folder.backfill_below_uid is not None:
        return False
    return (
        folder.uidvalidity == status.get("UIDVALIDITY")
        and folder.uidnext == status.get("UIDNEXT")
        and folder.server_message_count == status.get("MESSAGES")
        and folder.stored == status.get("MESSAGES")
        and folder.highestmodseq is not None
        and folder.highestmodseq == status.get("HIGHESTMODSEQ")
    )


def estimate(folder: FolderSnapshot, status: dict[str, int], *, full: bool) -> float:
    """The folder's progress weight: messages expected to be fetched, plus one for checks."""
    messages = status.get("MESSAGES", 0)
    if needs_rebuild(folder, status.get("UIDVALIDITY"), full=full):
        return messages + 1.0
    if folder.backfill_below_uid is not None:
        return max(messages - folder.stored, 0) + 1.0
    expected_new = status.get("UIDNEXT", 0) - max(folder.uidnext or 0, (folder.last_seen_uid or 0) + 1)
    return max(expected_new, 0) + 1.0


def sync_folder(ctx: RunContext, folder: FolderSnapshot, status: dict[str, int]) -> FolderOutcome:
    """Bring one folder up to date. Commits after every batch; raises what the server or
    the progress callback raised, leaving consistent, resumable state behind."""
    out = FolderOutcome(folder.name)
    selected = examine(ctx.client, folder.name)
    total = max(status.get("MESSAGES", 0), selected.exists)
    pending = False
    with transaction(ctx.sessions) as session:
        if needs_rebuild(folder, selected.uidvalidity, full=ctx.full):
            out.rebuilt = folder.uidvalidity is not None
            uidnext = selected.uidnext or _uidnext_by_search(ctx.client)
            pending = state.begin_rebuild(
                session,
                folder.id,
                uidvalidity=selected.uidvalidity,
                uidnext=uidnext,
                highestmodseq=selected.highestmodseq,
                last_seen_uid=uidnext - 1,
                backfill_below_uid=uidnext,
                server_message_count=selected.exists,
            )
            folder = FolderSnapshot(
                folder.id,
                folder.name,
                selected.uidvalidity,
                uidnext,
                selected.highestmodseq,
                uidnext - 1,
                uidnext,
                selected.exists,
                0,
            )
        elif folder.backfill_below_uid is not None:
            pending = state.has_pending(session, folder.id)
    if folder.backfill_below_uid is not None:
        _walk(ctx, folder, out, pending=pending, total=total)
    _incremental(ctx, folder, selected, out)
    ctx.tracker.finish(folder.name, count_stage(folder.name, total, total))
    return out


def _uidnext_by_search(client: imapclient.IMAPClient) -> int:
    # A server that does not announce UIDNEXT: one past the highest UID it has.
    uids = uid_search(client, "1:*")
    return (max(uids) if uids else 0) + 1


def _scope(ctx: RunContext, folder: FolderSnapshot) -> state.FolderScope:
    return state.FolderScope(ctx.tenant_id, ctx.account_id, folder.id)


def _walk(ctx: RunContext, folder: FolderSnapshot, out: FolderOutcome, *, pending: bool, total: int) -> None:
    """The first sync: every UID below ``backfill_below_uid``, newest first, one committed
    batch at a time; the last batch also retires what is left pending."""
    below = folder.backfill_below_uid or 1
    uids = (
        sorted((u for u in uid_search(ctx.client, f"1:{below - 1}") if u < below), reverse=True)
        if below > 1
        else []
    )
    batches = [uids[i : i + ctx.batch_size] for i in range(0, len(uids), ctx.batch_size)]
    done = folder.stored
    ctx.tracker.add(folder.name, 0, count_stage(folder.name, done, total))
    if not batches:
        with transaction(ctx.sessions) as session:
            out.removed += _finish_walk(session, ctx, folder, pending=pending)
        return

    def store(batch: list[int], data: dict[int, dict[bytes, Any]], last: bool) -> tuple[int, int, int, int]:
        # A UID missing from the answer was expunged since the SEARCH: nothing to store.
        rows = [message_row(uid, data[uid]) for uid in batch if uid in data]
        with transaction(ctx.sessions) as session:
            stored, kept = state.insert_messages(
                session,
                _scope(ctx, folder),
                rows,
                pending=pending,
                moves=ctx.moves,
                track_inserts=ctx.track_walks,
            )
            state.update_folder(session, folder.id, backfill_below_uid=min(batch))
            removed = _finish_walk(session, ctx, folder, pending=pending) if last else 0
        return len(rows), stored, kept, removed

    def collect(writer: BatchWriter) -> None:
        nonlocal done
        fetched, stored, kept, removed = writer.wait()
        out.new += stored - kept
        out.kept_ids += kept
        out.removed += removed
        done += fetched
        # After the commit: a cancel raised here loses nothing and the walk resumes below.
        ctx.tracker.add(folder.name, fetched, count_stage(folder.name, done, total))

    with BatchWriter() as writer:
        for number, batch in enumerate(batches, start=1):
            data = fetch_messages(ctx.client, uid_set(batch), condstore=ctx.caps.condstore)
            if writer.busy:
                collect(writer)
            writer.submit(store, batch, data, number == len(batches))
        collect(writer)


def _finish_walk(session: Session, ctx: RunContext, folder: FolderSnapshot, *, pending: bool) -> int:
    removed = changes.remove_messages(session, folder.id, pending=True, moves=ctx.moves) if pending else 0
    state.update_folder(session, folder.id, backfill_below_uid=None)
    analyze_after_first_walk(session, folder.id)  # planner statistics for the message list
    return removed


def _incremental(ctx: RunContext, folder: FolderSnapshot, selected: Selected, out: FolderOutcome) -> None:
    """New mail above ``last_seen_uid`` (ascending, so a crash leaves no gap below it), then
    flag changes and expunges of the UIDs already stored, then the new state."""
    last = folder.last_seen_uid or 0
    newest = last
    if selected.uidnext is None or selected.uidnext > last + 1:
        newest = _fetch_new(ctx, folder, selected, out, last)

    flag_changes: dict[int, tuple[list[str], int | None]] = {}
    vanished: list[tuple[int, int]] | None = None
    present: set[int] | None = None
    if last > 0:
        if ctx.caps.condstore and folder.highestmodseq and selected.highestmodseq:
            if selected.highestmodseq != folder.highestmodseq:
                modifiers = f"(CHANGEDSINCE {folder.highestmodseq}{' VANISHED' if ctx.caps.qresync else ''})"
                # Any VANISHED already received since the SELECT is real and stays
                # in imaplib's buffer, to be collected together with this answer.
                data = uid_fetch(ctx.client, f"1:{last}", FLAG_ITEMS, modifiers)
                flag_changes = {
                    u: (flag_names(d.get(b"FLAGS")), modseq_of(d)) for u, d in data.items() if u <= last
                }
                if ctx.caps.qresync:
                    vanished = take_vanished(ctx.client)
            if not ctx.caps.qresync:
                # Without QRESYNC an expunge need not raise HIGHESTMODSEQ (RFC 7162 asks
                # that only of QRESYNC servers): compare UID sets on every pass.
                present = set(uid_search(ctx.client, f"1:{last}"))
        else:
            # No mod-sequences: read every stored UID's flags; the answer also tells which
            # UIDs still exist.
            data = uid_fetch(ctx.client, f"1:{last}", FLAG_ITEMS)
            flag_changes = {
                u: (flag_names(d.get(b"FLAGS")), modseq_of(d)) for u, d in data.items() if u <= last
            }
            present = set(flag_changes)

    with transaction(ctx.sessions) as session:
        if flag_changes:
            out.updated += changes.apply_flags(session, folder.id, flag_changes)
        gone: list[int] = []
        if vanished:
            gone = changes.uids_in_ranges(session, folder.id, vanished)
        elif present is not None:
            gone = sorted(changes.positive_uids(session, folder.id, up_to=last) - present)
        if gone:
            out.removed += changes.remove_messages(session, folder.id, uids=gone, moves=ctx.moves)
        if last > 0 and _stored_differs(session, folder.id, selected, newest):
            if present is None:
                # The stored rows do not add up to EXISTS although VANISHED named nothing
                # more (or mod-sequences said nothing changed): compare UID sets.
                present = set(uid_search(ctx.client, f"1:{last}"))
                gone = sorted(changes.positive_uids(session, folder.id, up_to=last) - present)
                if gone:
                    out.removed += changes.remove_messages(session, folder.id, uids=gone, moves=ctx.moves)
            if _stored_differs(session, folder.id, selected, newest):
                # The rows now mirror the server's UIDs, so counts that still do not add
                # up were written wrong (before they moved with every batch): count once.
                state.refresh_counts(session, folder.id)
        state.update_folder(
            session,
            folder.id,
            uidnext=selected.uidnext,
            highestmodseq=selected.highestmodseq,
            server_message_count=selected.exists,
            # Everything below UIDNEXT as of SELECT was fetched (or did not exist any more).
            last_seen_uid=max(newest, (selected.uidnext or 1) - 1),
            last_synced_at=utcnow(),
            last_error=None,
        )


def _stored_differs(session: Session, folder_id: str, selected: Selected, newest: int) -> bool:
    """Whether the folder's stored rows below UIDNEXT (as of SELECT) differ in number from
    EXISTS. Cheap: the exact message_count less the few rows outside that range, never a
    count of the whole folder."""
    limit = selected.uidnext or newest + 1
    total = session.scalar(select(Folder.message_count).where(Folder.id == folder_id)) or 0
    outside = session.scalar(
        select(func.count()).where(Message.folder_id == folder_id, or_(Message.uid < 1, Message.uid >= limit))
    )
    return total - int(outside or 0) != selected.exists


def _fetch_new(
    ctx: RunContext, folder: FolderSnapshot, selected: Selected, out: FolderOutcome, last: int
) -> int:
    """Fetch and store UIDs above ``last`` in ascending batches (so a crash leaves no gap
    below ``last_seen_uid``); returns the highest UID now stored."""
    scope = _scope(ctx, folder)
    expected = selected.uidnext - last - 1 if selected.uidnext else None
    prefetched: dict[int, dict[bytes, Any]] | None = None
    if expected is not None and expected <= ctx.batch_size:
        # Few enough for one command. "N:*" always includes the highest UID even when it
        # is below N, hence the filter.
        answer = fetch_messages(ctx.client, f"{last + 1}:*", condstore=ctx.caps.condstore)
        prefetched = {u: d for u, d in answer.items() if u > last}
        batches = [sorted(prefetched)] if prefetched else []
    else:
        uids = [u for u in uid_search(ctx.client, f"{last + 1}:*") if u > last]
        batches = [uids[i : i + ctx.batch_size] for i in range(0, len(uids), ctx.batch_size)]
    total = sum(len(b) for b in batches)
    done = 0

    def store(batch: list[int], data: dict[int, dict[bytes, Any]]) -> tuple[int, int]:
        rows = [message_row(uid, data[uid]) for uid in batch if uid in data]
        with transaction(ctx.sessions) as session:
            stored, kept = state.insert_messages(
                session, scope, rows, pending=False, moves=ctx.moves, track_inserts=True
            )
            state.update_folder(session, folder.id, last_seen_uid=max(batch))
        return stored, kept

    def collect(writer: BatchWriter, size: int) -> None:
        nonlocal done
        stored, kept = writer.wait()
        out.new += stored - kept
        out.kept_ids += kept
        done += size
        ctx.tracker.add(folder.name, size, f"{folder.name}: {done:,} / {total:,} new")

    with BatchWriter() as writer:
        previous = 0
        for batch in batches:
            data = prefetched or fetch_messages(ctx.client, uid_set(batch), condstore=ctx.caps.condstore)
            if writer.busy:
                collect(writer, previous)
            writer.submit(store, batch, data)
            previous = len(batch)
            last = max(batch)
        if writer.busy:
            collect(writer, previous)
    return last
