"""A private PostgreSQL cluster for tests."""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
from psycopg import sql

from .ports import free_port, wait_for_port
from .processes import Owned, ServerStartError, log_tail, process_alive, running_as_root

HOST = "127.0.0.1"
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; as root every server command runs as this OS user.
OS_USER = "postgres"


def _bin_dir() -> Path:
    """Where initdb and pg_ctl live: ``$PG_BIN``, Debian's newest
    /usr/lib/postgresql/N/bin, or the directory of ``initdb`` on PATH."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise ServerStartError(
        "PostgreSQL server binaries not found: install the Debian package "
        "postgresql (or set PG_BIN to the directory holding initdb and pg_ctl)"
    )


class PostgresServer:
    """A PostgreSQL cluster of its own: ``initdb`` into a temporary directory, listening on
    a free 127.0.0.1 port, trust authentication for the superuser ``postgres``.

    Promises: after ``start()`` returns, ``url`` accepts connections. ``stop()`` shuts the
    server down and leaves no postgres process behind; it is safe to call twice or
    without ``start()``, and ``start()`` afterwards brings the same cluster (same port,
    same databases) back. ``cleanup()`` stops and deletes the directory; this also
    happens by itself when the object is garbage-collected or the interpreter exits.
    Durability is off (fsync, synchronous_commit, full_page_writes): tests never need
    crash safety.

    As root the cluster belongs to the OS user ``postgres`` (commands go through
    ``runuser``, the directory is chowned to it); as any other user it belongs to that
    user and no ``runuser`` is involved.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        max_connections: int = 200,
        extra_settings: dict[str, str] | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        self.host = HOST
        self.port = port or free_port()
        self.max_connections = max_connections
        self.extra_settings = dict(extra_settings or {})
        self.dir = Path(tempfile.mkdtemp(prefix="mailroom-pg-", dir=base_dir))
        if running_as_root():
            entry = pwd.getpwnam(OS_USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._bindir: Path | None = None
        self._owned = Owned(self.dir)
        self._finalizer = weakref.finalize(self, self._owned.release)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database."""
        return self.database_url("postgres")

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def is_running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and process_alive(pid)

    def start(self) -> PostgresServer:
        """initdb (first time only) and start the cluster; returns self once it accepts
        connections."""
        if not self._finalizer.alive:
            raise RuntimeError("PostgresServer was cleaned up; create a new one")
        if self.is_running():
            raise RuntimeError("PostgresServer already running")
        bindir = self._bindir = _bin_dir()
        self._owned.emergency_stop = functools.partial(_immediate_stop, bindir, self.data_dir)
        try:
            if not (self.data_dir / "PG_VERSION").exists():
                _run(
                    [
                        str(bindir / "initdb"),
                        "-D", str(self.data_dir),
                        "-A", "trust",
                        "-U", SUPERUSER,
                        "-E", "UTF8",
                        # C locale: a locale named by the environment (LANG) may not be
                        # generated on the machine, and initdb would refuse it.
                        "--locale=C",
                        "--no-sync",
                    ],
                    self.dir,
                )  # fmt: skip
            settings = {
                "port": str(self.port),
                "listen_addresses": self.host,
                # The socket lives in our own directory, never in /var/run/postgresql.
                "unix_socket_directories": str(self.dir),
                "max_connections": str(self.max_connections),
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                **self.extra_settings,
            }
            options = " ".join(f"-c {key}={value}" for key, value in settings.items())
            _run(
                [
                    str(bindir / "pg_ctl"),
                    "-D", str(self.data_dir),
                    "-o", options,
                    "-l", str(self.log_path),
                    "-w", "-t", "30",
                    "start",
                ],
                self.dir,
                self.log_path,
            )  # fmt: skip
            wait_for_port(self.host, self.port, timeout=20, log_path=self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Shut the cluster down (fast mode: sessions are disconnected) and wait until the
        postmaster is gone. The data stays for a later ``start()``."""
        pid = self._postmaster_pid()
        if pid is None or self._bindir is None:
            return
        if process_alive(pid):
            # A failure means it stopped meanwhile, or is stuck: _reap handles both.
            with contextlib.suppress(ServerStartError):
                _run(
                    [str(self._bindir / "pg_ctl"), "-D", str(self.data_dir),
                     "-m", "fast", "-w", "-t", "20", "stop"],
                    self.dir,
                )  # fmt: skip
        _reap(pid)

    def cleanup(self) -> None:
        """Stop the cluster and delete its directory."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- databases -------------------------------------------------------------------

    def database_url(self, name: str) -> str:
        """SQLAlchemy (psycopg 3) URL of database ``name`` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{quote(name, safe='')}"

    def conninfo(self, name: str = "postgres") -> str:
        """libpq connection string for ``psycopg.connect``."""
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={name}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (dropping an old one of that name first);
        returns its SQLAlchemy URL."""
        self.drop_database(name)
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting whoever is still connected."""
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- internals -------------------------------------------------------------------

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line)
        except (OSError, ValueError):
            return None


def _run(argv: list[str], cwd: Path, log_path: Path | None = None) -> None:
    """Run a PostgreSQL tool, as user postgres when we are root; raise with its output."""
    if running_as_root():
        argv = ["runuser", "-u", OS_USER, "--", *argv]
    # cwd: as root, runuser keeps our working directory, which user postgres may not be
    # allowed to enter (e.g. /root); PostgreSQL tools complain about that.
    result = subprocess.run(
        argv,
        check=False,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=60,
    )
    if result.returncode != 0:
        raise ServerStartError(
            f"{' '.join(argv)} failed with exit code {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')}\n{log_tail(log_path)}"
        )


def _reap(pid: int, timeout: float = 10) -> None:
    """Wait for the postmaster ``pid`` to be gone; SIGKILL it if it lingers.

    The postmaster is not our child (pg_ctl daemonizes it), so it is polled, not waited
    for. Its backends exit by themselves once it is gone.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _immediate_stop(bindir: Path, data_dir: Path) -> None:
    """Stop a cluster nobody stopped (its owner object is being released)."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split("\n", 1)[0])
    if process_alive(pid):
        with contextlib.suppress(ServerStartError):
            _run(
                [str(bindir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop"],
                data_dir.parent,
            )
    _reap(pid)
