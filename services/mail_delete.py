"""Deleting messages so that the IMAP server and Mailroom agree: move to the SPECIAL-USE
``\\Trash`` folder, or delete permanently, in batches.

Promises:

* :func:`check_deletable` (the API, before anything is queued): every id is a message of
  this account that the caller may see, checked in one query; otherwise :class:`NotFound`.
* :func:`delete_messages` (the worker) touches exactly the requested UIDs: a move is
  ``UID MOVE`` (or ``UID COPY`` + ``\\Deleted`` + ``UID EXPUNGE`` of exactly those UIDs on a
  server without MOVE), a permanent delete is ``\\Deleted`` + ``UID EXPUNGE`` of exactly
  those UIDs, never a plain EXPUNGE. Without UIDPLUS neither is safe (no UID EXPUNGE, no
  COPYUID to learn the new UIDs), so the task is refused before anything is touched.
* A moved message keeps its Mailroom id: its row gets the Trash folder and the UID the
  server named in COPYUID. A permanently deleted message's row is deleted. Each batch's
  rows and the folder counts describing them are committed right after its IMAP command
  succeeds, so a cancel or a fault between batches leaves server and database in agreement
  for every batch done; a retry plans again from the rows, and a message it finds already
  in Trash (moved by an earlier attempt) counts as moved.
* Before its first IMAP command the delete commits a journal of what it is about to do
  (:mod:`services.mail_delete_journal`); it is cleared after the last batch's rows. An
  attempt killed between a command and its rows leaves it behind, and the next delete of
  the account (the retry, or the redelivered task) first brings those rows in line with
  the server from it: moved messages keep their ids under their Trash UIDs, expunged ones
  lose their rows, and a message a server without MOVE copied but did not yet expunge is
  expunged, never copied again. That module's docstring names the window that remains.
* After the moves, when nothing but this run's messages arrived in Trash since the last
  sync, Trash's ``last_seen_uid`` moves past them, so the next sync does not fetch them
  again (it would skip them anyway: it never stores a UID twice).
* A folder whose UIDVALIDITY differs from the stored one, or was never synced, raises
  :class:`SyncRequired` before any message is touched.
* Ids with no row any more, or whose UID the server no longer has, are reported in the
  result under ``gone``; rows of the latter are left for the next sync, which removes them
  or, if another client moved the message, keeps their id in its new folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import imapclient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.accounts import imap_endpoint
from services.crypto import SecretBox
from services.db import transaction
from services.errors import NotFound
from services.mail.imap import imap_session
from services.mail_delete_imap import (
    BATCH_SIZE,
    drain,
    expunges_as_ranges,
    move_uids,
    require_uidplus,
    uid_sets,
)
from services.mail_delete_journal import (
    Reconciled,
    clear_journal,
    has_journal,
    reconcile,
    write_journal,
)
from services.mail_delete_rows import (
    AccountBusy,
    DeleteRefused,
    Plan,
    Row,
    SyncRequired,
    check_deletable,
    delete_rows,
    move_rows,
    plan_delete,
)
from services.models import Account, Folder
from services.settings import Settings
from services.sync.pipeline import BatchWriter

__all__ = [
    "BATCH_SIZE",
    "AccountBusy",
    "DeleteRefused",
    "SyncRequired",
    "check_deletable",
    "delete_messages",
    "move_uids",
]

Report = Callable[[float, str], None]
#: A batch's progress report made inside the batch's own transaction (the task record's
#: progress beside the rows): returns what to raise at the next batch (a cancel), or None.
BatchReport = Callable[[Session, float, str], BaseException | None]
#: Called inside the run's last transaction with the result (the task record's success).
Finish = Callable[[Session, dict[str, Any]], None]


def _check_validity(folder: Folder, validity: Any) -> None:
    if folder.uidvalidity is None or validity != folder.uidvalidity:
        raise SyncRequired(
            f"folder {folder.name!r} changed on the server since the last sync (UIDVALIDITY); "
            "sync the account, then delete again",
            details={"folder": folder.name},
        )


@dataclass
class _Run:
    sessions: sessionmaker[Session]
    client: imapclient.IMAPClient
    account_id: str
    plan: Plan
    batch_size: int
    progress: Report
    submitted: int = 0
    done: int = 0
    moved: int = 0
    deleted: int = 0
    #: The Trash UIDs this run's moves were given (COPYUID).
    trash_uids: list[int] = field(default_factory=list)
    writer: BatchWriter = field(default_factory=BatchWriter)
    #: What the progress report raised (a cancel): the run stops at the next batch.
    stop: BaseException | None = None
    #: Every batch the server did has its rows committed (set when the run stops early).
    settled: bool = False
    #: What an earlier attempt was found to have done (services.mail_delete_journal).
    reconciled: Reconciled = field(default_factory=lambda: Reconciled(deleted=set()))
    #: Each batch's report in the batch's transaction instead of ``progress`` after it.
    report: BatchReport | None = None
    #: Called in the last transaction with the result; then no report follows it.
    on_finish: Finish | None = None
    #: The run's last transaction committed (with ``on_finish`` in it, when given).
    closed: bool = False
    requested: list[str] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        plan = self.plan
        deleted = self.reconciled.deleted or set()
        return {
            "moved": self.moved + plan.already_moved,
            "deleted": self.deleted + sum(1 for i in self.requested if i in deleted),
            "gone": [i for i in plan.gone if i not in deleted],
            "trash_folder": plan.trash.name if plan.trash is not None and plan.moves else None,
        }

    def commit(self, write: Callable[[Session], None], count: int, stage: str) -> None:
        """Commit this batch's rows, then report it, on the writer thread while the next
        IMAP command runs, so neither waits for the other. A report (the cancel point)
        follows its batch's commit; a stop it raised is raised here, at the next batch,
        once that batch's rows are committed too: every batch the server did is."""
        self.writer.wait()  # a failed write raises here, and the journal stays
        if self.stop is not None:
            with transaction(self.sessions) as session:
                write(session)
            self.settled = True
            raise self.stop
        self.submitted += count
        last = self.submitted >= self.plan.total
        if last:  # the last batch: close the run in its transaction
            write = partial(self._close, write)
        self.writer.submit(self._write, write, count, stage, last)

    def _close(self, write: Callable[[Session], None], session: Session) -> None:
        write(session)
        clear_journal(session, self.account_id)
        _advance_trash(session, self)
        if self.on_finish is not None:
            # Every batch's command is done and the result known: the task's success
            # commits with the last rows (no progress report after it).
            self.on_finish(session, self.result())

    def finish(self) -> None:
        self.writer.wait()
        if self.stop is not None:
            self.settled = True
            raise self.stop

    def _write(self, write: Callable[[Session], None], count: int, stage: str, last: bool = False) -> None:
        percent = min(99.0, 100.0 * (self.done + count) / max(1, self.plan.total))
        finished = last and self.on_finish is not None
        stop: BaseException | None = None
        with transaction(self.sessions) as session:
            write(session)
            if self.report is not None and not finished:
                # The report (and its cancel check) in the batch's own transaction: one
                # commit per batch instead of two.
                stop = self.report(session, percent, stage)
        self.done += count
        if last:
            self.closed = True
        if stop is not None:
            self.stop = stop
        if self.report is not None or finished:
            return
        try:
            self.progress(percent, stage)
        except BaseException as exc:  # noqa: BLE001 - handed to the run's thread by commit()
            self.stop = exc


