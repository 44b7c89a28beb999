"""A task's life under the faults that break naive pipelines: a sync that waits in the queue
for longer than any attempt could last, a lock taken over by another sync, a message that
kills every worker it reaches, and the windows of the stale-record sweep."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psutil
import pytest
from sqlalchemy import func, select, update

from services import accounts, task_records, tenancy
from services.accounts import AccountInput
from services.crypto import SecretBox
from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.models import Account, Message, TaskRecord, utcnow
from services.settings import load_settings
from tasks.celery_app import make_celery
from tasks.dispatch import dispatch
from tasks.lifecycle import _client_error
from tests.conftest import env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryBeat, CeleryWorker
from tests.test_sync_tasks import seed


class Stack:
    """A private database and broker, so only the workers a test starts consume its queues."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.settings = load_settings(**values)
        # The test reads across tenants, as an operator would.
        self.sessions = unrestricted_unsafe_sessions(make_sessionmaker(make_engine(self.settings)))
        self.celery = make_celery(self.settings)
        self.env = worker_env(env_for(values))

    def make_account(self, dovecot: Any, user: tuple[str, str]) -> Account:
        with transaction(self.sessions) as session:
            tag = uuid.uuid4().hex[:8]
            tenant = tenancy.create_tenant(session, name=tag, slug=f"l-{tag}")
            owner = tenancy.create_user(session, tenant_id=tenant.id, email=f"u@{tag}.test", role="admin")
            imap = {"host": "127.0.0.1", "port": dovecot.port, "tls": "none", "username": user[0]}
            smtp = {"host": "127.0.0.1", "port": 1, "tls": "none", "username": "u", "password": "p"}
            return accounts.create_account(
                session,
                tenancy.Principal(tenant.id, owner.id, "admin"),
                AccountInput(email=f"u@{tag}.test", imap={**imap, "password": user[1]}, smtp=smtp),
                SecretBox(self.settings.encryption_keys()),
                allow_private=True,
            )

    def dispatch_sync(self, account: Account) -> str:
        return dispatch(
            self.celery,
            self.sessions,
            type="sync",
            tenant_id=account.tenant_id,
            user_id=account.user_id,
            account_id=account.id,
            params={},
        ).record.id

    def syncs(self, account_id: str) -> list[TaskRecord]:
        with self.sessions() as session:
            query = select(TaskRecord).where(TaskRecord.account_id == account_id, TaskRecord.type == "sync")
            return list(session.scalars(query))

    def record(self, task_id: str) -> TaskRecord:
        with self.sessions() as session:
            record = session.get(TaskRecord, task_id)
            assert record is not None
            return record

    def wait(self, task_id: str, check: Any, timeout: float = 60) -> TaskRecord:
        deadline = time.monotonic() + timeout
        while True:
            record = self.record(task_id)
            if check(record):
                return record
            assert time.monotonic() < deadline, f"task {task_id}: {record.state} {record.attempts}"
            time.sleep(0.05)

    def worker(self, queue: str, **kw: Any) -> CeleryWorker:
        return CeleryWorker([queue], env=self.env, name=f"{queue}-{uuid.uuid4().hex[:6]}", **kw)


@pytest.fixture
def stack_values(postgres, base_values) -> Iterator[dict[str, Any]]:
    broker = RedisServer()
    broker.start()
    database_url = postgres.create_database("life_" + uuid.uuid4().hex[:8])
    values = {**base_values, "database_url": database_url, "broker_url": broker.url}
    upgrade(make_engine(load_settings(**values)))
    yield values
    broker.stop()


@pytest.mark.slow
def test_a_sync_waiting_in_the_queue_keeps_its_lock_while_beat_runs(
    stack_values, dovecot, mailbox_user
) -> None:
    """No sync worker for longer than any attempt could last (hard limit + longest retry +
    a minute, 65 s here), Beat asking every second: still one sync, which runs once a
    worker comes."""
    stack = Stack(
        {
            **stack_values,
            "periodic_sync_seconds": "1",
            "task_soft_time_limit": "3",
            "task_hard_time_limit": "4",
            "retry_max_seconds": "1",
            "broker_visibility_timeout": "10",
        }
    )
    seed(dovecot, mailbox_user, "INBOX", 3)
    account = stack.make_account(dovecot, mailbox_user)
    first = stack.dispatch_sync(account)
    periodic = stack.worker("periodic")
    beat = CeleryBeat(env=stack.env)
    periodic.start()
    beat.start()
    sync = stack.worker("sync")
    try:
        deadline = time.monotonic() + 68
        while time.monotonic() < deadline:
            assert [r.id for r in stack.syncs(account.id)] == [first]
            time.sleep(0.5)
        assert "periodic_sync" in periodic.log_text()  # Beat's rounds really ran meanwhile
        sync.start()
        done = stack.wait(first, lambda r: r.is_final, timeout=60)
        assert done.state == "succeeded", (done.error_code, done.last_error)
        time.sleep(3)  # more Beat rounds: the account is synced now, so not due
        assert [r.id for r in stack.syncs(account.id)] == [first]
    finally:
        beat.stop()
        periodic.stop()
        sync.stop()


