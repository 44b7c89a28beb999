"""Benchmark of Beat's periodic_sync with many accounts due at once: how the syncs spread
over the interval, and what queueing them costs per account.

``--accounts`` account rows (over ``--tenants`` tenants) on private PostgreSQL and Redis;
nothing consumes the sync queue, so what is queued stays there.

1. Spread: every account's last sync ended at the same moment (created together, or after
   an outage). Beat's ticks are replayed for three and a half intervals with
   ``services.accounts.due_accounts`` at each tick's time (each account named is taken as
   synced 5 s later). Printed per tick length: syncs queued per tick (the busiest tick
   beside an even share, accounts × tick / interval), and the same for the former rule
   (due once ``last_sync_at + interval`` is before the middle of the next tick), under
   which accounts synced together stay one burst.
2. Cost: every account due (never synced), one periodic_sync round in this process,
   ``tasks.periodic.queue_due_syncs`` (one query for the due accounts with their tenant and
   user, one session per chunk of a tenant's accounts), beside the former round (the ids,
   then for each account a transaction to read it and a dispatch with a session of its
   own), alternately ``--repeat`` times; between rounds the queue is purged and the
   records and locks are released. Printed: ms per account queued.

Run: ``.venv/bin/python bench/bench_beat.py [--accounts 1000] [--tenants 10] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from celery import Celery  # noqa: E402
from sqlalchemy import select, update  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from bench.environment import BenchEnvironment, fmt, print_table  # noqa: E402
from services import accounts, tenancy  # noqa: E402
from services.crypto import SecretBox  # noqa: E402
from services.db import tenant_sessions, transaction, unrestricted_unsafe_sessions  # noqa: E402
from services.models import Account, TaskRecord, new_id, utcnow  # noqa: E402
from tasks.celery_app import make_celery  # noqa: E402
from tasks.dispatch import dispatch  # noqa: E402
from tasks.periodic import queue_due_syncs  # noqa: E402
from tasks.runtime import Runtime, get_runtime  # noqa: E402

INTERVAL = 900


def make_accounts(env: BenchEnvironment, sessions: sessionmaker[Session], count: int, tenants: int) -> None:
    secret = SecretBox(env.settings.encryption_keys()).encrypt("p")
    with transaction(sessions) as session:
        for t in range(tenants):
            tag = uuid.uuid4().hex[:8]
            tenant = tenancy.create_tenant(session, name=tag, slug=f"b-{tag}")
            user = tenancy.create_user(session, tenant_id=tenant.id, email=f"u@{tag}.test", role="admin")
            for i in range(count // tenants + (t < count % tenants)):
                endpoint = {"host": "127.0.0.1", "port": 9, "tls": "none", "username": "u"}
                session.add(
                    Account(
                        id=new_id(),
                        tenant_id=tenant.id,
                        user_id=user.id,
                        email=f"a{i}@{tag}.test",
                        sync_interval=INTERVAL,
                        **{f"imap_{k}": v for k, v in endpoint.items()},
                        **{f"smtp_{k}": v for k, v in endpoint.items()},
                        imap_password_enc=secret,
                        smtp_password_enc=secret,
                    )
                )


def replay_ticks(sessions: sessionmaker[Session], tick: float, rule: Callable[..., list[str]]) -> list[int]:
    """Syncs queued at each tick for 3.5 intervals after every account's last sync at t0."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with transaction(sessions) as session:
        session.execute(update(Account).values(last_sync_at=t0, sync_task_id=None))
    counts = []
    for k in range(1, round(3.5 * INTERVAL / tick) + 1):
        now = t0 + timedelta(seconds=k * tick)
        with transaction(sessions) as session:
            due = rule(session, now, tick)
            if due:
                session.execute(
                    update(Account)
                    .where(Account.id.in_(due))
                    .values(last_sync_at=now + timedelta(seconds=5))
                    .execution_options(synchronize_session=False)
                )
        counts.append(len(due))
    return counts


def current_rule(session: Session, now: datetime, tick: float) -> list[str]:
    return accounts.due_account_ids(session, now, tick_seconds=tick)


