"""Redis behind Sentinel: reading ``sentinel://`` URLs and reaching the current master.

The broker and the result backend may each be a Sentinel-watched Redis: their URL lists the
sentinels (``sentinel://[:password@]host:26379[/db];sentinel://host2:26379;...``, kombu's
spelling) and a setting names the master (``MAILROOM_BROKER_SENTINEL_MASTER``). Celery,
kombu and redbeat each take that in their own shape; Mailroom's own Redis clients (the
per-tenant slots, the rate limits) ask the sentinels for the master here, so that after a
failover every client follows the new master.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SCHEME = "sentinel://"


def is_sentinel(url: str) -> bool:
    return url.startswith(SCHEME)


@dataclass(frozen=True)
class SentinelTarget:
    """Where a Sentinel-watched Redis is: the sentinels, the master's name, the database
    number, the master's password and the sentinels' own password (if they have one)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    password: str | None
    sentinel_password: str | None

    def client(self, *, timeout: float = 2.0) -> redis.Redis:
        """A client of the current master (asks the sentinels again after a failover)."""
        sentinel = Sentinel(
            list(self.sentinels),
            sentinel_kwargs={"password": self.sentinel_password, "socket_timeout": timeout}
            if self.sentinel_password
            else {"socket_timeout": timeout},
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        return sentinel.master_for(self.master, db=self.db, password=self.password)

    def limits_uri(self) -> str:
        """The ``limits`` library's spelling (``redis+sentinel://...,.../master``)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{self.master}"

    def transport_options(self) -> dict[str, object]:
        """kombu's and Celery's result backend's spelling (their transport options)."""
        options: dict[str, object] = {"master_name": self.master}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options

    def redbeat_options(self) -> dict[str, object]:
        options: dict[str, object] = {
            "sentinels": list(self.sentinels),
            "service_name": self.master,
            "db": self.db,
            "socket_timeout": 10,
        }
        if self.password:
            options["password"] = self.password
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options


def parse(url: str, *, master: str, password: str | None, sentinel_password: str | None) -> SentinelTarget:
    """Read a ``sentinel://`` URL (several joined by ``;``). The master's password is
    ``password`` if given, else the one in the first URL; the database number comes from
    the first URL's path (default 0)."""
    sentinels: list[tuple[str, int]] = []
    db, url_password = 0, None
    for index, part in enumerate(p for p in url.split(";") if p.strip()):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel://host:port URL: {part.strip()!r}")
        sentinels.append((parts.hostname, parts.port or 26379))
        if index == 0:
            url_password = unquote(parts.password) if parts.password else None
            path = parts.path.strip("/")
            if path:
                if not path.isdigit():
                    raise ValueError("the database in a sentinel:// URL must be a number, e.g. /0")
                db = int(path)
    if not sentinels:
        raise ValueError("a sentinel:// URL names at least one sentinel")
    return SentinelTarget(tuple(sentinels), master, db, password or url_password, sentinel_password)
