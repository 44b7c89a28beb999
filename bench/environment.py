"""What the benchmarks share: private servers, a migrated database, a tenant with an
account, the environment of subprocesses, and small statistics and table helpers.

A benchmark script puts the repository root and ``src`` on ``sys.path`` first (so that
``bench.environment`` imports), then::

    with BenchEnvironment(dovecot=True, smtp=True) as env:
        owner = env.create_owner(env.sessions())
        ...

Every server runs on a free 127.0.0.1 port in a temporary directory and is stopped (and
its directory deleted) when the ``with`` block ends, also on an error or Ctrl-C.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil
from cryptography.fernet import Fernet
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parent.parent
# Also when this file is run by itself (``make bench`` runs every bench/*.py).
sys.path[:0] = [path for path in (str(ROOT), str(ROOT / "src")) if path not in sys.path]

from services import accounts, tenancy  # noqa: E402
from services.accounts import AccountInput  # noqa: E402
from services.crypto import SecretBox  # noqa: E402
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions  # noqa: E402
from services.migrate import upgrade  # noqa: E402
from services.settings import Settings, load_settings  # noqa: E402
from services.tenancy import Principal  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.postgres import PostgresServer  # noqa: E402
from tests.servers.redis import RedisServer  # noqa: E402
from tests.servers.smtp import SmtpServer  # noqa: E402

SMTP_LOGIN = ("benchsmtp", "benchsmtp-pw")

#: Setting values (by field name) every benchmark shares, on top of the servers' URLs.
BASE_SETTINGS: dict[str, Any] = {
    "allow_private_hosts": True,
    "mail_timeout_seconds": 5,
    "log_level": "INFO",
    # One tenant drives the whole load: the limiter still counts every request (its cost is
    # part of the figures) but never refuses one.
    "rate_limit_per_second": 1_000_000,
    "rate_limit_per_minute": 1_000_000,
    "rate_limit_queue_per_minute": 1_000_000,
}


#: PostgreSQL as production runs it: every commit flushed to disk. The test suite's server
#: turns durability off (tests never need crash safety); a benchmark that did so would
#: time commits cheaper than any deployment pays for them.
DURABLE_POSTGRES = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@dataclass(frozen=True)
class Owner:
    """A tenant admin with an API key and one mail account."""

    tenant_id: str
    user_id: str
    api_key: str
    account_id: str
    #: The Dovecot login of the account ("" without Dovecot).
    mailbox_user: str


class BenchEnvironment:
    """PostgreSQL (migrated), one Redis for broker (db 0) and results (db 1), and optionally
    Dovecot and an SMTP server, all private; ``values`` are the settings pointing at them."""

    def __init__(self, *, dovecot: bool = False, smtp: bool = False, **overrides: Any) -> None:
        self._want_dovecot = dovecot
        self._want_smtp = smtp
        self._overrides = overrides
        self._stack = ExitStack()
        self.postgres: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.dovecot: DovecotServer | None = None
        self.smtp: SmtpServer | None = None
        self.values: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.postgres = self._stack.enter_context(PostgresServer(extra_settings=DURABLE_POSTGRES))
        self.redis = RedisServer(password="bench-" + uuid.uuid4().hex[:12]).start()
        self._stack.callback(self.redis.cleanup)
        if self._want_dovecot:
            self.dovecot = DovecotServer().start()
            self._stack.callback(self.dovecot.cleanup)
        if self._want_smtp:
            self.smtp = SmtpServer(require_auth=SMTP_LOGIN).start()
            self._stack.callback(self.smtp.cleanup)
        self.values = {
            **BASE_SETTINGS,
            "database_url": self.postgres.create_database("mailroom_bench"),
            "broker_url": self.redis.url,
            "result_backend_url": self.redis.url.removesuffix("/0") + "/1",
            "secret_key": Fernet.generate_key().decode(),
            **self._overrides,
        }
        engine = make_engine(self.settings)
        upgrade(engine)
        engine.dispose()

    def add_cleanup(self, callback: Any) -> None:
        """Run ``callback()`` when the environment closes, before its servers stop."""
        self._stack.callback(callback)

    # -- settings and subprocesses ---------------------------------------------------

    @property
    def settings(self) -> Settings:
        return load_settings(**self.values)

    def sessions(self) -> sessionmaker[Session]:
        return unrestricted_unsafe_sessions(make_sessionmaker(make_engine(self.settings)))

    def subprocess_env(self) -> dict[str, str]:
        """The environment of a Mailroom subprocess (gunicorn, a worker): ours without any
        MAILROOM_* of the caller, plus ``values`` as MAILROOM_* and the import path."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
        env.update(
            {
                f"MAILROOM_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in self.values.items()
            }
        )
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        )
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- data ------------------------------------------------------------------------

    def create_owner(self, sessions: sessionmaker[Session]) -> Owner:
        """A new tenant, its admin with an API key, and an account of that admin. With
        Dovecot and SMTP running the account points at a fresh Dovecot user and the SMTP
        server (so ``verify`` succeeds); otherwise at unused loopback ports."""
        tag = uuid.uuid4().hex[:10]
        user, password = f"u{tag}", f"pw-{tag}"
        if self.dovecot is not None:
            self.dovecot.add_user(user, password)
        imap_port = self.dovecot.port if self.dovecot is not None else 9
        smtp_port = self.smtp.port if self.smtp is not None else 9
        box = SecretBox(self.settings.encryption_keys())
        with transaction(sessions) as session:
            tenant = tenancy.create_tenant(session, name=f"Bench {tag}", slug=f"bench-{tag}")
            admin = tenancy.create_user(session, tenant_id=tenant.id, email=f"admin@{tag}.test", role="admin")
            _, api_key = tenancy.create_api_key(session, admin, name="bench")
            principal = Principal(tenant_id=tenant.id, user_id=admin.id, role=admin.role)
            account = accounts.create_account(
                session,
                principal,
                AccountInput(
                    email=f"{user}@example.test",
                    name="Bench mailbox",
                    imap={
                        "host": "127.0.0.1",
                        "port": imap_port,
                        "tls": "none",
                        "username": user,
                        "password": password,
                    },
                    smtp={
                        "host": "127.0.0.1",
                        "port": smtp_port,
                        "tls": "none",
                        "username": SMTP_LOGIN[0],
                        "password": SMTP_LOGIN[1],
                    },
                ),
                box,
                allow_private=True,
            )
            return Owner(tenant.id, admin.id, api_key, account.id, user if self.dovecot else "")


# -- statistics and output -------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator and not math.isnan(denominator) else math.nan


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, all processes) since boot:
    the difference over a phase shows what else ran meanwhile."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1) -> None:
    """A plain-text table: the first ``left`` columns left-aligned, the others right-aligned."""
    table = [list(header), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(widths[i]) if i < left else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        return "  ".join(cells).rstrip()

    print()
    print(title)
    print(line(table[0]))
    print("  ".join("-" * w for w in widths))
    for row in table[1:]:
        print(line(row))
    sys.stdout.flush()


def fmt(value: float, digits: int = 1, unit: str = "") -> str:
    """A number for a table cell; "–" for NaN."""
    if math.isnan(value):
        return "–"
    return f"{value:,.{digits}f}{unit}"


if __name__ == "__main__":
    print("bench/environment.py is the benchmarks' shared set-up; run bench/bench_*.py instead.")
