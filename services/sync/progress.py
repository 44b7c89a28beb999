"""Account-wide progress: each folder weighs what it is expected to cost (the messages it
must fetch, by STATUS), so the percentage moves evenly across a whole account rather than
jumping per folder. Reporting is also sync's cancellation checkpoint."""

from __future__ import annotations

from collections.abc import Callable

Report = Callable[[float, str], None]

# The part of 0-100 spent listing folders and asking STATUS, before any fetching.
PREPARE_SHARE = 2.0
DONE_SHARE = 99.0


class ProgressTracker:
    """Turns per-folder advances into ``report(percent, stage)`` calls."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._weights: dict[str, float] = {}
        self._done: dict[str, float] = {}
        self._total = 0.0
        #: Where this plan's folders start: after the listing, or, for a plan that continues
        #: the run into more folders, where the last plan got to (progress never goes back).
        self._start = PREPARE_SHARE
        self._planned = False

    def plan(self, weights: dict[str, float]) -> None:
        """Set each folder's expected cost (messages to fetch, plus a little per check). A
        later plan (more folders in the same run) shares out what is left above the
        percentage reached."""
        if self._planned:
            self._start = self.percent
        self._planned = True
        self._weights = dict(weights)
        self._done = dict.fromkeys(weights, 0.0)
        self._total = sum(weights.values()) or 1.0

    def report(self, percent: float, stage: str) -> None:
        """Report directly (outside the folder phase); may raise TaskCancelled."""
        self._report(percent, stage)

    def add(self, folder: str, amount: float, stage: str) -> None:
        """Folder ``folder`` got ``amount`` further (may be 0); report it. May raise
        :class:`services.errors.TaskCancelled`, which is how a cancel arrives."""
        weight = self._weights.get(folder, 0.0)
        self._done[folder] = min(self._done.get(folder, 0.0) + max(amount, 0.0), weight)
        self._report(self.percent, stage)

    def finish(self, folder: str, stage: str) -> None:
        """Folder ``folder`` is done, whatever its estimate was."""
        self._done[folder] = self._weights.get(folder, 0.0)
        self._report(self.percent, stage)

    @property
    def percent(self) -> float:
        fraction = sum(self._done.values()) / self._total
        return self._start + (DONE_SHARE - self._start) * min(fraction, 1.0)


def count_stage(folder: str, done: int, total: int) -> str:
    """``"INBOX: 1,500 / 10,000"``."""
    return f"{folder}: {done:,} / {max(total, done):,}"
