"""What a delete reads and writes in the database (:mod:`services.mail_delete` does the
IMAP side): the API's check of the requested ids, the worker's plan from the stored rows,
and each batch's row changes with the folder counts moved by exactly what changed. Like
:mod:`services.sync.state`, the writers run inside the caller's transaction and never
commit."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    String,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from services.errors import NotFound, PermanentMailError, TransientMailError
from services.models import Account, Folder, Message, UTCDateTime, utcnow
from services.sync.state import bump_counts, chunks, messages_table
from services.tenancy import Principal

#: How many unknown ids a 404's details list.
MAX_LISTED = 50

#: SQLite has json_each built in (3.38; UPDATE … FROM since 3.33): id lists travel as one
#: JSON text, and a batch's move is one UPDATE … FROM json_each.
SQLITE_JSON = sqlite3.sqlite_version_info >= (3, 38)


class SyncRequired(PermanentMailError):
    """The stored UIDs of a folder no longer name the server's messages."""

    code = "sync_required"
    status = 409


class AccountBusy(TransientMailError):
    """Another task (a sync, or another delete) holds the account: retried with backoff."""

    code = "account_busy"
    status = 409


class DeleteRefused(PermanentMailError):
    """The server lacks what a safe delete needs (UIDPLUS), or there is no Trash."""

    code = "delete_refused"
    status = 409


def _id_in(session: Session, column: Any, ids: Sequence[str]) -> ColumnElement[bool]:
    """``column`` is one of ``ids``: on PostgreSQL one parameter (``= ANY``), which it plans
    and binds several times faster than an IN list of thousands of parameters. Ids without
    a comma (every Mailroom id) travel as one comma-joined text that the server splits:
    the driver turns a list of 5,000 strings into an array literal in Python, one by one."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        joined = ",".join(ids)
        if joined.count(",") == len(ids) - 1:  # no id holds a comma (counted in C, not per id)
            return column == any_(func.string_to_array(joined, ","))
        return column == any_(cast(list(ids), ARRAY(String)))
    if dialect == "sqlite" and SQLITE_JSON:
        # Likewise one JSON text that SQLite's json_each splits, instead of an IN list that
        # SQLAlchemy renders with one placeholder per id (a 5,000-id plan read twice as fast).
        listed = func.json_each(json.dumps(list(ids))).table_valued("value")
        return column.in_(select(listed.c.value))  # type: ignore[no-any-return]
    return column.in_(ids)  # type: ignore[no-any-return]


def check_deletable(session: Session, principal: Principal, account_id: str, ids: Sequence[str]) -> list[str]:
    """Check, in one query, that every id is a message of ``account_id`` visible to
    ``principal`` (its tenant, and for a member an account of its own); else
    :class:`NotFound` naming the unknown ids. Returns the ids stored in the account's Trash
    now: deleting those is permanent whatever ``permanent`` says."""
    unique = list(dict.fromkeys(ids))
    base = (
        select()
        .select_from(Message)
        .join(Folder, Folder.id == Message.folder_id)
        .join(Account, Account.id == Message.account_id)
        .where(
            Message.tenant_id == principal.tenant_id,
            Message.account_id == account_id,
            _id_in(session, Message.id, unique),
        )
    )
    if not principal.is_admin:
        base = base.where(Account.user_id == principal.user_id)
    # One row back, not one per id: how many were found, and the ids of those in Trash
    # (ids hold no comma). Fetching and hashing 5,000 rows was most of the check.
    found, trash = session.execute(
        base.add_columns(
            func.count(),
            func.aggregate_strings(case((Folder.special_use == "trash", Message.id)), ","),
        )
    ).one()
    if found != len(unique):
        # A 404: the rows themselves, to name the ids that are not there.
        seen = set(session.scalars(base.add_columns(Message.id)).all())
        unknown = [i for i in unique if i not in seen]
        raise NotFound(
            f"{len(unknown)} of the messages were not found in this account; nothing was queued",
            details={"message_ids": unknown[:MAX_LISTED]},
        )
    if not trash:
        return []
    in_trash = set(trash.split(","))
    return [i for i in unique if i in in_trash]


@dataclass
class Row:
    id: str
    uid: int
    seen: bool


@dataclass
class Plan:
    trash: Folder | None
    folders: dict[str, Folder]
    moves: dict[str, list[Row]] = field(default_factory=lambda: defaultdict(list))
    expunges: dict[str, list[Row]] = field(default_factory=lambda: defaultdict(list))
    already_moved: int = 0
    gone: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(len(r) for r in self.moves.values()) + sum(len(r) for r in self.expunges.values())


def plan_delete(
    session: Session, account_id: str, ids: list[str], permanent: bool, in_trash: set[str]
) -> Plan:
    folders = {f.id: f for f in session.scalars(select(Folder).where(Folder.account_id == account_id))}
    by_name = sorted(folders.values(), key=lambda f: f.name)
    trash = next((f for f in by_name if f.special_use == "trash"), None)
    plan = Plan(trash=trash, folders=folders)
    found: set[str] = set()
    m = messages_table.c
    # Core columns, not ORM ones: plain tuples are read faster. Up to 5,000 ids fit one
    # statement on either backend (SQLite allows 32,766 parameters).
    for chunk in chunks(ids, 5000):
        query = select(m.id, m.folder_id, m.uid, m.seen).where(
            m.account_id == account_id, _id_in(session, m.id, chunk)
        )
        trash_id = trash.id if trash is not None else None
        expunges, moves = plan.expunges, plan.moves
        for id_, folder_id, uid, seen in session.execute(query).tuples().all():  # one fetch
            found.add(id_)
            if uid < 1:
                raise SyncRequired(
                    f"folder {folders[folder_id].name!r} is being rebuilt by a sync; "
                    "let it finish, then delete again"
                )
            item = Row(id_, uid, bool(seen))
            if permanent or id_ in in_trash:
                expunges[folder_id].append(item)
            elif folder_id == trash_id:
                plan.already_moved += 1  # moved by an earlier attempt of this task
            else:
                moves[folder_id].append(item)
    plan.gone = [i for i in ids if i not in found]
    if plan.moves and trash is None:
        raise DeleteRefused("this account has no \\Trash folder (sync first, or delete permanently)")
    return plan


def move_rows(session: Session, source: Folder, trash: Folder, rows: list[Row], new: dict[int, int]) -> None:
    moved = [r for r in rows if r.uid in new]
    if not moved:
        return
    # One statement per batch, not one UPDATE per row, so the batch's write keeps up with
    # its IMAP command: on PostgreSQL a join with the unnested (id, uid) pairs, on SQLite
    # with json_each of an {id: uid} object, elsewhere a CASE of the new UIDs (about half
    # again as slow on PostgreSQL; on SQLite each row's CASE walks the whole batch).
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(
            _PG_MOVE,
            {
                "trash": trash.id,
                "source": source.id,
                "ids": ",".join(r.id for r in moved),
                "uids": ",".join(str(new[r.uid]) for r in moved),
                "now": utcnow(),
            },
        )
    elif dialect == "sqlite" and SQLITE_JSON:
        session.execute(
            _SQLITE_MOVE,
            {
                "trash": trash.id,
                "source": source.id,
                "pairs": json.dumps({r.id: new[r.uid] for r in moved}),
                "now": utcnow(),
            },
        )
    else:
        _move_rows_portable(session, source, trash, moved, new)
    unread = sum(1 for r in moved if not r.seen)
    _move_counts(session, source.id, trash.id, len(moved), unread)


def _move_counts(session: Session, source_id: str, trash_id: str, total: int, unread: int) -> None:
    """Both folders' counts in one UPDATE: ``total`` and ``unread`` leave the source for Trash."""
    into_trash = Folder.id == trash_id
    session.execute(
        update(Folder)
        .where(Folder.id.in_([source_id, trash_id]))
        .values(
            message_count=Folder.message_count + case((into_trash, total), else_=-total),
            unread_count=Folder.unread_count + case((into_trash, unread), else_=-unread),
        )
        .execution_options(synchronize_session=False)
    )