def former_rule(session: Session, now: datetime, tick: float) -> list[str]:
    """Due once the whole interval has passed, or will before the middle of the next tick."""
    horizon = now + timedelta(seconds=tick / 2)
    rows = session.execute(select(Account.id, Account.last_sync_at, Account.sync_interval)).all()
    return [i for i, last, iv in rows if last is None or last + timedelta(seconds=iv) <= horizon]


def former_round(app: Celery, runtime: Runtime) -> int:
    """periodic_sync as it was: the due ids, then per account a read and a dispatch."""
    everyone = unrestricted_unsafe_sessions(runtime.sessions)
    with transaction(everyone) as session:
        due = accounts.due_account_ids(session, utcnow(), tick_seconds=runtime.settings.periodic_sync_seconds)
    queued = 0
    for account_id in due:
        with transaction(everyone) as session:
            account = session.get(Account, account_id)
            assert account is not None
            tenant_id, user_id = account.tenant_id, account.user_id
        result = dispatch(
            app,
            tenant_sessions(runtime.sessions, tenant_id),
            type="sync",
            tenant_id=tenant_id,
            user_id=user_id,
            account_id=account_id,
            params={},
            origin="beat",
        )
        queued += result.created
    return queued


def current_round(app: Celery, runtime: Runtime) -> int:
    return int(queue_due_syncs(app, runtime)["queued"])


def reset(app: Celery, sessions: sessionmaker[Session]) -> None:
    """Nothing queued, no record in flight, every account due."""
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("sync")
    with transaction(sessions) as session:
        session.execute(update(TaskRecord).values(state="cancelled"))
        session.execute(update(Account).values(last_sync_at=None, sync_task_id=None))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=1000, help="accounts (1,000)")
    parser.add_argument("--tenants", type=int, default=10, help="tenants they belong to (10)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of each kind (2)")
    args = parser.parse_args(argv)

    with BenchEnvironment(periodic_sync_seconds=300) as env:
        sessions = env.sessions()
        make_accounts(env, sessions, args.accounts, args.tenants)
        spread_rows = []
        for tick in (60.0, 300.0):
            share = args.accounts * tick / INTERVAL
            for name, rule in (
                ("phase in the interval (current)", current_rule),
                ("former gap rule", former_rule),
            ):
                counts = replay_ticks(sessions, tick, rule)
                busy = [c for c in counts if c]
                spread_rows.append(
                    [
                        f"{tick:g} s",
                        name,
                        fmt(share, 1),
                        str(max(counts)),
                        fmt(max(counts) / share, 2),
                        str(len(busy)),
                        " ".join(str(c) for c in counts),
                    ]
                )
        app = make_celery(env.settings)
        runtime = get_runtime(app)
        timings: dict[str, list[float]] = {"former": [], "current": []}
        for _ in range(args.repeat):
            for name, round_ in (("former", former_round), ("current", current_round)):
                reset(app, sessions)
                started = time.perf_counter()
                queued = round_(app, runtime)
                elapsed = time.perf_counter() - started
                assert queued == args.accounts, (name, queued)
                timings[name].append(elapsed / queued * 1000)
        reset(app, sessions)

    print()
    print_table(
        f"Syncs queued per Beat tick, {args.accounts:,} accounts synced together at t0, "
        f"interval {INTERVAL} s, "
        "3.5 intervals replayed",
        ["tick", "due rule", "even share", "busiest tick", "busiest / share", "ticks with syncs", "per tick"],
        spread_rows,
        left=2,
    )
    print()
    rows: list[list[str]] = []
    for name, values in timings.items():
        label = (
            "periodic_sync round (current)"
            if name == "current"
            else "former round (read, dispatch, per account)"
        )
        rows.append([label, " ".join(fmt(v, 2) for v in values), fmt(statistics.median(values), 2)])
    print_table(
        f"Queueing {args.accounts:,} due accounts in one round, in this process (ms per account queued)",
        ["round", "each run", "median"],
        rows,
        left=2,
    )
    former, current = (statistics.median(timings[k]) for k in ("former", "current"))
    print(f"\ncurrent / former: {current / former:.2f}")


if __name__ == "__main__":
    main()
