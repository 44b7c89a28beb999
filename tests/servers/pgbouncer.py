"""A private PgBouncer in transaction pooling mode in front of a test PostgreSQL."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Self

from .ports import free_port, wait_for_port
from .postgres import OS_USER, SUPERUSER, PostgresServer
from .processes import ServerProcess, ServerStartError, kill_group, running_as_root


def pgbouncer_executable() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if found is None:
        raise ServerStartError("pgbouncer not found: install the Debian package pgbouncer")
    return found


class PgBouncerServer(ServerProcess):
    """``pgbouncer`` on a free 127.0.0.1 port, ``pool_mode = transaction`` (a server
    connection is lent for one transaction only, as in production setups that need it),
    every database of ``postgres`` reachable under its own name, trust auth for the
    superuser. PgBouncer refuses to run as root: as root it runs as the OS user postgres.

    Promises: after ``start()`` it accepts connections on ``port``; ``database_url(name)``
    is the SQLAlchemy URL of database ``name`` through it."""

    def __init__(self, postgres: PostgresServer, *, pool_size: int = 4) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="mailroom-pgbouncer-")))
        self.postgres, self.pool_size = postgres, pool_size
        self.host, self.port = "127.0.0.1", free_port()

    @property
    def log_path(self) -> Path:
        return self.dir / "pgbouncer.log"

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{name}"

    def start(self) -> Self:
        self._check_startable()
        (self.dir / "users.txt").write_text(f'"{SUPERUSER}" ""\n')
        config = self.dir / "pgbouncer.ini"
        config.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={self.postgres.host} port={self.postgres.port}",
                    "[pgbouncer]",
                    f"listen_addr = {self.host}",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {self.dir / 'users.txt'}",
                    "pool_mode = transaction",
                    f"default_pool_size = {self.pool_size}",
                    "max_client_conn = 200",
                    "ignore_startup_parameters = extra_float_digits,options",
                    f"logfile = {self.log_path}",
                    f"pidfile = {self.dir / 'pgbouncer.pid'}",
                ]
            )
            + "\n"
        )
        argv = [pgbouncer_executable(), str(config)]
        if running_as_root():
            shutil.chown(self.dir, OS_USER, OS_USER)
            for path in self.dir.iterdir():
                shutil.chown(path, OS_USER, OS_USER)
            os.chmod(self.dir, 0o755)
            argv = ["runuser", "-u", OS_USER, "--", *argv]
        proc = self._spawn(argv, log_path=self.dir / "stdout.log", cwd=self.dir)
        try:
            wait_for_port(self.host, self.port, process=proc, log_path=self.log_path)
        except BaseException:
            kill_group(proc)
            raise
        return self
