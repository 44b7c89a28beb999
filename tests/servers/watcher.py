"""``mailroom watcher`` as a subprocess in its own process group, its output in a log file."""

from __future__ import annotations

import re
import sys

from .workers import _CeleryProcess


class WatcherProcess(_CeleryProcess):
    """The watcher role; ``env`` carries its MAILROOM_* settings. Ready once it has
    registered and started its loops."""

    ready_pattern = re.compile(r"watcher \S+ started")

    def __init__(self, env: dict[str, str], *, cwd: str, log_dir: str | None = None) -> None:
        super().__init__(env, app="", cwd=cwd, loglevel="INFO", log_dir=log_dir)

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "mailroom.cli", "watcher"]
