"""A private Redis Sentinel (``redis-server --sentinel``) watching one master."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Self

import redis

from .ports import free_port, wait_for_port
from .processes import ServerProcess, kill_group
from .redis import HOST, RedisServer, _quote_config_value, redis_server_executable


class SentinelServer(ServerProcess):
    """One sentinel on a free port monitoring ``master`` as ``name`` with quorum 1, quick to
    act (down after 1 s, failover timeout 5 s). Alone it can fail over on its own say-so;
    fine for tests, never for production (which runs three or more).

    Promises: after ``start()`` it answers on ``port`` and knows the master;
    ``failover()`` asks it to promote a replica and returns once it names a new master
    (the old master may take writes for a moment more, which the new one never sees: use
    a killed master, ``wait_for_master()``, for a failover that loses nothing acknowledged);
    ``master_address()`` is the master it names now."""

    def __init__(self, master: RedisServer, name: str = "mymaster") -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="mailroom-sentinel-")))
        self.master, self.name, self.host, self.port = master, name, HOST, free_port()

    @property
    def log_path(self) -> Path:
        return self.dir / "sentinel.log"

    @property
    def url(self) -> str:
        return f"sentinel://{self.host}:{self.port}"

    def start(self) -> Self:
        self._check_startable()
        config = self.dir / "sentinel.conf"
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            "daemonize no",
            f"dir {_quote_config_value(str(self.dir))}",
            f"logfile {_quote_config_value(str(self.log_path))}",
            f"sentinel monitor {self.name} {self.master.host} {self.master.port} 1",
            f"sentinel down-after-milliseconds {self.name} 1000",
            f"sentinel failover-timeout {self.name} 5000",
            f"sentinel parallel-syncs {self.name} 1",
        ]
        if self.master.password is not None:
            lines.append(f"sentinel auth-pass {self.name} {_quote_config_value(self.master.password)}")
        config.write_text("\n".join(lines) + "\n")
        proc = self._spawn([redis_server_executable(), str(config), "--sentinel"], log_path=self.log_path)
        try:
            wait_for_port(self.host, self.port, process=proc, log_path=self.log_path)
        except BaseException:
            kill_group(proc)
            raise
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5, decode_responses=True)

    def master_address(self) -> tuple[str, int]:
        host, port = self.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return str(host), int(port)

    def wait_for_replicas(self, count: int, timeout: float = 30) -> None:
        """Until the sentinel has discovered ``count`` replicas of the master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.client().execute_command("SENTINEL", "REPLICAS", self.name)) >= count:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the sentinel found no {count} replica(s) of {self.name}")

    def wait_for_master(self, address: tuple[str, int], timeout: float = 30) -> None:
        """Until the sentinel names ``address`` as the master (e.g. after the old one died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master_address() == address:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the sentinel did not promote {address} within {timeout} s")

    def failover(self, timeout: float = 30) -> tuple[str, int]:
        before = self.master_address()
        self.client().execute_command("SENTINEL", "FAILOVER", self.name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.master_address()
            if now != before:
                return now
            time.sleep(0.2)
        raise TimeoutError(f"no failover of {self.name} within {timeout} s")
