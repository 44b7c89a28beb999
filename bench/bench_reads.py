"""Benchmark of the message list on a 100,000-message folder, PostgreSQL and SQLite.

Measures, in one run, for each database:

1. ``services.mailbox.list_messages`` as the API calls it (a tenant-bound session per call,
   account and folder looked up, the page read with its folder names, commit): newest 20,
   newest 250, and page 30 of 20 (its cursor found by walking 29 pages first);
2. the reference: the same page read as one hand-written SQL statement through the bare
   driver (psycopg / sqlite3) on a connection kept open — the fastest honest way to get
   the same rows;
3. the plan of the statement ``list_messages`` really sends for newest 20 (PostgreSQL:
   ``EXPLAIN ANALYZE``; SQLite: ``EXPLAIN QUERY PLAN``): an index range scan, no Sort;
4. PostgreSQL only: newest 20 again with the old ``(folder_id, date)`` index instead, to
   show what the ordered index buys.

Rows are inserted with one ``INSERT … SELECT`` (pairs of messages share a date, one in a
thousand is undated), then analysed, as sync does after a large first walk.

Run: ``.venv/bin/python bench/bench_reads.py [--messages 100000] [--repeat 300]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import psycopg  # noqa: E402
from sqlalchemy import Engine, event  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from bench.environment import BenchEnvironment, Owner, fmt, percentile, print_table, ratio  # noqa: E402
from services import mailbox  # noqa: E402
from services.db import (  # noqa: E402
    make_engine,
    make_sessionmaker,
    tenant_sessions,
    transaction,
    unrestricted_unsafe_sessions,
)
from services.migrate import upgrade  # noqa: E402
from services.models import Folder  # noqa: E402
from services.read_stats import analyze_after_first_walk  # noqa: E402
from services.tenancy import Principal  # noqa: E402

BASE = datetime(2020, 1, 1, tzinfo=UTC)
COLUMNS = (
    "id, tenant_id, account_id, folder_id, uid, subject, from_addr, to_addrs, cc_addrs, date, "
    "internal_date, flags, seen, flagged, size, snippet, attachments, created_at, updated_at"
)
PG_SEED = f"""
INSERT INTO messages ({COLUMNS})
SELECT md5(%(folder)s || g)::uuid::text, %(tenant)s, %(account)s, %(folder)s, g,
       'Subject of message ' || g, 'Sender ' || (g %% 50) || ' <s' || (g %% 50) || '@example.com>',
       '["me@example.com"]', '[]',
       CASE WHEN g %% 1000 = 0 THEN NULL ELSE %(base)s + make_interval(secs => g / 2) END,
       %(base)s + make_interval(secs => g), '[]', g %% 3 = 0, g %% 17 = 0, 4000,
       'A snippet of about two hundred characters of the message text, as sync stores it.', '[]',
       now(), now()
FROM generate_series(1, %(n)s) AS g
"""
SQLITE_SEED = f"""
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :n)
INSERT INTO messages ({COLUMNS})
SELECT :folder || '-' || n, :tenant, :account, :folder, n,
       'Subject of message ' || n, 'Sender ' || (n % 50) || ' <s' || (n % 50) || '@example.com>',
       '["me@example.com"]', '[]',
       CASE WHEN n % 1000 = 0 THEN NULL
            ELSE datetime('2020-01-01 00:00:00', '+' || (n / 2) || ' seconds') || '.000000' END,
       datetime('2020-01-01 00:00:00', '+' || n || ' seconds') || '.000000', '[]', n % 3 = 0,
       n % 17 = 0, 4000,
       'A snippet of about two hundred characters of the message text, as sync stores it.', '[]',
       '2020-01-01 00:00:00.000000', '2020-01-01 00:00:00.000000'
