"""Real Celery worker and beat processes for tests."""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from .processes import ServerProcess, ServerStartError, log_tail, terminate_group

# The repository root (tests/servers/workers.py → ../..): where ``tasks`` is importable.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_APP = "tasks.celery_app"


class _CeleryProcess(ServerProcess):
    """One ``celery`` command run as a subprocess in its own process group, its output
    (stdout and stderr) appended to a log file."""

    ready_pattern: re.Pattern[str]
    stop_timeout = 20

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        app: str,
        cwd: str | Path,
        loglevel: str,
        log_dir: str | Path | None,
    ) -> None:
        # A caller's log_dir (e.g. pytest's tmp_path) is theirs to delete; our own
        # temporary directory goes with cleanup(), garbage collection or interpreter exit.
        kind = type(self).__name__.lower()
        directory = Path(tempfile.mkdtemp(prefix=f"mailroom-{kind}-")) if log_dir is None else Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory, owns_dir=log_dir is None)
        self.env = dict(env)
        self.app = app
        self.cwd = Path(cwd)
        self.loglevel = loglevel
        self.log_path = self.dir / f"{kind}-{uuid.uuid4().hex[:6]}.log"
        self._log_offset = 0

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, wait_ready: bool = True, timeout: float = 60) -> Self:
        """Start the process; with ``wait_ready``, return only once its log says it is
        ready (``ServerStartError`` if it exits first, ``TimeoutError`` after ``timeout``;
        either way nothing of it is left running)."""
        self._check_startable()
        # Our environment (PATH, HOME, …) with the test's settings on top. Unbuffered, so
        # the log shows every line as soon as it is written.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        # wait_for_log() looks only at what this run writes, not at an earlier run's lines.
        self._log_offset = len(self.log_text())
        self._spawn(self._argv(), log_path=self.log_path, cwd=self.cwd, env=env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until this run's log shows the process is ready (after
        ``start(wait_ready=False)``, e.g. to start several workers in parallel).
        On failure the process group is killed and the error quotes the log."""
        try:
            self.wait_for_log(self.ready_pattern, timeout=timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float | None = None) -> None:
        """Warm shutdown: SIGTERM, which lets running tasks finish; after ``timeout``
        (default 20) seconds SIGKILL the whole group. Nothing of it is left running
        afterwards. The log stays readable; ``start()`` runs it again."""
        if self._owned.proc is not None:
            terminate_group(self._owned.proc, timeout=self.stop_timeout if timeout is None else timeout)

    def kill(self) -> None:
        """SIGKILL the main process and its pool children at once, as a crash or an
        out-of-memory kill would: running tasks die mid-way and are not acknowledged."""
        super().kill()

    def cleanup(self) -> None:
        """Stop (if running) and delete the log directory, unless the caller gave
        ``log_dir``."""
        super().cleanup()

    # -- log -------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the process wrote so far (all runs of this object)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 30) -> str:
        """Wait until the log written since the last ``start()`` matches ``pattern`` (a
        regex); returns the matching line. Fails early if the process exits."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[self._log_offset :]
            for line in text.splitlines():
                if regex.search(line):
                    return line
            proc = self._owned.proc
            if proc is not None and proc.poll() is not None:
                raise ServerStartError(
                    f"{type(self).__name__} exited with code {proc.returncode} before "
                    f"its log matched {regex.pattern!r}:\n{log_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{type(self).__name__} log did not match {regex.pattern!r} within "
                    f"{timeout:g}s:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)


class CeleryWorker(_CeleryProcess):
    """A real ``celery worker`` subprocess consuming ``queues``.

    Runs ``python -m celery -A tasks.celery_app worker -Q q1,q2 -c N --hostname
    NAME@%h --without-gossip --without-mingle --loglevel INFO --prefetch-multiplier 1`` in
    ``cwd`` (the repository root) with ``env`` layered over this process's environment.

    Promises: ``start()`` returns once the worker logged ``celery@… ready.`` (it then
    consumes); ``stop()`` is a warm shutdown that waits for running tasks, SIGKILL after a
    timeout; ``kill()`` SIGKILLs the main process and every pool child at once; after
    either nothing of the worker is left running. ``log_text()`` is its whole output.

    The ready line is an INFO record of the ``celery.apps.worker`` logger; if the app
    takes over logging (a ``setup_logging`` signal handler) it must still let that
    through to stderr, or ``start(wait_ready=True)`` times out.
    """

    def __init__(
        self,
        queues: Sequence[str],
        env: Mapping[str, str],
        concurrency: int = 1,
        name: str | None = None,
        cwd: str | Path = REPO_ROOT,
        *,
        app: str = DEFAULT_APP,
        loglevel: str = "INFO",
        pool: str = "prefork",
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
    ) -> None:
        super().__init__(env, app=app, cwd=cwd, loglevel=loglevel, log_dir=log_dir)
        if not queues:
            raise ValueError("a worker needs at least one queue")
        self.queues = list(queues)
        self.concurrency = concurrency
        self.name = name or f"w-{'-'.join(self.queues)}-{uuid.uuid4().hex[:6]}"
        self.pool = pool
        self.extra_args = list(extra_args)
        # "[… INFO/MainProcess] NAME@host ready." from celery.apps.worker.
        self.ready_pattern = re.compile(rf"{re.escape(self.name)}@\S+ ready\.")

    @property
    def hostname(self) -> str:
        """The node name, as used by ``app.control`` (``--hostname NAME@%h``)."""
        return f"{self.name}@{socket.gethostname()}"

    def _argv(self) -> list[str]:
        return [
            sys.executable, "-m", "celery",
            "-A", self.app,
            "worker",
            "-Q", ",".join(self.queues),
            "-c", str(self.concurrency),
            "-P", self.pool,
            "--hostname", f"{self.name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel", self.loglevel,
            "--prefetch-multiplier", "1",
            *self.extra_args,
        ]  # fmt: skip


class CeleryBeat(_CeleryProcess):
    """A real ``celery beat`` subprocess: ``python -m celery -A tasks.celery_app beat
    --schedule <tmp>/beat-schedule``, in ``cwd`` with ``env`` over this environment.

    Promises: ``start()`` returns once beat logged ``beat: Starting...``; its schedule
    state file lives in the temporary directory (a new object starts with no memory of
    past runs); ``stop()``/``kill()`` as for ``CeleryWorker``.
    """

    ready_pattern = re.compile(r"beat: Starting\.\.\.")

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        app: str = DEFAULT_APP,
        cwd: str | Path = REPO_ROOT,
        loglevel: str = "INFO",
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
    ) -> None:
        super().__init__(env, app=app, cwd=cwd, loglevel=loglevel, log_dir=log_dir)
        self.extra_args = list(extra_args)

    @property
    def schedule_path(self) -> Path:
        return self.dir / f"{self.log_path.stem}-beat-schedule"

    def _argv(self) -> list[str]:
        return [
            sys.executable, "-m", "celery",
            "-A", self.app,
            "beat",
            "--schedule", str(self.schedule_path),
            "--loglevel", self.loglevel,
            *self.extra_args,
        ]  # fmt: skip


