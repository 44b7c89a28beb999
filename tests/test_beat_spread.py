"""1,000 accounts due at once under Beat: their syncs spread over the interval instead of
staying one burst, and each account gets one sync however many rounds run at once.

A private database and broker (as in tests/test_periodic.py): no sync worker consumes what
periodic_sync queues, so the queue and the task records show exactly what was queued."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from services import accounts, tenancy
from services.crypto import SecretBox
from services.db import make_engine, transaction
from services.migrate import upgrade
from services.models import Account, TaskRecord, new_id
from tasks.monitoring import get_queue_stats
from tasks.periodic import DISPATCH_CHUNK
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.test_periodic import Isolated

ACCOUNTS = 1000
#: Accounts the concurrent rounds queue.
CONCURRENT = 250
TENANTS = 10
INTERVAL = 900


@pytest.fixture(scope="module")
def isolated(postgres: Any, base_values: dict[str, Any]) -> Iterator[Isolated]:
    """One private database and broker for this module; each test starts from no accounts
    (:func:`make_accounts` clears them)."""
    broker = RedisServer()
    broker.start()
    values = {
        **base_values,
        "database_url": postgres.create_database("spread_" + uuid.uuid4().hex[:8]),
        "broker_url": broker.url,
        "periodic_sync_seconds": "300",
    }
    iso = Isolated(values)
    upgrade(make_engine(iso.settings))
    yield iso
    broker.stop()


def make_accounts(
    iso: Isolated,
    *,
    last_sync_at: datetime | None,
    count: int = ACCOUNTS,
    tenants: int = TENANTS,
    clear: bool = True,
) -> list[str]:
    """``count`` account rows over ``tenants`` tenants, created in one go (rows only: they
    point at a port nothing listens on, and nothing syncs them here); with ``clear``, no
    other accounts or task records are left."""
    box = SecretBox(iso.settings.encryption_keys())
    secret = box.encrypt("p")
    ids: list[str] = []
    with transaction(iso.sessions) as session:
        if clear:
            session.execute(delete(TaskRecord))
            session.execute(delete(Account))
        for _ in range(tenants):
            tag = uuid.uuid4().hex[:8]
            tenant = tenancy.create_tenant(session, name=tag, slug=f"s-{tag}")
            user = tenancy.create_user(session, tenant_id=tenant.id, email=f"u@{tag}.test", role="admin")
            for i in range(count // tenants):
                account = Account(
                    id=new_id(),
                    tenant_id=tenant.id,
                    user_id=user.id,
                    email=f"a{i}@{tag}.test",
                    imap_host="127.0.0.1",
                    imap_port=1,
                    imap_tls="none",
                    imap_username="u",
                    imap_password_enc=secret,
                    smtp_host="127.0.0.1",
                    smtp_port=1,
                    smtp_tls="none",
                    smtp_username="u",
                    smtp_password_enc=secret,
                    sync_interval=INTERVAL,
                    last_sync_at=last_sync_at,
                )
                session.add(account)
                ids.append(account.id)
    return ids


def beat_ticks(iso: Isolated, start: datetime, tick: float, ticks: int) -> list[list[str]]:
    """What Beat would queue at each of ``ticks`` ticks ``tick`` seconds apart from
    ``start``: due_accounts at each tick's time, and each account it names synced 5 s
    later (its last_sync_at written as a sync's end writes it)."""
    queued: list[list[str]] = []
    for k in range(1, ticks + 1):
        now = start + timedelta(seconds=k * tick)
        with transaction(iso.sessions) as session:
            due = [a.id for a in accounts.due_accounts(session, now, tick_seconds=tick)]
            if due:
                session.execute(
                    update(Account)
                    .where(Account.id.in_(due))
                    .values(last_sync_at=now + timedelta(seconds=5))
                    .execution_options(synchronize_session=False)
                )
        queued.append(due)
    return queued


@pytest.mark.parametrize("tick", [60.0, 300.0])
def test_accounts_synced_together_spread_over_the_interval(isolated: Isolated, tick: float) -> None:
    """1,000 accounts whose last syncs ended at the same moment (created together, or after
    an outage): their next syncs are spread over the interval's ticks, no tick more than
    twice its share, and from then on each account is synced once per interval, on the
    same tick of every interval."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ids = make_accounts(isolated, last_sync_at=t0)
    per_interval = round(INTERVAL / tick)
    share = ACCOUNTS / per_interval
    # Three intervals of ticks: the first spreads them, the next two must repeat it exactly.
    queued = beat_ticks(isolated, t0, tick, 3 * per_interval + per_interval // 2)
    counts = [len(due) for due in queued]
    print(f"\ntick {tick:g} s, share {share:.1f} a tick; syncs queued per tick: {counts}")
    # Accounts land between half an interval and one and a half after their last sync.
    first_round = Counter(i for due in queued[: per_interval * 3 // 2] for i in due)
    assert set(first_round) == set(ids) and set(first_round.values()) == {1}
    busiest = max(counts)
    assert busiest <= 2 * share, (busiest, share)
    # Steady state: every account once per interval, on the same tick each time.
    steady = queued[per_interval + per_interval // 2 :]
    assert len(steady) == 2 * per_interval
    firsts, seconds = steady[:per_interval], steady[per_interval:]
    assert sorted(chain(*firsts)) == sorted(ids) == sorted(chain(*seconds))
    for a, b in zip(firsts, seconds, strict=True):
        assert sorted(a) == sorted(b)


@pytest.fixture(scope="module")
def periodic_worker(isolated: Isolated) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(
        ["periodic"], env=isolated.env, name=f"periodic-{uuid.uuid4().hex[:6]}", concurrency=2
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.mark.slow
def test_due_accounts_get_one_sync_each_from_concurrent_rounds(isolated: Isolated, periodic_worker) -> None:
    """Accounts due at once, two periodic_sync rounds at the same moment and a third after
    them: exactly one sync record and one queued message per account. (250 accounts: every
    round tries each account, so this costs two full rounds; bench/bench_beat.py times a
    round of 1,000.)"""
    ids = make_accounts(isolated, last_sync_at=None, count=CONCURRENT)
    started = time.perf_counter()
    rounds = [isolated.celery.send_task("mailroom.periodic_sync", queue="periodic") for _ in range(2)]
    summaries = [r.get(timeout=240) for r in rounds]
    elapsed = time.perf_counter() - started
    started = time.perf_counter()
    third = isolated.run_periodic("mailroom.periodic_sync")
    third_elapsed = time.perf_counter() - started
    print(
        f"\ntwo concurrent rounds over {CONCURRENT} due accounts: {elapsed:.1f} s "
        f"({elapsed / CONCURRENT * 1000:.1f} ms an account); queued {[s['queued'] for s in summaries]}, "
        f"already running {[s['already_running'] for s in summaries]}; third round queued "
        f"{third['queued']} in {third_elapsed:.2f} s"
    )
    assert sum(s["queued"] for s in summaries) == CONCURRENT
    assert third["queued"] == 0 and third["due"] == 0
    with isolated.sessions() as session:
        per_account = dict(
            session.execute(
                select(TaskRecord.account_id, func.count())
                .where(TaskRecord.type == "sync")
                .group_by(TaskRecord.account_id)
            ).all()
        )
        held = session.scalar(select(func.count()).where(Account.sync_task_id.is_not(None)))
    assert per_account == {account_id: 1 for account_id in ids}
    assert held == CONCURRENT
    assert get_queue_stats(isolated.celery)["sync"] == CONCURRENT


@pytest.mark.slow
def test_a_tenant_with_many_due_accounts_takes_turns_with_the_others(
    isolated: Isolated, periodic_worker
) -> None:
    """periodic_sync queues a chunk of each tenant's due accounts in turn: a small tenant's
    syncs are queued after the big tenant's first chunk, not after all of its syncs."""
    big = make_accounts(isolated, last_sync_at=None, count=3 * DISPATCH_CHUNK, tenants=1)
    small = make_accounts(isolated, last_sync_at=None, count=5, tenants=1, clear=False)
    assert isolated.run_periodic("mailroom.periodic_sync")["queued"] == len(big) + len(small)
    with isolated.sessions() as session:
        order = list(session.scalars(select(TaskRecord.account_id).order_by(TaskRecord.created_at)))
    last_small = max(order.index(account_id) for account_id in small)
    assert last_small < 2 * DISPATCH_CHUNK + len(small), last_small