FROM g
"""
RAW_PAGE = f"""
SELECT {", ".join("m." + c.strip() for c in COLUMNS.split(","))}, f.name
FROM messages m JOIN folders f ON f.id = m.folder_id
WHERE m.tenant_id = {{p}} AND m.folder_id = {{p}} {{after}}
ORDER BY m.date DESC NULLS LAST, m.id DESC LIMIT {{p}}
"""


class Reads:
    """One database seeded with a folder of ``messages`` rows, and ways to read it."""

    def __init__(self, engine: Engine, owner: Owner, messages: int) -> None:
        self.engine = engine
        self.owner = owner
        base = make_sessionmaker(engine)
        self.sessions: sessionmaker[Session] = tenant_sessions(base, owner.tenant_id)
        self.principal = Principal(tenant_id=owner.tenant_id, user_id=owner.user_id, role="admin")
        with transaction(unrestricted_unsafe_sessions(base)) as session:
            inbox = Folder(tenant_id=owner.tenant_id, account_id=owner.account_id, name="INBOX", flags=[])
            other = Folder(tenant_id=owner.tenant_id, account_id=owner.account_id, name="Archive", flags=[])
            session.add_all([inbox, other])
            session.flush()
            self.folder_id = inbox.id
            self._seed(session, inbox.id, messages)
            self._seed(session, other.id, messages // 10)
            session.query(Folder).filter(Folder.id == inbox.id).update({"message_count": messages})
        started = time.perf_counter()
        with transaction(unrestricted_unsafe_sessions(base)) as session:
            analyze_after_first_walk(session, self.folder_id)
        self.analyze_seconds = time.perf_counter() - started

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def _seed(self, session: Session, folder_id: str, count: int) -> None:
        values = {
            "tenant": self.owner.tenant_id,
            "account": self.owner.account_id,
            "folder": folder_id,
            "n": count,
        }
        connection = session.connection().connection.dbapi_connection
        assert connection is not None
        if self.is_sqlite:
            connection.execute(SQLITE_SEED, values)
        else:
            connection.execute(PG_SEED, {**values, "base": BASE})  # type: ignore[call-overload]

    # -- the service, as the API calls it -------------------------------------------------

    def page(self, limit: int, cursor: str | None = None) -> tuple[list[Any], str | None]:
        with transaction(self.sessions) as session:
            return mailbox.list_messages(
                session, self.principal, self.owner.account_id, folder="INBOX", limit=limit, cursor=cursor
            )

    def cursor_of_page(self, number: int, limit: int = 20) -> tuple[str | None, Any]:
        """The cursor that fetches page ``number`` (walking the pages before it), and the
        last row of the page before, as (date, id) for the raw reference."""
        cursor, last = None, None
        for _ in range(number - 1):
            rows, cursor = self.page(limit, cursor)
            last = (rows[-1].date, rows[-1].id)
        return cursor, last

    def plan_of_newest(self, limit: int = 20) -> list[str]:
        seen: list[tuple[str, Any]] = []

        def record(_c: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
            if "FROM messages" in statement and "ORDER BY" in statement:
                seen.append((statement, parameters))

        event.listen(self.engine, "before_cursor_execute", record)
        try:
            self.page(limit)
        finally:
            event.remove(self.engine, "before_cursor_execute", record)
        statement, parameters = seen[-1]
        explain = "EXPLAIN QUERY PLAN " if self.is_sqlite else "EXPLAIN (ANALYZE, COSTS OFF) "
        with self.engine.connect() as connection:
            return [str(row[-1]) for row in connection.exec_driver_sql(explain + statement, parameters)]

    # -- the reference: the same rows through the bare driver -----------------------------

    def raw_reader(self, url: str) -> Callable[[int, Any], list[Any]]:
        owner, folder_id = self.owner, self.folder_id
        if self.is_sqlite:
            lite = sqlite3.connect(url.split(":///", 1)[1])

            def read_sqlite(limit: int, after: Any) -> list[Any]:
                params: list[Any] = [owner.tenant_id, folder_id]
                clause = ""
                if after is not None:
                    clause, params = (
                        "AND (m.date, m.id) < (?, ?)",
                        [*params, _sqlite_date(after[0]), after[1]],
                    )
                sql = RAW_PAGE.format(p="?", after=clause)
                return lite.execute(sql, [*params, limit]).fetchall()

            return read_sqlite
        pg = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)

        def read_pg(limit: int, after: Any) -> list[Any]:
            params: list[Any] = [owner.tenant_id, folder_id]
            clause = ""
            if after is not None:
                clause, params = "AND (m.date, m.id) < (%s, %s)", [*params, *after]
            sql = RAW_PAGE.format(p="%s", after=clause)
            return pg.execute(sql, [*params, limit]).fetchall()  # type: ignore[arg-type]

        return read_pg


def _sqlite_date(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def timed(call: Callable[[], Any], repeat: int) -> list[float]:
    for _ in range(min(20, repeat)):
        call()  # warm caches and the pool
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def measure(reads: Reads, url: str, repeat: int) -> list[list[str]]:
    raw = reads.raw_reader(url)
    cursor, last = reads.cursor_of_page(30)
    assert len(reads.page(20, cursor)[0]) == 20 and len(raw(20, last)) == 20
    cases = [
        ("newest 20", lambda: reads.page(20), lambda: raw(20, None), repeat),
        ("newest 250", lambda: reads.page(250), lambda: raw(250, None), max(50, repeat // 3)),
        ("page 30 of 20", lambda: reads.page(20, cursor), lambda: raw(20, last), repeat),
    ]
    table = []
    for name, service, reference, count in cases:
        ours, theirs = timed(service, count), timed(reference, count)
        p50, ref50 = percentile(ours, 50), percentile(theirs, 50)
        table.append(
            [
                name,
                fmt(p50, 2),
                fmt(percentile(ours, 99), 2),
                fmt(ref50, 2),
                fmt(percentile(theirs, 99), 2),
                fmt(ratio(p50, ref50), 1) + "x",
            ]
        )
    return table


HEADER = ["query", "p50 ms", "p99 ms", "ref p50 ms", "ref p99 ms", "p50 / ref"]


def old_index_newest(reads: Reads, repeat: int) -> tuple[float, list[str]]:
    """Newest 20 with the index this replaced, (folder_id, date); the ordered indexes are
    put back afterwards."""
    with reads.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_messages_folder_order")
        connection.exec_driver_sql("DROP INDEX ix_messages_account_order")
        connection.exec_driver_sql("CREATE INDEX ix_messages_folder_date ON messages (folder_id, date)")
        connection.exec_driver_sql("CREATE INDEX ix_messages_account_date ON messages (account_id, date)")
        connection.exec_driver_sql("ANALYZE messages")
    try:
        return percentile(timed(lambda: reads.page(20), repeat), 50), reads.plan_of_newest()
    finally:
        with reads.engine.begin() as connection:
            connection.exec_driver_sql("DROP INDEX ix_messages_folder_date")
            connection.exec_driver_sql("DROP INDEX ix_messages_account_date")
            for name, column in (("folder", "folder_id"), ("account", "account_id")):
                connection.exec_driver_sql(
                    f"CREATE INDEX ix_messages_{name}_order ON messages "
                    f"({column}, date DESC NULLS LAST, id DESC)"
                )
            connection.exec_driver_sql("ANALYZE messages")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()

    with BenchEnvironment() as env, tempfile.TemporaryDirectory() as tmp:
        results: dict[str, list[list[str]]] = {}
        for backend in ("postgresql", "sqlite"):
            url = env.values["database_url"] if backend == "postgresql" else f"sqlite:///{tmp}/reads.db"
            engine = make_engine(env.settings.model_copy(update={"database_url": url}))
            if backend == "sqlite":
                upgrade(engine)
            owner = env.create_owner(unrestricted_unsafe_sessions(make_sessionmaker(engine)))
            started = time.perf_counter()
            reads = Reads(engine, owner, args.messages)
            print(
                f"\n{backend}: seeded {args.messages:,} + {args.messages // 10:,} messages in "
                f"{time.perf_counter() - started:.1f} s (ANALYZE {reads.analyze_seconds * 1000:.0f} ms)"
            )
            print(f"plan of newest 20 as list_messages sends it ({backend}):")
            for line in reads.plan_of_newest():
                print("   ", line)
            results[backend] = measure(reads, url, args.repeat)
            print_table(
                f"{backend}: list_messages vs the same page through the bare driver", HEADER, results[backend]
            )
            if backend == "postgresql":
                before, plan = old_index_newest(reads, max(50, args.repeat // 3))
                print(f"\nnewest 20 with the old (folder_id, date) index: p50 {before:.2f} ms; plan:")
                for line in plan:
                    print("   ", line)
            engine.dispose()
        print("\ngoals (PostgreSQL p50): newest 20 < 10 ms, newest 250 < 40 ms, page 30 < 10 ms")


if __name__ == "__main__":
    main()
