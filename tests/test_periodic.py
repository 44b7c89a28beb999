"""Beat's work: periodic_sync queues exactly the due accounts, never two syncs of one
account (even with two Beats), and cleanup_stale_results tidies records.

These tests use a private database and broker, so the accounts other tests made are not
"due" here and no sync worker consumes what periodic_sync queues."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from services import accounts, tenancy
from services.accounts import AccountInput
from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.models import Account, TaskRecord, utcnow
from services.settings import load_settings
from tasks.celery_app import make_celery
from tasks.dispatch import dispatch
from tests.conftest import env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryBeat, CeleryWorker


class Isolated:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.settings = load_settings(**values)
        self.sessions = unrestricted_unsafe_sessions(make_sessionmaker(make_engine(self.settings)))
        self.celery = make_celery(self.settings)
        self.env = worker_env(env_for(values))

    def make_account(self, *, last_sync_ago: float | None, interval: int = 900) -> str:
        with transaction(self.sessions) as session:
            tag = uuid.uuid4().hex[:8]
            tenant = tenancy.create_tenant(session, name=tag, slug=f"p-{tag}")
            user = tenancy.create_user(session, tenant_id=tenant.id, email=f"u@{tag}.test", role="admin")
            who = tenancy.Principal(tenant.id, user.id, "admin")
            endpoint = {"host": "127.0.0.1", "port": 1, "tls": "none", "username": "u", "password": "p"}
            account = accounts.create_account(
                session,
                who,
                AccountInput(email=f"u@{tag}.test", imap=endpoint, smtp=endpoint, sync_interval=interval),
                SecretBox(self.settings.encryption_keys()),
                allow_private=True,
            )
            if last_sync_ago is not None:
                account.last_sync_at = utcnow() - timedelta(seconds=last_sync_ago)
            return account.id

    def syncs(self, account_id: str) -> list[TaskRecord]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(TaskRecord).where(TaskRecord.account_id == account_id, TaskRecord.type == "sync")
                )
            )

    def run_periodic(self, name: str) -> Any:
        return self.celery.send_task(name, queue="periodic", routing_key="periodic").get(timeout=60)


@pytest.fixture
def isolated(postgres, base_values) -> Iterator[Isolated]:
    broker = RedisServer()
    broker.start()
    database_url = postgres.create_database("periodic_" + uuid.uuid4().hex[:8])
    values = {
        **base_values,
        "database_url": database_url,
        "broker_url": broker.url,
        "periodic_sync_seconds": "1",
    }
    iso = Isolated(values)
    upgrade(make_engine(iso.settings))
    yield iso
    broker.stop()


@pytest.fixture
def periodic_worker(isolated: Isolated) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(
        ["periodic"], env=isolated.env, name=f"periodic-{uuid.uuid4().hex[:6]}", concurrency=2
    )
    worker.start()
    yield worker
    worker.stop()


def test_periodic_sync_queues_only_due_accounts(isolated: Isolated, periodic_worker) -> None:
    never = isolated.make_account(last_sync_ago=None)
    # Past any place in its interval (accounts.next_sync_at: at most 1.5 intervals on).
    overdue = isolated.make_account(last_sync_ago=1400, interval=900)
    recent = isolated.make_account(last_sync_ago=10, interval=900)
    busy = isolated.make_account(last_sync_ago=None)
    with isolated.sessions() as session:
        owner = session.get(Account, busy)
        held = dispatch(
            isolated.celery,
            isolated.sessions,
            type="sync",
            tenant_id=owner.tenant_id,
            user_id=owner.user_id,
            account_id=busy,
            params={},
        )
    summary = isolated.run_periodic("mailroom.periodic_sync")
    assert summary["queued"] == 2 and summary["due"] == 2
    for account_id in (never, overdue):
        [record] = isolated.syncs(account_id)
        assert record.origin == "beat" and record.priority == 5 and record.state == "queued"
        assert record.user_id is not None
    assert isolated.syncs(recent) == []
    assert [r.id for r in isolated.syncs(busy)] == [held.record.id]
    # nothing changed: a second round queues nothing new, the syncs are still in flight
    assert isolated.run_periodic("mailroom.periodic_sync")["queued"] == 0


def test_concurrent_rounds_never_double_a_sync(isolated: Isolated, periodic_worker) -> None:
    ids = [isolated.make_account(last_sync_ago=None) for _ in range(5)]
    results = [isolated.celery.send_task("mailroom.periodic_sync", queue="periodic") for _ in range(4)]
    for result in results:
        result.get(timeout=60)
    for account_id in ids:
        assert len(isolated.syncs(account_id)) == 1


@pytest.mark.slow
def test_two_real_beats_queue_one_sync_per_account(isolated: Isolated, periodic_worker, tmp_path) -> None:
    account_id = isolated.make_account(last_sync_ago=None)
    beats = [CeleryBeat(env=isolated.env) for _ in range(2)]
    for beat in beats:
        beat.start()
    try:
        deadline = time.monotonic() + 30
        while not isolated.syncs(account_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # several more beats of each scheduler
    finally:
        for beat in beats:
            beat.stop()
    records = isolated.syncs(account_id)
    assert len(records) == 1 and records[0].origin == "beat"


def test_cleanup_stale_results(isolated: Isolated, periodic_worker) -> None:
    account_id = isolated.make_account(last_sync_ago=None)
    with isolated.sessions() as session:
        owner = session.get(Account, account_id)
    long_ago = utcnow() - timedelta(days=40)

    def record(**values: Any) -> str:
        with transaction(isolated.sessions) as session:
            row = TaskRecord(
                tenant_id=owner.tenant_id,
                user_id=owner.user_id,
                account_id=account_id,
                type="verify",
                queue="sync",
                params={},
                **values,
            )
            session.add(row)
            session.flush()
            return row.id

    stuck = record(state="running")
    lost = record(state="queued")
    old_done = record(state="succeeded")
    fresh = record(state="running")
    with transaction(isolated.sessions) as session:
        session.execute(
            update(TaskRecord)
            .where(TaskRecord.id.in_([stuck, lost, old_done]))
            .values(updated_at=long_ago, created_at=long_ago, finished_at=long_ago)
        )
        session.execute(update(TaskRecord).where(TaskRecord.id == old_done).values(finished_at=long_ago))
    summary = isolated.run_periodic("mailroom.cleanup_stale_results")
    assert summary == {
        "stuck_failed": 1,
        "undelivered_failed": 1,
        "history_deleted": 1,
        "webhook_deliveries_deleted": 0,
        "outbox_settled": 0,
        "outbox_bytes_dropped": 0,
        "outbox_deleted": 0,
    }
    with isolated.sessions() as session:
        assert session.get(TaskRecord, stuck).error_code == "stuck"
        assert session.get(TaskRecord, lost).state == "failed"
        assert session.get(TaskRecord, old_done) is None
        assert session.get(TaskRecord, fresh).state == "running"


def test_an_account_due_before_the_middle_of_the_next_tick_is_due_now(isolated: Isolated) -> None:
    """Beat looks every tick: an account whose next sync time comes within half a tick is
    synced now, not a whole tick late, so the mean gap between its syncs is its interval."""
    almost = isolated.make_account(last_sync_ago=None, interval=900)
    later = isolated.make_account(last_sync_ago=None, interval=900)
    seen: dict[str, tuple[set[str], set[str]]] = {}
    for account_id, ahead in ((almost, 100), (later, 200)):
        # Its last sync one interval before a point of its own place in the interval
        # (accounts.next_sync_at), and Beat looking ``ahead`` seconds before that point.
        phase = accounts.sync_phase(account_id, 900)
        point = (utcnow().timestamp() - phase) // 900 * 900 + phase
        with transaction(isolated.sessions) as session:
            last = datetime.fromtimestamp(point - 900, UTC)
            session.execute(update(Account).where(Account.id == account_id).values(last_sync_at=last))
        now = datetime.fromtimestamp(point - ahead, UTC)
        with isolated.sessions() as session:
            due = set(accounts.due_account_ids(session, now, tick_seconds=300))
            strict = set(accounts.due_account_ids(session, now))
        seen[account_id] = due, strict
    assert almost in seen[almost][0] and later not in seen[later][0]
    assert almost not in seen[almost][1]
