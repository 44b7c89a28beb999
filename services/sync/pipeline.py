"""Overlapping the database with the network: while batch N is turned into rows and
committed on a writer thread, the IMAP connection already fetches batch N+1.

Both sides mostly wait (for Dovecot, for PostgreSQL) with the GIL released, so a first
sync gets close to the speed of the fetch alone. Exactly one batch is in flight, batches
commit in order, and the caller decides when to wait, so the promises of a sequential
loop still hold: a batch is reported (and cancellation checked) only after its commit,
and an error on either side stops the loop with every earlier batch committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class BatchWriter:
    """Runs one write at a time on a background thread; use as a context manager."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-writer")
        self._pending: Future[Any] | None = None

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        """Start ``write(*args)``; the previous write must have been collected with
        :meth:`wait` first."""
        if self._pending is not None:
            raise RuntimeError("collect the previous batch before submitting the next")
        self._pending = self._pool.submit(write, *args)

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def wait(self) -> Any:
        """The result of the write in flight (its exception is raised here)."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc is None:
                self.wait()
            elif self._pending is not None:
                # Another error is already on its way out; let the write finish so its
                # transaction ends (committed or rolled back) before we leave, and only
                # log what it raised.
                try:
                    self.wait()
                except Exception:
                    log.warning("batch write failed while stopping after another error", exc_info=True)
        finally:
            self._pool.shutdown(wait=True)
