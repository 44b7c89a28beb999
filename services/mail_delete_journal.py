"""The delete journal: what a delete is about to do to each folder, committed before its
first IMAP command, so that an attempt killed between a command and the commit of its rows
leaves enough behind for the next delete of the account to bring rows and server back in
line (:func:`reconcile`), keeping every Mailroom id it can.

An entry names a source folder, the UIDs the delete is about to move or expunge there,
and for a move the target folder and its UIDNEXT before the first command (every copy the
delete makes is at or above it). Rows still in the source under a journaled UID are the
ones whose fate is unknown: the server is asked which of those UIDs it still has.

* Expunge: a UID the source no longer has was expunged: its row is deleted.
* Move: the copies in the target at or above the recorded UIDNEXT are read (Message-ID and
  size, one FETCH) and matched to the rows, in UID order (COPYUID keeps the order). A row
  whose UID is gone from the source gets its copy's folder and UID, and keeps its id. A row
  whose UID is still in the source *and* has a copy was copied but not yet expunged (a
  server without MOVE, killed between COPY and UID EXPUNGE): the original gets
  ``\\Deleted`` and ``UID EXPUNGE`` of exactly those UIDs, and the row takes the copy;
  it is never copied again. Rows still in the source without a copy are left to the plan.

The journal is committed before any command and cleared in the transaction of the last
batch's rows (or once a cancelled run's rows are all written), so a kill at any point in
between leaves it behind; reconciling is itself safe to kill and run again. What remains:
a message moved in the killed attempt whose copy cannot be recognised (no copy at or
above UIDNEXT with its Message-ID and size, e.g. another client deleted it from Trash
meanwhile) keeps its old row until the next sync, and is reported under ``gone``; two
moved messages with neither a Message-ID nor different sizes may swap ids. And an entry is
only acted on by the next delete of the account: until then (a task that is never
redelivered), a sync sees those messages as gone from their folder and new in Trash, and
its own matching by Message-ID decides whether they keep their ids.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import imapclient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from services.db import transaction
from services.mail_delete_rows import Plan, Row, delete_rows, move_rows
from services.models import DeleteJournalEntry, Folder
from services.sync import parse
from services.sync.commands import uid_set
from services.sync.state import messages_table

#: (Message-ID, size): how a copy in the target is recognised as a row's message.
CopyKey = tuple[str | None, int]


def expand_uid_set(text: str) -> list[int]:
    """The UIDs of a set written as ``"4:6,9"``, in its order."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition(":")
        a, b = int(lo), int(hi or lo)
        out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
    return out


def write_journal(
    session: Session, tenant_id: str, account_id: str, plan: Plan, trash_uidnext: int | None
) -> None:
    """Record the plan: one entry per source folder and kind (move or expunge). Runs in the
    caller's transaction, which must commit before the first IMAP command."""
    for folder_id, rows in plan.expunges.items():
        if rows:
            session.add(_entry(tenant_id, account_id, folder_id, None, None, rows))
    trash = plan.trash
    for folder_id, rows in plan.moves.items():
        if rows and trash is not None:
            session.add(_entry(tenant_id, account_id, folder_id, trash.id, trash_uidnext, rows))


def _entry(
    tenant_id: str, account_id: str, source: str, target: str | None, uidnext: int | None, rows: list[Row]
) -> DeleteJournalEntry:
    return DeleteJournalEntry(
        tenant_id=tenant_id,
        account_id=account_id,
        source_folder_id=source,
        target_folder_id=target,
        target_uidnext=uidnext,
        uids=uid_set(r.uid for r in rows),
    )


def clear_journal(session: Session, account_id: str) -> None:
    """Drop the account's entries: every row they name is written (or untouched)."""
    session.execute(
        delete(DeleteJournalEntry)
        .where(DeleteJournalEntry.account_id == account_id)
        .execution_options(synchronize_session=False)
    )


def has_journal(session: Session, account_id: str) -> bool:
    return (
        session.scalar(
            select(DeleteJournalEntry.id).where(DeleteJournalEntry.account_id == account_id).limit(1)
        )
        is not None
    )


@dataclass
class Reconciled:
    """What a reconcile found done by an earlier attempt."""

    moved: int = 0
    #: Ids of rows deleted because the server had expunged their message.
    deleted: set[str] | None = None
    #: Originals expunged here because their copy was already in the target.
    expunged_duplicates: int = 0


@dataclass
class _Pending:
    row: Row
    message_id: str | None
    size: int


