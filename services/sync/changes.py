"""Changes to messages already stored: flags the server changed, messages it expunged,
and the rows of folders it no longer lists. Like :mod:`services.sync.state`, every function
runs inside the caller's transaction, moves the folder counts by exactly what it changed,
and never commits.

A removed row may be a message moved to another folder by another client, or a folder
renamed on the server (which looks like a delete plus a create): removed rows are handed
to :class:`~services.sync.state.MoveTracker`, so the copy stored elsewhere keeps their ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, bindparam, delete, or_, select, update
from sqlalchemy.orm import Session

from services.models import Folder, Message, utcnow
from services.sync.state import (
    KEY_COLUMNS,
    SPAM_COLUMNS,
    MoveTracker,
    bump_counts,
    chunks,
    match_key,
    messages_table,
    spam_values,
)

# --- flags ------------------------------------------------------------------------------

_flag_update = (
    update(messages_table)
    .where(
        and_(messages_table.c.folder_id == bindparam("b_folder"), messages_table.c.uid == bindparam("b_uid"))
    )
    .values(
        flags=bindparam("b_flags"),
        seen=bindparam("b_seen"),
        flagged=bindparam("b_flagged"),
        modseq=bindparam("b_modseq"),
        updated_at=bindparam("b_now"),
    )
)


def apply_flags(session: Session, folder_id: str, changes: dict[int, tuple[list[str], int | None]]) -> int:
    """Write the flags the server reported where they differ from the stored ones.
    Returns how many messages changed."""
    uids = sorted(changes)
    now = utcnow()
    params = []
    unread_change = 0
    for chunk in chunks(uids):
        stored = session.execute(
            select(Message.uid, Message.flags, Message.seen).where(
                Message.folder_id == folder_id, Message.uid.in_(chunk)
            )
        )
        for uid, flags, seen in stored:
            new_flags, modseq = changes[uid]
            if sorted(flags or []) != new_flags:
                unread_change += int(bool(seen)) - int("\\Seen" in new_flags)
                params.append(
                    {
                        "b_folder": folder_id,
                        "b_uid": uid,
                        "b_flags": new_flags,
                        "b_seen": "\\Seen" in new_flags,
                        "b_flagged": "\\Flagged" in new_flags,
                        "b_modseq": modseq,
                        "b_now": now,
                    }
                )
    if params:
        session.execute(_flag_update, params)
        bump_counts(session, folder_id, 0, unread_change)
    return len(params)


# --- removals ---------------------------------------------------------------------------


def positive_uids(session: Session, folder_id: str, *, up_to: int) -> set[int]:
    """Every stored UID of the folder up to ``up_to``."""
    return set(
        session.scalars(
            select(Message.uid).where(Message.folder_id == folder_id, Message.uid.between(1, up_to))
        )
    )


def uids_in_ranges(session: Session, folder_id: str, ranges: list[tuple[int, int]]) -> list[int]:
    """The stored UIDs that fall in any of the UID ``ranges`` (a VANISHED answer)."""
    found: list[int] = []
    for chunk in chunks(ranges, 200):
        found.extend(
            session.scalars(
                select(Message.uid).where(
                    Message.folder_id == folder_id, or_(*(Message.uid.between(lo, hi) for lo, hi in chunk))
                )
            )
        )
    return found


def remove_messages(
    session: Session, folder_id: str, *, uids: Sequence[int] = (), pending: bool = False, moves: MoveTracker
) -> int:
    """Delete the folder's rows with ``uids`` (or, with ``pending``, its unmatched pending
    rows). A row whose message was already stored in another folder during this run hands
    its id to that row; the others are remembered for later folders of the run."""
    query = select(Message.id, Message.created_at, Message.seen, *KEY_COLUMNS, *SPAM_COLUMNS).where(
        Message.folder_id == folder_id
    )
    batches = (
        [query.where(Message.uid < 0)] if pending else [query.where(Message.uid.in_(c)) for c in chunks(uids)]
    )
    removed = 0
    for batch in batches:
        rows = list(session.execute(batch))
        if not rows:
            continue
        session.execute(delete(Message).where(Message.id.in_([r.id for r in rows])))
        bump_counts(session, folder_id, -len(rows), -sum(1 for r in rows if not r.seen))
        removed += len(rows)
        for row in rows:
            key = match_key(row.message_id_header, row.date, row.size, row.subject, row.from_addr)
            moved = [entry for entry in moves.inserted.get(key, []) if entry[1] != folder_id]
            if moved:
                new_row_id = moved[0][0]
                moves.inserted[key].remove(moved[0])
                # The copy stored elsewhere takes over the removed row's identity.
                spam = moves.handed_over(row.id, folder_id, spam_values(row), moved[0][1])
                session.execute(
                    update(Message)
                    .where(Message.id == new_row_id)
                    .values(id=row.id, created_at=row.created_at, **spam)
                    .execution_options(synchronize_session=False)
                )
            else:
                moves.removed[key].append((row.id, row.created_at))
                moves.keep(row.id, folder_id, spam_values(row))
    return removed


# --- folders gone from the server -------------------------------------------------------


def offer_vanished(session: Session, folder_ids: Sequence[str], moves: MoveTracker) -> int:
    """Offer every row of folders the server no longer lists to the run's move matching:
    a message stored again anywhere (the renamed folder's walk) takes over its id and the
    old row goes in the same transaction. Returns how many rows were offered."""
    offered = 0
    for chunk in chunks(list(folder_ids)):
        query = select(Message.id, Message.created_at, *KEY_COLUMNS, *SPAM_COLUMNS).where(
            Message.folder_id.in_(chunk)
        )
        for row in session.execute(query.order_by(Message.folder_id, Message.uid)):
            key = match_key(row.message_id_header, row.date, row.size, row.subject, row.from_addr)
            moves.removed[key].append((row.id, row.created_at))
            moves.keep(row.id, None, spam_values(row))  # a renamed folder: its verdicts stay
            offered += 1
    return offered


def drop_folders(session: Session, folder_ids: Sequence[str]) -> None:
    """Delete folders (and whatever rows nothing took over) once the run that could match
    them has visited every folder."""
    if not folder_ids:
        return
    # Delete the messages explicitly: SQLite enforces ON DELETE CASCADE only when the
    # connection has foreign keys on, and a bulk delete should not depend on that.
    session.execute(delete(Message).where(Message.folder_id.in_(folder_ids)))
    session.execute(delete(Folder).where(Folder.id.in_(folder_ids)))
