"""IMAP connections a send worker process keeps per account for filing Sent copies.

Filing a copy is one APPEND (plus a FETCH to store its row); logging in, finding the
Sent folder and selecting it again for every message cost more than that. A connection is reused for the
account's next message while it is younger than ``idle_seconds`` since its last use and
has filed fewer than ``max_uses`` copies; any fault closes it, so a broken one is never
reused. Threads of one worker process (``mailroom run``'s send worker) share the pool: a
connection is taken out of it while a task uses it, so no two tasks ever use one at once; a
task that finds none makes its own, and of two returned for one account the second is
closed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import imapclient
from imapclient.exceptions import IMAPClientError

from services.mail.hosts import resolve_host
from services.mail.imap import ImapEndpoint, _close, classify_imap_error, login_pinned


@dataclass
class _Pooled:
    client: imapclient.IMAPClient
    used: float
    uses: int = 0
    #: The Sent folder's name, found once per connection.
    sent_folder: str | None = None
    #: The folder selected on this connection and its UIDVALIDITY: the next copy of the
    #: account's goes to the same folder, so it is selected once, not once per message.
    selected: str | None = None
    uidvalidity: int = 0

    def select(self, folder: str) -> int:
        """Select ``folder`` (read-only) unless it is selected already; its UIDVALIDITY."""
        if self.selected != folder:
            self.selected = None
            status = self.client.select_folder(folder, readonly=True)
            self.selected, self.uidvalidity = folder, int(status[b"UIDVALIDITY"])
        return self.uidvalidity


@dataclass
class ImapPool:
    idle_seconds: float
    max_uses: int
    _conns: dict[tuple[object, ...], _Pooled] = field(default_factory=dict)

    @contextmanager
    def session(
        self, key: tuple[object, ...], endpoint: ImapEndpoint, *, timeout: float, allow_private: bool
    ) -> Iterator[_Pooled]:
        """A logged-in connection for ``key``; faults come out as Mailroom mail errors."""
        now = time.monotonic()
        for stale_key, stale in list(self._conns.items()):
            if now - stale.used > self.idle_seconds:
                self._drop(stale_key)
        pooled = self._conns.pop(key, None)
        if pooled is None:
            pooled = _Pooled(self._connect(endpoint, timeout, allow_private), now)
        try:
            yield pooled
        except (IMAPClientError, OSError) as exc:
            _close(pooled.client)
            raise classify_imap_error(exc, "IMAP") from exc
        except BaseException:
            _close(pooled.client)
            raise
        pooled.used = time.monotonic()
        pooled.uses += 1
        if pooled.uses >= self.max_uses or key in self._conns:
            _close(pooled.client)  # worn out, or another task's connection was returned first
        else:
            self._conns[key] = pooled

    @staticmethod
    def _connect(endpoint: ImapEndpoint, timeout: float, allow_private: bool) -> imapclient.IMAPClient:
        pinned = resolve_host(
            endpoint.host, endpoint.port, allow_private=allow_private, field="imap.host", tls=endpoint.tls
        )
        return login_pinned(pinned, endpoint, timeout=timeout)

    def _drop(self, key: tuple[object, ...]) -> None:
        pooled = self._conns.pop(key, None)
        if pooled is not None:
            _close(pooled.client)


_pools: dict[int, ImapPool] = {}


def process_pool(idle_seconds: float, max_uses: int) -> ImapPool:
    """This process's :class:`ImapPool` (a forked child gets its own)."""
    pool = _pools.get(os.getpid())
    if pool is None:
        _pools.clear()
        pool = _pools[os.getpid()] = ImapPool(idle_seconds, max_uses)
    return pool
