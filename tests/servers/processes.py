"""Process-group handling shared by the server classes.

Every server process here is started with ``start_new_session=True``, so it leads its own
process group and everything it forks (Dovecot's services, Celery's pool, …) is in that
group unless it deliberately leaves it. Signalling the group reaches all of them at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self


class ServerStartError(RuntimeError):
    """A server did not come up; the message says why and quotes the end of its log."""


def running_as_root() -> bool:
    """Whether this process is root (then some servers must drop to another user)."""
    return os.geteuid() == 0


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages ("" if unreadable)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, …)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # no such process (any more)
    # The command name (field 2) may contain spaces and parentheses; the fields after
    # the last ")" are fixed.
    return stat[stat.rfind(")") + 2 :].split()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie has exited already; it merely
    waits for a parent, maybe not us, to reap it)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def kill_group(proc: subprocess.Popen[bytes], *, timeout: float = 10) -> None:
    """SIGKILL the whole process group led by ``proc`` and reap ``proc``.

    Safe to call repeatedly and after the process already exited. The group id cannot
    be handed to a stranger while the leader is unreaped or any member lives; once both
    are gone there is nothing left to kill, so the signal is skipped.
    """
    if proc.returncode is not None and not group_members(proc.pid):
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group exited meanwhile
    except PermissionError:
        # No member could be signalled (they all changed user): at least end our child.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        raise RuntimeError(f"process {proc.pid} survived SIGKILL for {timeout}s") from None
    # The other members die asynchronously; wait so callers can rely on "none left" (a
    # restarted server must not find the old one's processes on its port or files).
    while group_members(proc.pid):
        if time.monotonic() >= deadline:  # pragma: no cover
            raise RuntimeError(f"processes {group_members(proc.pid)} survived SIGKILL")
        time.sleep(0.01)


def terminate_group(proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Ask ``proc`` to stop with ``sig``; SIGKILL its group if it is not gone in ``timeout``.

    Afterwards no member of the group is left: children that outlived a clean exit of
    their leader (an orphaned pool process, a Dovecot service) are killed too.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    kill_group(proc)


# Free space /dev/shm must have before a server puts its files there.
_SHM_MIN_FREE_BYTES = 1 << 30


def fast_temp_dir(prefix: str) -> Path:
    """A new temporary directory, in /dev/shm (tmpfs) when it has 1 GiB free.

    Creating a file costs ~250 µs on this VM's ext4 /tmp and a few µs on tmpfs; Dovecot
    creates one file per message, so seeding 10,000 messages takes 4-7 s on disk and
    about 1 s in memory. Containers often give /dev/shm only 64 MB: then the default
    temporary directory is used.
    """
    shm = Path("/dev/shm")
    try:
        stats = os.statvfs(shm)
        usable = os.access(shm, os.W_OK | os.X_OK)
    except OSError:
        usable = False
    if usable and stats.f_bavail * stats.f_frsize >= _SHM_MIN_FREE_BYTES:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_tree(path: Path) -> None:
    """Delete a directory tree, also one containing directories a test made unreadable
    (mode 000), which a non-root user could otherwise not empty."""
    if not path.exists():
        return
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):  # chmod would follow the link out of the tree
                # OSError: not ours (made by another user); rmtree does what it can.
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


class Owned:
    """What one server object owns: its process (group) and its temporary directory.

    ``release()`` kills the process group and deletes the directory, once. The server
    classes register it with ``weakref.finalize``, so it also runs when the object is
    garbage-collected or the interpreter exits: a test that never calls ``stop()`` or
    ``cleanup()`` still leaves no process and no files behind.
    """

    def __init__(self, directory: Path, *, owns_dir: bool = True) -> None:
        self.dir = directory
        self.owns_dir = owns_dir
        self.proc: subprocess.Popen[bytes] | None = None
        # For servers that are not our child process (PostgreSQL daemonizes): how to
        # stop them when released.
        self.emergency_stop: Callable[[], None] | None = None

    def release(self) -> None:
        if self.emergency_stop is not None:
            # Best effort: whatever happens, the process group and directory still go.
            with contextlib.suppress(Exception):
                self.emergency_stop()
        if self.proc is not None:
            kill_group(self.proc)
        if self.owns_dir:
            remove_tree(self.dir)


class ServerProcess:
    """Base of the servers that run as our child process: one process group, one
    temporary directory, and the lifecycle they share.

    ``stop()`` ends the group gracefully (SIGTERM, SIGKILL after a timeout), ``kill()``
    SIGKILLs it at once; both are safe to repeat and keep the directory, so ``start()``
    can run the server again. ``cleanup()`` stops and deletes the directory; so does
    garbage collection or interpreter exit (see ``Owned``). Subclasses implement
    ``start()`` and launch their process with ``_spawn()``.
    """

    stop_timeout: float = 10

    def __init__(self, directory: Path, *, owns_dir: bool = True) -> None:
        self.dir = directory
        self._owned = Owned(directory, owns_dir=owns_dir)
        self._finalizer = weakref.finalize(self, self._owned.release)

    def start(self) -> Self:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """PID of the main process of the latest run (None before the first start)."""
        return self._owned.proc.pid if self._owned.proc is not None else None

    def is_running(self) -> bool:
        proc = self._owned.proc
        return proc is not None and proc.poll() is None

    def processes(self) -> list[int]:
        """PIDs of the live processes of the latest run: main process and children."""
        return group_members(self._owned.proc.pid) if self._owned.proc is not None else []

    def stop(self) -> None:
        """End the process group gracefully: SIGTERM to the main process, SIGKILL to the
        whole group after ``stop_timeout`` seconds. Nothing of it is left running."""
        if self._owned.proc is not None:
            terminate_group(self._owned.proc, timeout=self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL the main process and all its children at once, like a crash."""
        if self._owned.proc is not None:
            kill_group(self._owned.proc)

    def cleanup(self) -> None:
        """Stop and delete the directory; the object cannot be started again."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _check_startable(self) -> None:
        """Raise unless ``start()`` may run now (first thing in every ``start()``)."""
        if not self._finalizer.alive:
            raise RuntimeError(f"{type(self).__name__} was cleaned up; create a new one")
        if self.is_running():
            raise RuntimeError(f"{type(self).__name__} is already running")

    def _spawn(
        self,
        argv: list[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as the leader of a new process group (so stop/kill reach its
        children), stdout and stderr appended to ``log_path``."""
        self._check_startable()
        with open(log_path, "ab") as output:
            proc = subprocess.Popen(
                argv,
                cwd=cwd if cwd is not None else self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._owned.proc = proc
        return proc
