"""The spam check a worker runs: fetch messages from IMAP in batches, score them with the
tenant's layer and lists, store the verdicts, and move spam to ``\\Junk`` where the account
says so. The database side is :mod:`services.spam_store`; scoring is :mod:`services.spam`.

Promises:

* Each message is read with ``UID FETCH BODY.PEEK[]<0.N>`` (never marks it read), at most
  ``spam_max_message_bytes`` of it; the scorer names what it could not read.
* Every batch's verdicts (and, with ``spam_move_to_junk``, the moves of its spam) are one
  transaction, committed right after the batch's IMAP commands, then progress is reported:
  a cancel, crash or fault between batches leaves every finished batch stored.
* A moved message keeps its Mailroom id: its row gets the Junk folder and the UID the
  server named in COPYUID (``services.mail_delete.move_uids``). A message a user labelled
  ham is never moved to Junk by a check. A batch's moves hold the account's sync lock for
  the moves only; while a sync holds it, they are left undone (``move_deferred``).
* Learning (``learn``): the messages are fetched, the tenant's layer learns from those it
  has not learned that label from yet (under the tenant's row lock: a retried or
  redelivered lesson is not learned twice), they are scored again with the new layer, and
  (with ``spam_move_to_junk``) spam goes to Junk and ham found in Junk back to INBOX.
* Ids no longer stored, or whose UID the server no longer has, are counted as ``gone``.
* A folder whose UIDVALIDITY changed since the last sync raises :class:`SyncRequired`
  before anything of it is read: its stored UIDs no longer name its messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import imapclient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services import accounts, spam_store
from services.accounts import imap_endpoint
from services.crypto import SecretBox
from services.db import transaction
from services.errors import NotFound
from services.mail.imap import imap_session
from services.mail_delete import move_uids
from services.mail_delete_rows import Row, SyncRequired, move_rows
from services.models import Account, Folder
from services.settings import Settings
from services.spam import LayerFormatError, SpamdClient, TenantLayer, Verdict, score_message
from services.spam_store import Target, TenantSpam
from services.task_inputs import SpamCheckParams

log = logging.getLogger(__name__)

#: Messages per FETCH, and the bytes of message text a batch may hold at most.
BATCH_SIZE = 200
BATCH_BYTES = 16 * 1024 * 1024

Report = Callable[[float, str], None]


@dataclass
class _Run:
    sessions: sessionmaker[Session]
    account_id: str
    task_id: str
    tenant_id: str
    spam: TenantSpam
    layer: TenantLayer | None
    spamd: SpamdClient | None
    cap: int
    folders: dict[str, Folder]
    move_to_junk: bool
    learn: str | None
    total: int
    progress: Report
    batch_size: int = BATCH_SIZE
    client: imapclient.IMAPClient | Any = None
    scored: int = 0
    spam_count: int = 0
    moved: int = 0
    gone: int = 0
    done: int = 0
    truncated: int = 0
    learned: int = 0
    move_deferred: int = 0
    per_message: list[dict[str, Any]] | None = None
    moved_to: dict[str, str] = field(default_factory=dict)
    #: Folder id → the UIDs this run's moves were given there (COPYUID).
    placed: dict[str, list[int]] = field(default_factory=dict)

    def special(self, use: str) -> Folder | None:
        return next(
            (f for f in sorted(self.folders.values(), key=lambda f: f.name) if f.special_use == use), None
        )

    @property
    def junk(self) -> Folder | None:
        return self.special("junk")

    @property
    def inbox(self) -> Folder | None:
        return self.special("inbox")


def _spamd_client(settings: Settings) -> SpamdClient | None:
    """The optional spamd backend, when an address is configured."""
    return SpamdClient.from_url(settings.spamd_url) if settings.spamd_url else None


def _layer(data: bytes | None) -> TenantLayer | None:
    """The stored layer; one that cannot be read scores as none (and the next lesson
    starts a new one) rather than failing every check of the tenant."""
    if not data:
        return None
    try:
        return TenantLayer.from_bytes(data)
    except LayerFormatError:
        log.error("a tenant's spam layer could not be read; scoring without it")
        return None


def _body(data: dict[bytes, Any]) -> bytes | None:
    for key, value in data.items():
        if key.startswith(b"BODY[") and isinstance(value, bytes):
            return value
    return None


def fetch_raw(client: imapclient.IMAPClient, uids: list[int], cap: int) -> dict[int, bytes]:
    """UID → the first ``cap`` bytes of each message the selected folder still has."""
    answer = client.fetch(uids, [f"BODY.PEEK[]<0.{cap}>".encode()])
    out: dict[int, bytes] = {}
    for uid, data in answer.items():
        raw = _body(data)
        if raw is not None:
            out[int(uid)] = raw
    return out


def _batches(targets: list[Target], cap: int, count: int) -> Iterable[list[Target]]:
    """``count`` messages at most, and no more than :data:`BATCH_BYTES` of message text."""
    batch: list[Target] = []
    size = 0
    for target in targets:
        cost = min(target.size or cap, cap)
        if batch and (len(batch) >= count or size + cost > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(target)
        size += cost
    if batch:
        yield batch


def _select(run: _Run, folder: Folder) -> None:
    # EXAMINE (read-only) unless messages may move out of the folder.
    selected = run.client.select_folder(folder.name, readonly=not run.move_to_junk)
    if folder.uidvalidity is None or selected.get(b"UIDVALIDITY") != folder.uidvalidity:
        raise SyncRequired(
            f"folder {folder.name!r} changed on the server since the last sync (UIDVALIDITY); "
            "sync the account, then check again",
            details={"folder": folder.name},
        )


def _score(run: _Run, raw: bytes) -> Verdict:
    return score_message(raw, layer=run.layer, lists=run.spam.lists(), spamd=run.spamd)


def _label(target: Target, learn: str | None) -> str | None:
    return learn or target.label


def _judged_spam(run: _Run, target: Target, verdict: Verdict) -> bool:
    label = _label(target, run.learn)
    if label is not None:
        return label == "spam"
    return verdict.is_spam(run.spam.threshold)


def _learned(current: bytes | None, raws: list[bytes], is_spam: bool, threshold: float) -> bytes:
    layer = _layer(current) or TenantLayer()
    for raw in raws:
        layer.learn(raw, is_spam, threshold=threshold)
    return layer.to_bytes()


def _destination(run: _Run, folder: Folder, target: Target, spam: bool) -> Folder | None:
    """Where a checked message goes: spam to Junk, and a message a user called ham out of
    Junk to INBOX; nothing leaves Junk or Trash because of a score alone."""
    if not run.move_to_junk:
        return None
    if spam and folder.special_use not in ("junk", "trash"):
        return run.junk
    if folder.special_use == "junk" and _label(target, run.learn) == "ham":
        return run.inbox
    return None


def _claim(run: _Run) -> bool:
    """Hold the account's sync lock for one batch's moves. A sync beside a move could see
    the message vanish from its folder before its row's new place is written, and drop
    the row or store the Junk copy under a new id. Held only for the moves and their rows'
    write (milliseconds), so a check never holds a sync up; while a sync runs, the batch's
    moves are left undone (its verdicts are stored) and counted as ``move_deferred``."""
    with transaction(run.sessions) as session:
        return accounts.claim_sync_lock(session, run.account_id, run.task_id) is None


def _check_batch(run: _Run, folder: Folder, batch: list[Target]) -> None:
    raws = fetch_raw(run.client, [t.uid for t in batch], run.cap)
    present = [(t, raws[t.uid]) for t in batch if t.uid in raws]
    run.gone += len(batch) - len(present)
    if run.learn is not None and present:
        # One lock of the tenant's row per batch: learners of one tenant take turns.
        is_spam = run.learn == "spam"
        with transaction(run.sessions) as session:
            data, count = spam_store.learn(
                session,
                run.tenant_id,
                run.learn,
                {t.id: raw for t, raw in present},
                lambda current, raws: _learned(current, raws, is_spam, run.spam.threshold),
            )
        run.layer = _layer(data)
        run.learned += count
    verdicts: dict[str, Verdict] = {}
    moves: dict[str, list[Target]] = {}
    targets_to: dict[str, Folder] = {}
    for target, raw in present:
        verdict = _score(run, raw)
        verdicts[target.id] = verdict
        run.truncated += int(len(raw) >= run.cap)
        spam = _judged_spam(run, target, verdict)
        run.spam_count += int(spam)
        to = _destination(run, folder, target, spam)
        if to is not None:
            moves.setdefault(to.id, []).append(target)
            targets_to[to.id] = to
    if moves and not _claim(run):
        run.move_deferred += sum(len(m) for m in moves.values())
        moves = {}
    try:
        new: dict[str, dict[int, int]] = {
            to_id: move_uids(run.client, [t.uid for t in moved], targets_to[to_id].name)
            for to_id, moved in moves.items()
        }
        with transaction(run.sessions) as session:
            spam_store.store_verdicts(session, run.tenant_id, verdicts, run.spam.threshold)
            for to_id, moved in moves.items():
                rows = [Row(t.id, t.uid, t.seen) for t in moved]
                move_rows(session, source=folder, trash=targets_to[to_id], rows=rows, new=new[to_id])
            if moves:
                accounts.release_sync_lock(session, run.account_id, run.task_id)
    except BaseException:
        if moves:
            with transaction(run.sessions) as session:
                accounts.release_sync_lock(session, run.account_id, run.task_id)
        raise
    for to_id, moved in moves.items():
        run.placed.setdefault(to_id, []).extend(new[to_id].values())
        done = [t for t in moved if t.uid in new[to_id]]
        run.moved += len(done)
        run.moved_to.update({t.id: targets_to[to_id].name for t in done})
    run.scored += len(verdicts)
    if run.per_message is not None:
        for target, _raw in present:
            verdict = verdicts[target.id]
            run.per_message.append(
                {
                    "id": target.id,
                    "spam_score": round(min(1.0, max(0.0, verdict.score)), 4),
                    "is_spam": _judged_spam(run, target, verdict),
                    "moved_to": run.moved_to.get(target.id),
                }
            )
    run.done += len(batch)
    run.progress(min(99.0, 100.0 * run.done / max(1, run.total)), f"checked {run.done} of {run.total}")


def _advance(run: _Run, folder: Folder, placed: list[int]) -> None:
    """Let the next sync of ``folder`` go on above the messages this run moved there, when
    nothing else arrived there since its last sync (as a delete does for Trash): their rows
    are stored already, and the sync only looks for expunges below ``last_seen_uid``, so a
    message a user moved out again before the next sync would otherwise go unnoticed."""
    last = folder.last_seen_uid
    if last is None or folder.backfill_below_uid is not None or not placed:
        return
    uidnext = int(run.client.folder_status(folder.name, [b"UIDNEXT"])[b"UIDNEXT"])
    ours = set(placed)
    if min(ours) <= last or max(ours) >= uidnext or len(ours) != uidnext - 1 - last:
        return  # another client put mail there too: the sync must fetch it
    with transaction(run.sessions) as session:
        session.execute(
            update(Folder)
            .where(Folder.id == folder.id, Folder.last_seen_uid == last)
            .values(last_seen_uid=uidnext - 1)
            .execution_options(synchronize_session=False)
        )


def _check_folders(run: _Run, targets: list[Target]) -> None:
    by_folder: dict[str, list[Target]] = {}
    for target in targets:
        by_folder.setdefault(target.folder_id, []).append(target)
    for folder_id in sorted(by_folder, key=lambda f: run.folders[f].name):
        folder = run.folders[folder_id]
        _select(run, folder)
        for batch in _batches(by_folder[folder_id], run.cap, run.batch_size):
            _check_batch(run, folder, batch)
    for folder_id, placed in run.placed.items():
        _advance(run, run.folders[folder_id], placed)


def check_spam(
    sessions: sessionmaker[Session],
    account_id: str,
    params: SpamCheckParams,
    *,
    task_id: str,
    box: SecretBox,
    settings: Settings,
    progress: Report,
    batch_size: int = BATCH_SIZE,
) -> dict[str, Any]:
    """Score the messages ``params`` names and act on the verdicts, as the module docstring
    promises. ``progress`` is called after every committed batch and may raise to stop
    between batches. Returns counts (``scored``, ``spam``, ``moved``, ``gone``), the Junk
    folder's name, and for message ids each message's score and verdict."""
    with transaction(sessions) as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NotFound("account not found")
        endpoint = imap_endpoint(account, box)
        tenant_id = account.tenant_id
        move_to_junk = account.spam_move_to_junk
        spam = spam_store.read_settings(session, tenant_id)
        targets, gone = spam_store.plan_targets(
            session,
            account_id,
            message_ids=params.message_ids,
            folder=params.folder,
            only_unscored=params.only_unscored,
        )
        folders = {f.id: f for f in session.scalars(select(Folder).where(Folder.account_id == account_id))}
        session.expunge_all()  # folders are read, never written, through the ORM
    run = _Run(
        sessions=sessions,
        account_id=account_id,
        task_id=task_id,
        tenant_id=tenant_id,
        spam=spam,
        layer=_layer(spam.layer),
        spamd=_spamd_client(settings),
        cap=settings.spam_max_message_bytes,
        folders=folders,
        move_to_junk=move_to_junk,
        learn=params.learn,
        total=len(targets),
        progress=progress,
        batch_size=batch_size,
        gone=len(gone),
        per_message=[] if params.message_ids is not None else None,
    )
    progress(0, f"checking {len(targets)} messages")
    if targets:
        with imap_session(
            endpoint, timeout=settings.mail_timeout_seconds, allow_private=settings.allow_private_hosts
        ) as client:
            run.client = client
            _check_folders(run, targets)
    progress(100, "done")
    junk = run.junk
    result: dict[str, Any] = {
        "scored": run.scored,
        "spam": run.spam_count,
        "moved": run.moved,
        "gone": run.gone,
        "truncated": run.truncated,
        "move_deferred": run.move_deferred,
        "junk_folder": junk.name if junk is not None and move_to_junk else None,
    }
    if params.learn is not None:
        result.update(learned=run.learned, label=params.learn)
    if run.per_message is not None:
        result["messages"] = run.per_message
    return result