def _batches(rows: list[Row], size: int) -> Iterable[list[Row]]:
    ordered = sorted(rows, key=lambda r: r.uid)
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def _move_folder(run: _Run, source: Folder, rows: list[Row]) -> None:
    trash = run.plan.trash
    assert trash is not None
    client = run.client
    for batch in _batches(rows, run.batch_size):
        uids = [r.uid for r in batch]
        # The journal names this batch (services.mail_delete_journal): a kill after the
        # server moved (or only copied) it and before its rows are committed is put right
        # by the next attempt, which finds the copies in Trash and never copies again.
        new = move_uids(client, uids, trash.name)
        run.moved += len(new)
        run.trash_uids.extend(new.values())
        run.plan.gone += [r.id for r in batch if r.uid not in new]
        run.commit(
            partial(move_rows, source=source, trash=trash, rows=batch, new=new),
            len(batch),
            f"moved {run.moved} to {trash.name}",
        )


def _expunge_folder(run: _Run, folder: Folder, rows: list[Row]) -> None:
    client = run.client
    for batch in _batches(rows, run.batch_size):
        uids = [r.uid for r in batch]
        drain(client)
        # Which of the UIDs the server still has: a SEARCH answer is one short line, cheaper
        # to read than the FETCH answers of a STORE that is not silent.
        present: set[int] = set()
        for command_set in uid_sets(uids):
            present.update(client.search(["UID", command_set]))
        for command_set in uid_sets(present):
            client.add_flags(command_set, [b"\\Deleted"], silent=True)
            client.uid_expunge(command_set)  # exactly these UIDs, never a plain EXPUNGE
        drain(client)
        run.deleted += len(present)
        run.plan.gone += [r.id for r in batch if r.uid not in present]
        run.commit(
            partial(delete_rows, folder=folder, rows=[r for r in batch if r.uid in present]),
            len(batch),
            f"deleted {run.deleted} permanently",
        )


