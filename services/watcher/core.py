"""The watcher: IMAP connections that wait for changes, and a sync of just the changed folders.

One asyncio loop holds every watched account's connection (no thread per connection):

* **NOTIFY** (RFC 5465) where the server offers it: one connection per account, ``NOTIFY SET
  (personal (MessageNew MessageExpunge FlagChange MailboxName))``; the server then sends a
  STATUS for each folder that changes (CONDSTORE enabled, so flag changes carry
  HIGHESTMODSEQ) and a LIST when folders come, go or are renamed. A NOOP every
  ``watcher_keepalive_seconds`` keeps it under the server's idle timeout.
* **IDLE + STATUS** otherwise: one connection per account too, ``EXAMINE INBOX`` and IDLE;
  every ``watcher_status_seconds`` it leaves IDLE, asks every other folder's STATUS
  (pipelined) and compares with the round before, and re-enters IDLE. The folder list is
  re-read every tenth round.

A change marks its folder dirty (a LIST, an overflow or a reconnect marks the whole
account). A dirty account with no sync in flight gets one at once, through the normal
dispatch (origin ``watcher``), so the account's sync lock still holds. While a sync is in
flight (the watcher's own or anyone's), further changes only accumulate; the poller sees
the sync's record end and dispatches the folders dirtied meanwhile. Nothing is dropped: a
folder leaves the dirty set only for a sync that was created for it, which reads the
folder's STATUS after the change was seen. A (re)connect marks the whole account, after
NOTIFY or the first STATUS round is in place, so changes made while nobody watched are
synced too.

Which accounts a process watches: services.watcher.shard. Accounts are reloaded every
``watcher_reload_seconds``; a changed account (its ``updated_at``) is reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from services.crypto import SecretBox
from services.db import tenant_sessions, transaction, unrestricted_unsafe_sessions
from services.errors import MailroomError
from services.mail.hosts import resolve_host
from services.mail.imap import ImapEndpoint
from services.models import Account, TaskRecord, TaskState
from services.queueing import Queue
from services.settings import Settings
from services.watcher.imap import (
    ImapConnection,
    ImapFailure,
    LoginRefused,
    Untagged,
    encode_mailbox,
    status_values,
)
from services.watcher.shard import Registry, owner

log = logging.getLogger("mailroom.watcher")

T = TypeVar("T")

#: Marks the whole account dirty (a sync of every folder).
ALL = "*"
#: Most folders one sync names (SyncParams); more dirty folders sync the whole account.
MAX_FOLDERS = 500
#: Re-read the folder list every this many STATUS rounds (IDLE + STATUS mode).
LIST_EVERY = 10
#: A connection that lasted this long resets the backoff.
STABLE_SECONDS = 60.0
FINAL_STATES = [s.value for s in TaskState.final()]
NOTIFY_SET = "NOTIFY SET (personal (MessageNew MessageExpunge FlagChange MailboxName))"


IMAP_COLUMNS = (
    Account.imap_host,
    Account.imap_port,
    Account.imap_tls,
    Account.imap_username,
    Account.imap_password_enc,
)


def _stamp(account: Account) -> int:
    return hash(tuple(getattr(account, column.key) for column in IMAP_COLUMNS))


@dataclass(frozen=True)
class Target:
    """One account as the watcher needs it."""

    account_id: str
    tenant_id: str
    user_id: str
    endpoint: ImapEndpoint
    stamp: int

    @property
    def login(self) -> tuple[str, int, str]:
        return (self.endpoint.host.lower(), self.endpoint.port, self.endpoint.username)


@dataclass
class WatchState:
    """What the watcher knows about one account (counters are for tests and the bench)."""

    mode: str = ""  # "notify" or "idle" once connected
    connects: int = 0
    dispatched: int = 0
    last_error: str = ""
    folders: dict[str, dict[str, int]] = field(default_factory=dict)


class AccountWatch:
    def __init__(self, watcher: Watcher, target: Target) -> None:
        self.watcher, self.target = watcher, target
        self.dirty: set[str] = set()
        self.dirty_all = False
        self.inflight: str | None = None
        self.dispatching = False
        # After a failed dispatch (broker or database down): not before this loop time, so
        # an outage does not turn every dirty account into a failed record per poll.
        self.retry_at = 0.0
        self._retry_delay = 0.0
        self.state = WatchState()
        self._listing: list[str] | None = None
        self._statuses: dict[str, dict[str, int]] = {}
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"watch-{target.account_id}")

    # -- changes -------------------------------------------------------------------------

    def mark(self, folder: str) -> None:
        if folder == ALL:
            self.dirty_all = True
        else:
            self.dirty.add(folder)
        self.flush()

    @property
    def is_dirty(self) -> bool:
        return self.dirty_all or bool(self.dirty)

    def flush(self) -> None:
        """Dispatch a sync of the dirty folders unless one is in flight or being queued."""
        if self.inflight is None and not self.dispatching and self.is_dirty:
            if self.retry_at and asyncio.get_running_loop().time() < self.retry_at:
                return
            self.dispatching = True
            asyncio.get_running_loop().create_task(self._dispatch())

    async def _dispatch(self) -> None:
        folders = None if self.dirty_all or len(self.dirty) > MAX_FOLDERS else sorted(self.dirty)
        self.dirty, self.dirty_all = set(), False
        try:
            record_id, created = await self.watcher.blocking(self.watcher.dispatch_sync, self.target, folders)
        except IntegrityError:
            # The account was deleted since the last reload (its sync's record cannot name a
            # row that is gone): nothing to sync, and the next reload stops watching it.
            log.info("watcher: account %s was deleted; it stops being watched", self.target.account_id)
            self.retry_at = asyncio.get_running_loop().time() + self.watcher.settings.watcher_reload_seconds
        except Exception as exc:  # noqa: BLE001 - kept dirty, tried again by the poller
            log.warning("watcher: queueing a sync of account %s failed: %s", self.target.account_id, exc)
            self._restore(folders)
            self._retry_delay = min(max(self._retry_delay * 2, 1.0), 60.0)
            self.retry_at = asyncio.get_running_loop().time() + self._retry_delay
        else:
            self.retry_at, self._retry_delay = 0.0, 0.0
            self.inflight = record_id
            if created:
                self.state.dispatched += 1
            else:  # someone else's sync, which may have read these folders already
                self._restore(folders)
        finally:
            self.dispatching = False

    def _restore(self, folders: list[str] | None) -> None:
        if folders is None:
            self.dirty_all = True
        else:
            self.dirty.update(folders)

    def on_untagged(self, response: Untagged) -> None:
        kind = response.kind
        if kind == "STATUS" and response.mailbox is not None:
            if self.state.mode == "notify":
                self.mark(response.mailbox)
            else:
                self._statuses[response.mailbox] = status_values(response.text)
        elif kind in {"LIST", "LSUB"}:
            if self._listing is not None:
                if response.mailbox and not any(
                    flag in response.text.upper() for flag in ("\\NOSELECT", "\\NONEXISTENT")
                ):
                    self._listing.append(response.mailbox)
            elif self.state.mode == "notify":
                self.mark(ALL)  # a folder came, went or was renamed
        elif kind in {"EXISTS", "EXPUNGE", "FETCH", "VANISHED"} and self.state.mode == "idle":
            self.mark("INBOX")
        elif kind in {"OK", "NO"} and "NOTIFICATIONOVERFLOW" in response.text.upper():
            self.mark(ALL)

    # -- the connection ------------------------------------------------------------------

    async def run(self) -> None:
        settings = self.watcher.settings
        loop = asyncio.get_running_loop()
        backoff = 1.0
        while True:
            delay = backoff
            async with self.watcher.login_slot(self.target.login):
                started = loop.time()
                try:
                    await self._connected()
                except asyncio.CancelledError:
                    raise
                except LoginRefused as exc:
                    self.state.last_error = str(exc)[:300]
                    delay = settings.watcher_backoff_max_seconds
                    log.warning("watcher: account %s: login refused: %s", self.target.account_id, exc)
                except ssl.SSLCertVerificationError as exc:  # as the sync path: not worth a quick retry
                    self.state.last_error = f"the IMAP server's TLS certificate is not valid: {exc}"[:300]
                    delay = settings.watcher_backoff_max_seconds
                    log.warning("watcher: account %s: %s", self.target.account_id, self.state.last_error)
                except (OSError, EOFError, TimeoutError, ImapFailure, MailroomError, ValueError) as exc:
                    self.state.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    log.info("watcher: account %s: %s", self.target.account_id, self.state.last_error)
                except Exception as exc:  # a bug or a server we misread: retry, never stop watching
                    self.state.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("watcher: account %s failed", self.target.account_id, exc_info=True)
                if loop.time() - started > STABLE_SECONDS:
                    delay = backoff = 1.0
                backoff = min(backoff * 2, settings.watcher_backoff_max_seconds)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not secrecy

    async def _connected(self) -> None:
        settings = self.watcher.settings
        endpoint = self.target.endpoint
        pinned = await self.watcher.blocking(
            resolve_host,
            endpoint.host,
            endpoint.port,
            allow_private=settings.allow_private_hosts,
            field="imap.host",
            tls=endpoint.tls,
        )
        conn = await ImapConnection.open(pinned, endpoint, timeout=settings.mail_timeout_seconds)
        conn.on_untagged = self.on_untagged
        try:
            self.state.connects += 1
            if settings.watcher_notify and "NOTIFY" in conn.capabilities:
                await self._watch_notify(conn)
            else:
                await self._watch_idle(conn)
        finally:
            self.state.mode = ""
            conn.close()

    async def _timed(self, awaitable: Any) -> Any:
        return await asyncio.wait_for(awaitable, self.watcher.settings.mail_timeout_seconds)

    async def _watch_notify(self, conn: ImapConnection) -> None:
        if "CONDSTORE" in conn.capabilities and "ENABLE" in conn.capabilities:
            await self._timed(conn.command("ENABLE CONDSTORE"))
        await self._timed(conn.command(NOTIFY_SET))
        self.state.mode = "notify"
        log.info("watcher: account %s: watching every folder (NOTIFY)", self.target.account_id)
        self.mark(ALL)  # whatever changed while nobody watched
        keepalive = self.watcher.settings.watcher_keepalive_seconds
        while True:
            await conn.listen(keepalive)
            await self._timed(conn.command("NOOP"))

    async def _watch_idle(self, conn: ImapConnection) -> None:
        settings = self.watcher.settings
        await self._timed(conn.command("EXAMINE INBOX"))  # its EXISTS is no change
        self.state.mode = "idle"
        items = "MESSAGES UIDNEXT UIDVALIDITY UNSEEN"
        if "CONDSTORE" in conn.capabilities:
            items += " HIGHESTMODSEQ"
        folders = await self._list(conn)
        before = await self._status_round(conn, folders, items)
        log.info(
            "watcher: account %s: watching INBOX (IDLE) and %d folders (STATUS)",
            self.target.account_id,
            len(folders),
        )
        self.mark(ALL)  # whatever changed while nobody watched
        rounds = 0
        wait = min(settings.watcher_status_seconds, settings.watcher_keepalive_seconds)
        idles = "IDLE" in conn.capabilities
        while True:
            if idles:
                await conn.idle(wait)
            else:
                await conn.listen(wait)
                await self._timed(conn.command("NOOP"))
            rounds += 1
            if rounds % LIST_EVERY == 0:
                listed = await self._list(conn)
                if set(listed) != set(folders):
                    self.mark(ALL)
                folders = listed
            after = await self._status_round(conn, folders, items)
            for name, values in after.items():
                if before.get(name) != values:
                    self.mark(name)
            before = after

    async def _list(self, conn: ImapConnection) -> list[str]:
        self._listing = []
        try:
            await self._timed(conn.command('LIST "" "*"'))
            return [name for name in self._listing if name.upper() != "INBOX"]
        finally:
            self._listing = None

    async def _status_round(
        self, conn: ImapConnection, folders: list[str], items: str
    ) -> dict[str, dict[str, int]]:
        self._statuses = {}
        if folders:
            await self._timed(conn.commands([f"STATUS {encode_mailbox(name)} ({items})" for name in folders]))
        self.state.folders = self._statuses
        return self._statuses


class Watcher:
    """Watches this process's share of the accounts until :meth:`run`'s ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        sessions: sessionmaker[Session],
        box: SecretBox,
        registry_client: Any,
        *,
        watcher_id: str | None = None,
    ) -> None:
        self.settings, self.queue, self.box = settings, queue, box
        self.sessions = sessions
        self.id = watcher_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.registry = Registry(
            registry_client, settings.watcher_group, self.id, settings.watcher_ttl_seconds
        )
        self.tenants = {t.strip() for t in settings.watcher_tenants.split(",") if t.strip()}
        self.watches: dict[str, AccountWatch] = {}
        self.live: list[str] = [self.id]
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="watcher")
        self._slots: dict[tuple[str, int, str], asyncio.Semaphore] = {}
        self._stamps: dict[str, int] = {}

    # -- helpers -------------------------------------------------------------------------

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` (database, Redis, DNS) on the small thread pool, not on the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def login_slot(self, login: tuple[str, int, str]) -> asyncio.Semaphore:
        slot = self._slots.get(login)
        if slot is None:
            slot = self._slots[login] = asyncio.Semaphore(self.settings.watcher_max_connections_per_user)
        return slot

    def dispatch_sync(self, target: Target, folders: list[str] | None) -> tuple[str, bool]:
        params: dict[str, Any] = {} if folders is None else {"folders": folders}
        result = self.queue(
            tenant_sessions(self.sessions, target.tenant_id),
            type="sync",
            tenant_id=target.tenant_id,
            user_id=target.user_id,
            account_id=target.account_id,
            params=params,
            origin="watcher",
        )
        return result.record.id, result.created

    # -- the loops -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loops = [
            asyncio.create_task(self._every(self.settings.watcher_heartbeat_seconds, self._heartbeat)),
            asyncio.create_task(self._every(self.settings.watcher_reload_seconds, self.reload)),
            asyncio.create_task(self._every(self.settings.watcher_poll_seconds, self.poll)),
        ]
        log.info("watcher %s started (group %s)", self.id, self.settings.watcher_group)
        try:
            await stop.wait()
        finally:
            for task in loops:
                task.cancel()
            await self._stop_watches(list(self.watches))
            await self.blocking(self.registry.leave)
            self._pool.shutdown(wait=False)
            log.info("watcher %s stopped", self.id)

    async def _every(self, seconds: float, step: Callable[[], Any]) -> None:
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watcher: %s failed", getattr(step, "__name__", step))
            await asyncio.sleep(seconds)

    async def _heartbeat(self) -> None:
        # The liveness file first: a Redis outage must not restart the watcher.
        heartbeat_file = self.settings.worker_heartbeat_file
        if heartbeat_file:
            with contextlib.suppress(OSError):
                Path(heartbeat_file).touch()
        await self.blocking(self.registry.beat)

    async def reload(self) -> None:
        """Take this process's share of the accounts; drop the rest; reconnect changed ones."""
        try:
            live = await self.blocking(self.registry.live)
        except Exception as exc:  # noqa: BLE001 - keep the last known watchers
            log.warning("watcher: cannot read the live watchers: %s", exc)
            live = self.live
        if self.id not in live:
            live = sorted([*live, self.id])
        self.live = live
        stamps = await self.blocking(self._load_stamps)
        mine = {a: s for a, s in stamps.items() if owner(a, live) == self.id}
        gone = [a for a in self.watches if a not in mine or mine[a] != self._stamps.get(a)]
        await self._stop_watches(gone)
        new = [a for a in mine if a not in self.watches]
        if new:
            for target in await self.blocking(self._load_targets, new):
                self._stamps[target.account_id] = target.stamp
                self.watches[target.account_id] = AccountWatch(self, target)
        if gone or new:
            log.info("watcher %s: %d accounts (%d live watchers)", self.id, len(self.watches), len(live))

    async def _stop_watches(self, account_ids: list[str]) -> None:
        tasks = []
        for account_id in account_ids:
            watch = self.watches.pop(account_id, None)
            self._stamps.pop(account_id, None)
            if watch is not None:
                watch.task.cancel()
                tasks.append(watch.task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _everyone(self) -> sessionmaker[Session]:
        return unrestricted_unsafe_sessions(self.sessions)

    def _load_stamps(self) -> dict[str, int]:
        """Each account's id and a hash of its IMAP settings (``updated_at`` moves with every
        sync, so it cannot tell a changed account)."""
        query = select(Account.id, *IMAP_COLUMNS)
        if self.tenants:
            query = query.where(Account.tenant_id.in_(self.tenants))
        with transaction(self._everyone()) as session:
            return {row[0]: hash(tuple(row[1:])) for row in session.execute(query)}

    def _load_targets(self, account_ids: list[str]) -> list[Target]:
        targets: list[Target] = []
        with transaction(self._everyone()) as session:
            for start in range(0, len(account_ids), 500):
                chunk = account_ids[start : start + 500]
                for account in session.scalars(select(Account).where(Account.id.in_(chunk))):
                    try:
                        password = self.box.decrypt(account.imap_password_enc)
                    except Exception:  # noqa: BLE001 - an undecryptable row is skipped, not fatal
                        log.warning("watcher: cannot decrypt the IMAP password of account %s", account.id)
                        continue
                    endpoint = ImapEndpoint(
                        host=account.imap_host,
                        port=account.imap_port,
                        tls=account.imap_tls,
                        username=account.imap_username,
                        password=password,
                    )
                    targets.append(
                        Target(account.id, account.tenant_id, account.user_id, endpoint, _stamp(account))
                    )
        return targets

    async def poll(self) -> None:
        """End the waits of syncs that finished; queue the folders dirtied meanwhile."""
        waiting = {w.inflight: w for w in self.watches.values() if w.inflight is not None}
        if waiting:
            ended = await self.blocking(self._ended, list(waiting))
            for record_id in ended:
                waiting[record_id].inflight = None
        for watch in list(self.watches.values()):
            watch.flush()

    def _ended(self, record_ids: list[str]) -> set[str]:
        """Which of ``record_ids`` are final, or gone (history cleaned up)."""
        with transaction(self._everyone()) as session:
            query = select(TaskRecord.id, TaskRecord.state).where(TaskRecord.id.in_(record_ids))
            found = {str(row[0]): str(row[1]) for row in session.execute(query).all()}
        return {r for r in record_ids if r not in found or found[r] in FINAL_STATES}