def reconcile(sessions: sessionmaker[Session], client: imapclient.IMAPClient, account_id: str) -> Reconciled:
    """Bring the rows named by the account's journal in line with the server, as the module
    docstring says, clearing each entry once its rows are written. Like the delete, it
    expunges only with UID EXPUNGE of exactly the UIDs it names, never CLOSE or EXPUNGE."""
    done = Reconciled(deleted=set())
    with transaction(sessions) as session:
        entries = list(
            session.scalars(
                select(DeleteJournalEntry)
                .where(DeleteJournalEntry.account_id == account_id)
                .order_by(DeleteJournalEntry.created_at)
            )
        )
        folders = {f.id: f for f in session.scalars(select(Folder).where(Folder.account_id == account_id))}
        session.expunge_all()
    for entry in entries:
        source = folders[entry.source_folder_id]
        target = folders.get(entry.target_folder_id or "")
        with transaction(sessions) as session:
            pending = _pending_rows(session, source, expand_uid_set(entry.uids))
        if pending:
            _reconcile_entry(sessions, client, entry, source, target, pending, done)
        with transaction(sessions) as session:
            session.execute(delete(DeleteJournalEntry).where(DeleteJournalEntry.id == entry.id))
    return done


def _pending_rows(session: Session, source: Folder, uids: list[int]) -> dict[int, _Pending]:
    """Rows still in ``source`` under a journaled UID, by UID (one range read)."""
    if not uids:
        return {}
    wanted = set(uids)
    m = messages_table.c
    query = select(m.id, m.uid, m.seen, m.message_id_header, m.size).where(
        m.folder_id == source.id, m.uid >= min(wanted), m.uid <= max(wanted)
    )
    return {
        r.uid: _Pending(Row(r.id, r.uid, bool(r.seen)), r.message_id_header, int(r.size or 0))
        for r in session.execute(query)
        if r.uid in wanted
    }


def _reconcile_entry(
    sessions: sessionmaker[Session],
    client: imapclient.IMAPClient,
    entry: DeleteJournalEntry,
    source: Folder,
    target: Folder | None,
    pending: dict[int, _Pending],
    done: Reconciled,
) -> None:
    copies: dict[CopyKey, list[int]] = {}
    if target is not None:
        if not _select(client, target, readonly=True):
            return  # the target is gone or was rebuilt: its UIDs mean nothing now (sync)
        copies = _copies(client, entry.target_uidnext or 1)
    if not _select(client, source, readonly=False):
        return  # the stored UIDs no longer name these messages; the sync rebuilds the folder
    present = set(client.search(["UID", uid_set(pending)]))
    absent = [p for uid, p in sorted(pending.items()) if uid not in present]
    if target is None:
        gone = [p.row for p in absent]
        with transaction(sessions) as session:
            delete_rows(session, source, gone)
        assert done.deleted is not None
        done.deleted.update(r.id for r in gone)
        return
    new: dict[int, int] = {}
    for p in absent:  # moved: find the copy
        found = copies.get((p.message_id, p.size))
        if found:
            new[p.row.uid] = found.pop(0)
    copied_only: dict[int, int] = {}
    for uid, p in sorted(pending.items()):  # copied but not expunged: never copy again
        if uid in present and (found := copies.get((p.message_id, p.size))):
            copied_only[uid] = found.pop(0)
    if copied_only:
        client.add_flags(sorted(copied_only), [b"\\Deleted"], silent=True)
        client.uid_expunge(sorted(copied_only))
        done.expunged_duplicates += len(copied_only)
        new.update(copied_only)
    if new:
        rows = [pending[uid].row for uid in sorted(new)]
        with transaction(sessions) as session:
            move_rows(session, source, target, rows, new)
        done.moved += len(new)


def _select(client: imapclient.IMAPClient, folder: Folder, *, readonly: bool) -> bool:
    """Select ``folder``; False when it is gone from the server or its UIDVALIDITY is not
    the stored one (the entry is then dropped: a sync deals with such a folder)."""
    try:
        selected = client.select_folder(folder.name, readonly=readonly)
    except IMAPClientAbortError:
        raise
    except IMAPClientError:
        return False  # NO: the folder no longer exists
    return bool(selected.get(b"UIDVALIDITY") == folder.uidvalidity)


def _copies(client: imapclient.IMAPClient, uidnext: int) -> dict[CopyKey, list[int]]:
    """The selected folder's messages at or above ``uidnext``, by (Message-ID, size), each
    list in UID order."""
    found: dict[CopyKey, list[int]] = defaultdict(list)
    # "N:*" names the last message when N is above every UID: keep only those at or above.
    uids = sorted(u for u in client.search(["UID", f"{uidnext}:*"]) if u >= uidnext)
    for start in range(0, len(uids), 2000):
        fetched: dict[int, dict[bytes, Any]] = client.fetch(
            uids[start : start + 2000], ["RFC822.SIZE", "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"]
        )
        for uid in sorted(fetched):
            data = fetched[uid]
            header = next((v for k, v in data.items() if k.startswith(b"BODY[HEADER")), b"") or b""
            message_id = parse.parse_message_id(parse.split_header_block(header).get("message-id"))
            found[(message_id, int(data.get(b"RFC822.SIZE") or 0))].append(uid)
    return found