def _advance_trash(session: Session, run: _Run) -> None:
    """Let the next sync of Trash go on above the messages this run moved there, when
    nothing else arrived there since the last sync: their rows are stored already, and the
    sync would otherwise fetch them again only to skip them (``insert_messages`` skips
    stored UIDs, so either way they keep their ids)."""
    trash = run.plan.trash
    if trash is None or not run.trash_uids:
        return
    last = trash.last_seen_uid
    if last is None or trash.backfill_below_uid is not None:
        return  # never synced, or a first sync still walking down: leave it to the sync
    # A folder's UIDs only grow: when this run's Trash UIDs are as many as all the UIDs
    # from last_seen_uid + 1 to their highest, they are exactly those, and whatever came
    # after them has a higher UID that the sync still fetches (no STATUS needed).
    ours = set(run.trash_uids)
    top = max(ours)
    if min(ours) <= last or len(ours) != top - last:
        return  # another client put mail there too: the sync must fetch it
    session.execute(
        update(Folder)
        .where(Folder.id == trash.id, Folder.last_seen_uid == last)
        .values(last_seen_uid=top)
        .execution_options(synchronize_session=False)
    )


def _work(run: _Run) -> None:
    """Every folder's batches, expunges before moves, folders by name."""
    client, plan = run.client, run.plan
    for folder_id in sorted({*plan.moves, *plan.expunges}, key=lambda f: plan.folders[f].name):
        folder = plan.folders[folder_id]
        selected = client.select_folder(folder.name)
        _check_validity(folder, selected.get(b"UIDVALIDITY"))
        if plan.expunges.get(folder_id):
            _expunge_folder(run, folder, plan.expunges[folder_id])
        if plan.moves.get(folder_id):
            _move_folder(run, folder, plan.moves[folder_id])
        # No CLOSE: it would expunge every \Deleted message of the folder. The next
        # SELECT (or LOGOUT) leaves the folder without expunging anything.