def test_a_sync_whose_lock_went_to_another_stops_without_touching_mail(
    stack_values, dovecot, mailbox_user
) -> None:
    """The worker confirms the lock when an attempt starts: a sync whose account is held by
    another sync in flight ends ``superseded`` and stores nothing."""
    stack = Stack(stack_values)
    seed(dovecot, mailbox_user, "INBOX", 5)
    account = stack.make_account(dovecot, mailbox_user)
    mine = stack.dispatch_sync(account)
    with transaction(stack.sessions) as session:
        other = task_records.create_record_if_allowed(
            session,
            tenant_id=account.tenant_id,
            user_id=account.user_id,
            account_id=account.id,
            type="sync",
            queue="sync",
            priority=10,
            params={},
            max_retries=5,
            origin="api",
            default_estimate=None,
            cap=None,
            visible_to=None,
        )
        assert other is not None
        task_records.mark_running(session, other.id, "elsewhere")
        # As if ``mine`` had been swept as lost and ``other`` had claimed the account since.
        session.execute(update(Account).where(Account.id == account.id).values(sync_task_id=other.id))
    worker = stack.worker("sync")
    worker.start()
    try:
        record = stack.wait(mine, lambda r: r.is_final)
    finally:
        worker.stop()
    assert record.state == "failed" and record.error_code == "superseded", record.last_error
    assert other.id in (record.last_error or "")
    with stack.sessions() as session:
        assert session.get(Account, account.id).sync_task_id == other.id  # type: ignore[union-attr]
        assert session.scalar(select(func.count()).where(Message.account_id == account.id)) == 0


@pytest.mark.slow
def test_a_message_that_kills_every_worker_fails_as_worker_lost(stack_values, dovecot, mailbox_user) -> None:
    """The pool child is SIGKILLed (as the kernel's OOM killer would) each time the sync
    starts. Celery requeues the message every time; after as many lost attempts as a
    transient fault may take (1 + 5 retries), the next delivery fails it."""
    stack = Stack(stack_values)
    seed(dovecot, mailbox_user, "INBOX", 3000, size=600)
    account = stack.make_account(dovecot, mailbox_user)
    task_id = stack.dispatch_sync(account)
    worker = stack.worker("sync")
    worker.start()
    kills = 0
    try:
        limit = stack.record(task_id).max_retries + 1
        for attempt in range(1, limit + 1):
            stack.wait(task_id, lambda r, n=attempt: r.state == "running" and r.attempts == n)
            main = psutil.Process(worker._owned.proc.pid)  # type: ignore[union-attr]
            for child in main.children(recursive=True):
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
        record = stack.wait(task_id, lambda r: r.is_final, timeout=90)
    finally:
        worker.stop()
    assert kills >= limit
    assert record.state == "failed" and record.error_code == "worker_lost", (
        record.error_code,
        record.last_error,
    )
    assert record.attempts == limit
    # the lock went with the task: the account can be synced again
    with stack.sessions() as session:
        assert accounts.claim_sync_lock(session, account.id, "probe") is None


def test_the_sweep_waits_past_the_visibility_timeout(stack_values) -> None:
    """A running record silent for longer than an attempt could last, but not yet longer
    than the broker's visibility timeout, is waiting for its redelivery: the sweep leaves
    it alone. Silent past the visibility timeout plus grace, it is failed."""
    values = {**stack_values, "broker_visibility_timeout": "7200", "stuck_task_grace_seconds": "600"}
    stack = Stack(values)
    with transaction(stack.sessions) as session:
        tag = uuid.uuid4().hex[:8]
        tenant = tenancy.create_tenant(session, name=tag, slug=f"s-{tag}")
        tenant_id = tenant.id

    def running(silent_for: timedelta) -> str:
        with transaction(stack.sessions) as session:
            row = TaskRecord(tenant_id=tenant_id, type="sync", queue="sync", params={}, state="running")
            session.add(row)
            session.flush()
            session.execute(
                update(TaskRecord).where(TaskRecord.id == row.id).values(updated_at=utcnow() - silent_for)
            )
            return row.id

    waiting = running(timedelta(hours=1))  # past hard limit + retry, within the visibility timeout
    lost = running(timedelta(hours=2, minutes=11))
    periodic = stack.worker("periodic")
    periodic.start()
    try:
        result = stack.celery.send_task("mailroom.cleanup_stale_results", queue="periodic").get(timeout=60)
    finally:
        periodic.stop()
    assert result["stuck_failed"] == 1
    assert stack.record(waiting).state == "running"
    assert stack.record(lost).state == "failed" and stack.record(lost).error_code == "stuck"


def test_internal_errors_reach_clients_as_a_code_and_a_reference() -> None:
    from sqlalchemy.exc import IntegrityError

    exc = IntegrityError("INSERT INTO messages (subject) VALUES (%(s)s)", {"s": "secret"}, Exception("dup"))
    code, message, ref = _client_error(exc)
    assert code == "internal_error" and ref and ref in message
    assert "INSERT" not in message and "secret" not in message
    code, message, ref = _client_error(ConnectionResetError("peer 10.1.2.3:5432 reset"))
    assert code == "network_error" and ref and "10.1.2.3" not in message


def test_visibility_timeout_must_cover_an_attempt_and_its_retry_delay() -> None:
    from services.settings import SettingsError

    with pytest.raises(SettingsError, match="MAILROOM_BROKER_VISIBILITY_TIMEOUT"):
        load_settings(task_soft_time_limit=50, task_hard_time_limit=100, retry_max_seconds=60,
                      broker_visibility_timeout=150)  # fmt: skip