class WorkerHostProcess(_CeleryProcess):
    """``mailroom worker-host`` as a subprocess: one Celery worker per queue of ``queues``
    (name → threads) in one process, as ``mailroom run`` starts it (tasks/embedded.py).

    ``prelude``, if given, is Python run in that process before the command (a benchmark's
    variant of the host). ``start()`` returns once every queue's worker logged
    ``QUEUE@host ready.``; ``stop()`` is a warm shutdown, as for :class:`CeleryWorker`.
    """

    def __init__(
        self,
        queues: Mapping[str, int],
        env: Mapping[str, str],
        cwd: str | Path = REPO_ROOT,
        *,
        loglevel: str = "INFO",
        log_dir: str | Path | None = None,
        prelude: str = "",
    ) -> None:
        super().__init__(env, app=DEFAULT_APP, cwd=cwd, loglevel=loglevel, log_dir=log_dir)
        if not queues:
            raise ValueError("a worker host needs at least one queue")
        self.queues = dict(queues)
        self.prelude = prelude
        # The last queue's line: the host logs them in order once every worker started.
        last = list(self.queues)[-1]
        self.ready_pattern = re.compile(rf"\b{re.escape(last)}@\S+ ready\.")

    def _argv(self) -> list[str]:
        args = [arg for queue, n in self.queues.items() for arg in ("--queue", f"{queue}:{n}")]
        command = "from mailroom.cli import main; main()"
        return [
            sys.executable, "-c", f"{self.prelude}\n{command}" if self.prelude else command,
            "worker-host", *args,
        ]  # fmt: skip