def delete_messages(
    sessions: sessionmaker[Session],
    account_id: str,
    message_ids: Sequence[str],
    *,
    permanent: bool,
    in_trash: Iterable[str] = (),
    box: SecretBox,
    settings: Settings,
    progress: Report,
    report: BatchReport | None = None,
    finish: Finish | None = None,
    batch_size: int = BATCH_SIZE,
) -> dict[str, Any]:
    """Move ``message_ids`` to Trash (``permanent`` false; those in ``in_trash`` are
    deleted permanently) or delete them permanently, as the module docstring promises.
    ``progress`` is called after every committed batch and may raise to stop between
    batches; with ``report``, a batch's report is made inside the batch's transaction
    instead (what it returns is raised at the next batch, once that batch's rows are
    committed). With ``finish``, it is called with the result inside the run's last
    transaction (the last batch's rows), and no report follows. Returns
    ``{"moved", "deleted", "gone", "trash_folder"}``."""
    ids = list(dict.fromkeys(message_ids))
    with transaction(sessions) as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFound("account not found")
        endpoint = imap_endpoint(account, box)
        tenant_id = account.tenant_id
        left_behind = has_journal(session, account_id)

    def read_plan(first: bool = True) -> Plan:
        stop: BaseException | None = None
        with transaction(sessions) as session:
            plan = plan_delete(session, account_id, ids, permanent, set(in_trash))
            session.expunge_all()  # the folders are read, never written, through the ORM
            if first and report is not None:  # the first report in the plan's transaction
                stop = report(session, 0, f"deleting {plan.total} messages")
        if stop is not None:
            raise stop
        if first and report is None:
            progress(0, f"deleting {plan.total} messages")
        return plan

    # The plan (thousands of ids) is read while the IMAP login runs.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="delete-plan") as pool:
        planned = pool.submit(read_plan)
        with imap_session(
            endpoint, timeout=settings.mail_timeout_seconds, allow_private=settings.allow_private_hosts
        ) as client:
            expunges_as_ranges(client)
            run = _Run(
                sessions,
                client,
                account_id,
                planned.result(),
                batch_size,
                progress,
                report=report,
                on_finish=finish,
                requested=ids,
            )
            if left_behind:
                # An attempt died between an IMAP command and its rows: put them right,
                # then plan again from the rows as they are now.
                require_uidplus(client)
                run.reconciled = reconcile(sessions, client, account_id)
                run.plan = read_plan(first=False)
            _delete(run, account_id, tenant_id)
    result = run.result()
    if finish is None:
        progress(100, "done")
    elif not run.closed:  # no batch (every id gone): the success in a transaction of its own
        with transaction(sessions) as session:
            finish(session, result)
    return result


def _delete(run: _Run, account_id: str, tenant_id: str) -> None:
    """The run's IMAP work and row writes, between committing the journal and clearing it.
    The run ends in one transaction: the last batch's rows, the journal cleared and Trash's
    ``last_seen_uid`` moved on."""
    sessions, client, plan = run.sessions, run.client, run.plan
    if plan.total:
        require_uidplus(client)
    trash_uidnext = _check_folders(client, plan)
    if plan.total:
        with transaction(sessions) as session:
            write_journal(session, tenant_id, account_id, plan, trash_uidnext)
    with run.writer:
        try:
            _work(run)  # its last batch's transaction clears the journal
            run.finish()
        except BaseException:
            if run.settled:  # stopped between batches with every batch written
                with transaction(sessions) as session:
                    clear_journal(session, account_id)
            raise


def _check_folders(client: imapclient.IMAPClient, plan: Plan) -> int | None:
    """Every involved folder's UIDVALIDITY, so a stale one refuses the task untouched;
    returns Trash's UIDNEXT when the plan moves messages there."""
    involved = [plan.folders[f] for f in {*plan.moves, *plan.expunges}]
    trash = plan.trash if plan.moves else None
    uidnext: int | None = None
    for folder in involved:
        status = client.folder_status(folder.name, [b"UIDVALIDITY"])
        _check_validity(folder, status.get(b"UIDVALIDITY"))
    if trash is not None:
        status = client.folder_status(trash.name, [b"UIDVALIDITY", b"UIDNEXT"])
        _check_validity(trash, status.get(b"UIDVALIDITY"))
        uidnext = int(status[b"UIDNEXT"])
    return uidnext