# The ids and UIDs travel as comma-joined text (see _id_in). The join finds the rows by
# primary key once the planner knows the batch is small beside the folder (a hash join
# over the folder's rows while the folder is small too).
_PG_MOVE = text(
    "UPDATE messages AS m SET folder_id = :trash, uid = v.uid, modseq = NULL, updated_at = :now "
    "FROM unnest(string_to_array(:ids, ','), CAST(string_to_array(:uids, ',') AS bigint[])) AS v(id, uid) "
    "WHERE m.id = v.id AND m.folder_id = :source"
)
# Not one statement with the counts (WITH … UPDATE … RETURNING feeding the folders'
# UPDATE, as the permanent delete does): bench_delete's service-alone move ran slower with
# it in 4 of 5 runs (median 1,011 ms against 809), though a same-process comparison of the
# batch write alone favoured it (40 ms against 46); not explained (same plans when
# EXPLAINed custom and generic), so the move keeps this statement.


# The same on SQLite: json_each of {id: new uid} gives (key, value) rows, each finding its
# message by primary key.
_SQLITE_MOVE = text(
    "UPDATE messages SET folder_id = :trash, uid = v.value, modseq = NULL, updated_at = :now "
    "FROM json_each(:pairs) AS v WHERE messages.id = v.key AND messages.folder_id = :source"
).bindparams(bindparam("now", type_=UTCDateTime()))


def _move_rows_portable(
    session: Session, source: Folder, trash: Folder, moved: list[Row], new: dict[int, int]
) -> None:
    session.execute(
        update(messages_table)
        .where(messages_table.c.id.in_([r.id for r in moved]), messages_table.c.folder_id == source.id)
        .values(
            folder_id=trash.id,
            uid=case({r.id: new[r.uid] for r in moved}, value=messages_table.c.id),
            modseq=None,
            updated_at=utcnow(),
        )
    )


def delete_rows(session: Session, folder: Folder, rows: list[Row]) -> None:
    if not rows:
        return
    ids = [r.id for r in rows]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        joined = ",".join(ids)
        if joined.count(",") == len(ids) - 1:  # no id holds a comma (see _id_in)
            # The rows and the folder's counts in one statement, moved by the rows deleted.
            session.execute(_PG_DELETE, {"ids": joined, "folder": folder.id})
            return
    # On SQLite a plain IN list of the batch's ids: with DELETE … IN (json_each) the
    # permanent delete ran slower in a same-run comparison.
    where = Message.id.in_(ids) if dialect == "sqlite" else _id_in(session, Message.id, ids)
    session.execute(delete(Message).where(where).execution_options(synchronize_session=False))
    bump_counts(session, folder.id, -len(rows), -sum(1 for r in rows if not r.seen))


# A batch's rows of one folder (the plan's, read for this account's tenant) and its counts.
_PG_DELETE = text(
    "WITH gone AS (DELETE FROM messages WHERE id = ANY(string_to_array(:ids, ',')) "
    "AND folder_id = :folder RETURNING seen), "
    "n AS (SELECT count(*) AS total, count(*) FILTER (WHERE NOT seen) AS unread FROM gone) "
    "UPDATE folders AS f SET message_count = f.message_count - n.total, "
    "unread_count = f.unread_count - n.unread FROM n WHERE f.id = :folder AND n.total > 0"
)
