"""Faults, with real processes and real signals: nothing accepted is lost, nothing runs twice.

Which test proves which fault (tests elsewhere are listed, not repeated; this file fills
the gaps):

- Worker SIGKILLed mid-sync: test_sync_tasks.py::test_worker_killed_mid_sync_is_redelivered...
- Mid-send, after the SMTP server accepted DATA and before it replied: test_send_kill.py
  (one delivery, one \\Sent copy).
- Mid-delete, after the server moved or copied a batch and before the rows:
  test_delete_faults.py, test_delete_journal.py.
- Mid-spam-check: test_spam_worker_killed_mid_check_stores_each_verdict_once (here).
- Broker restarted empty under a running Beat: test_beat.py::test_beat_survives_its_broker...
- Broker down: a 503 and a ``dispatch_failed`` record:
  test_pipeline.py::test_broker_down_is_503_and_the_record_says_so; a worker rides out
  the outage and serves again: test_liveness.py.
- Broker restarted empty while tasks are queued or waiting to retry: the sweep
  (tasks/redispatch.py) re-publishes exactly the lost messages, once, with the same ids:
  test_a_broker_restarted_empty_loses_no_queued_task. Workers reconnect to a broker that
  came back empty and serve new work: test_liveness.py.
- Result backend down changes nothing a client sees:
  test_dispatch.py::test_result_backend_down_dispatch_and_worker_still_work.
- PostgreSQL restarted mid-sync: test_postgres_restarted_mid_sync_retries_and_the_sync_is_exact.
- IMAP server down past the retry budget:
  test_imap_down_past_the_retry_budget_fails_shows_and_recovers; the verify task's budget:
  test_pipeline.py::test_transient_error_retries_with_backoff_then_gives_up.
- A worker child killed on every attempt (memory limit, OOM killer): bounded, then
  ``worker_lost``: test_task_life.py::test_a_message_that_kills_every_worker_fails_as_worker_lost;
  past its hard time limit: ``failed`` (``time_limit``) at once, never left ``running``:
  test_a_task_past_its_hard_time_limit_ends_failed_at_once.
- Clock: a ``send_at`` passing while every send worker is down:
  test_a_scheduled_send_whose_time_passed_with_no_worker_goes_out_once.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from mailroom.app import create_app
from services import accounts, task_records
from services.db import make_engine
from services.migrate import upgrade
from services.models import Account, Folder, Message, TaskRecord, utcnow
from services.settings import load_settings
from tasks.celery_app import make_celery
from tasks.monitoring import get_queue_stats
from tasks.queues import QUEUES
from tasks.redispatch import EPOCH_KEY, _republish, sweep
from tests.conftest import account_body, env_for, worker_env
from tests.servers.dovecot import DovecotServer
from tests.servers.postgres import PostgresServer
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api
from tests.test_send import delivered
from tests.test_sync_tasks import seed, stored
from tests.test_task_life import Stack

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(postgres, base_values) -> Iterator[tuple[Stack, RedisServer]]:
    """A private database and broker: only the workers a test starts consume its queues,
    and the sweep sees only this test's records."""
    broker = RedisServer()
    broker.start()
    database_url = postgres.create_database("faults_" + uuid.uuid4().hex[:8])
    values = {**base_values, "database_url": database_url, "broker_url": broker.url}
    upgrade(make_engine(load_settings(**values)))
    try:
        yield Stack(values), broker
    finally:
        broker.stop()


def _age(stack: Stack, task_ids: list[str], seconds: float) -> None:
    """Make records look ``seconds`` older than they are (past the sweep's publish grace)."""
    with stack.sessions() as session:
        for task_id in task_ids:
            record = session.get(TaskRecord, task_id)
            assert record is not None
            session.execute(
                update(TaskRecord)
                .where(TaskRecord.id == task_id)
                .values(created_at=record.created_at - timedelta(seconds=seconds))
            )
        session.commit()


def _user(dovecot: Any) -> tuple[str, str]:
    name = "f" + uuid.uuid4().hex[:10]
    dovecot.add_user(name, "pw-" + name)
    return name, "pw-" + name


def _received(log: str, task_id: str) -> int:
    return len(re.findall(rf"Task mailroom\.\w+\[{task_id}\] received", log))


def test_a_broker_restarted_empty_loses_no_queued_task(stack, dovecot, mailbox_user) -> None:
    """Three tasks wait with no worker (one queued, one between retries, one queued just
    now); the broker restarts empty; a fourth is queued into the new broker. The sweep
    re-publishes exactly the lost ones with the same ids, the one too young to be sure of
    at the next sweep, leaves the fourth alone, and then sets its marker; a worker started
    afterwards runs each once."""
    stack, broker = stack
    users = [mailbox_user] + [_user(dovecot) for _ in range(3)]
    for n, user in enumerate(users):
        seed(dovecot, user, "INBOX", 3 + n)
    accounts = [stack.make_account(dovecot, user) for user in users]
    lost, retried, young = (stack.dispatch_sync(a) for a in (accounts[0], accounts[1], accounts[3]))
    broker.restart()  # the test Redis keeps nothing: all three messages are gone
    kept = stack.dispatch_sync(accounts[2])
    _age(stack, [lost, retried, kept], 120)
    with stack.sessions() as session:  # as if its first attempt had failed and it waits to retry
        session.execute(
            update(TaskRecord)
            .where(TaskRecord.id == retried)
            .values(
                state="retrying",
                attempts=1,
                next_retry_at=utcnow(),
                updated_at=utcnow() - timedelta(minutes=2),
            )
        )
        session.commit()
    with stack.sessions() as session:
        as_read = {r.id: r for r in task_records.waiting_for_broker(session, settled_before=utcnow())}
    first = sweep(stack.celery, stack.sessions)
    assert (first["checked"], first["waiting"], first["deferred"]) == (True, 4, 1)
    assert sorted(first["task_ids"]) == sorted([lost, retried])
    # A second sweep running at the same time, which read the records before: it publishes nothing.
    assert [_republish(stack.celery, stack.sessions, as_read[t]) for t in (lost, retried)] == ["skipped"] * 2
    _age(stack, [young], 120)
    second = sweep(stack.celery, stack.sessions)  # no marker yet: it looks again
    assert (second["checked"], second["deferred"], second["task_ids"]) == (True, 0, [young])
    assert get_queue_stats(stack.celery)["sync"] == 4
    assert not sweep(stack.celery, stack.sessions)["checked"]  # the marker: one EXISTS from now on
    worker = stack.worker("sync")
    worker.start()
    ids = [lost, retried, kept, young]
    try:
        records = [stack.wait(t, lambda r: r.is_final, timeout=60) for t in ids]
    finally:
        worker.stop()
    assert [(r.state, r.attempts) for r in records] == [
        ("succeeded", 1),
        ("succeeded", 2),
        ("succeeded", 1),
        ("succeeded", 1),
    ], [r.last_error for r in records]
    log = worker.log_text()
    assert [_received(log, t) for t in ids] == [1, 1, 1, 1]
    assert [stored(stack.sessions, a.id) for a in accounts] == [3, 4, 5, 6]
    assert get_queue_stats(stack.celery)["sync"] == 0
    with stack.celery.connection_for_read() as conn:
        assert conn.default_channel.client.exists(EPOCH_KEY)


@pytest.fixture
def pg_stack(base_values) -> Iterator[tuple[Stack, PostgresServer]]:
    """A private PostgreSQL cluster (the test restarts it) and a private broker."""
    pg = PostgresServer()
    pg.start()
    broker = RedisServer()
    broker.start()
    try:
        values = {**base_values, "database_url": pg.create_database("faults"), "broker_url": broker.url}
        upgrade(make_engine(load_settings(**values)))
        yield Stack(values), pg
    finally:
        broker.stop()
        pg.cleanup()


def _wait_through_outage(stack: Stack, task_id: str, check: Any, timeout: float) -> TaskRecord:
    """Like ``Stack.wait``, but a database that does not answer yet is only a reason to ask again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            record = stack.record(task_id)
            if check(record):
                return record
        except OperationalError:
            pass
        assert time.monotonic() < deadline, f"task {task_id} did not get there"
        time.sleep(0.1)


def test_postgres_restarted_mid_sync_retries_and_the_sync_is_exact(pg_stack, dovecot, mailbox_user) -> None:
    """PostgreSQL stops while a sync writes its batches and comes back two seconds later.
    The attempt's database fault is transient: the task is retried, resumes from its last
    committed batch, and ends with every message stored once and the folder's count true."""
    stack, pg = pg_stack
    worker = stack.worker("sync")
    worker.start(wait_ready=False)
    try:
        seed(dovecot, mailbox_user, "INBOX", 2000, size=600)
        account = stack.make_account(dovecot, mailbox_user)
        worker.wait_ready()
        task_id = stack.dispatch_sync(account)
        stack.wait(task_id, lambda r: r.state == "running" and r.progress > 0, timeout=60)
        pg.stop()
        time.sleep(2)
        pg.start()
        record = _wait_through_outage(stack, task_id, lambda r: r.is_final, timeout=90)
    finally:
        worker.stop()
    assert record.state == "succeeded" and record.attempts >= 2, (record.state, record.last_error)
    with stack.sessions() as session:
        mine = Message.account_id == account.id
        rows = session.execute(select(func.count(), func.count(func.distinct(Message.uid))).where(mine)).one()
        inbox = select(Folder).where(Folder.account_id == account.id, Folder.name == "INBOX")
        folder = session.scalars(inbox).one()
    assert tuple(rows) == (2000, 2000)
    assert folder.message_count == 2000


def test_imap_down_past_the_retry_budget_fails_shows_and_recovers(
    kit, smtp, mailbox_user, sessions, workers
) -> None:
    """The account's IMAP server goes away for longer than the sync's retries last: the
    task ends ``failed`` saying it gave up, the account shows the error, Beat still finds
    the account due at its interval (the failure neither stops nor hastens it), and the
    first sync after the server is back is exact."""
    server = DovecotServer()
    server.start()
    try:
        server.add_user(*mailbox_user)
        seed(server, mailbox_user, "INBOX", 20)
        account = kit.admin.post("/api/accounts", json=account_body(server, smtp, mailbox_user)).get_json()

        def sync() -> dict[str, Any]:
            task_id = kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"]
            return kit.admin.wait_task(task_id, timeout=90)

        assert sync()["state"] == "succeeded"
        server.stop()
        task = sync()
        assert task["state"] == "failed" and task["error"]["code"] == "mail_unavailable", task
        assert task["attempts"] == QUEUES["sync"].max_retries + 1
        assert task["error"]["message"].startswith(f"gave up after {task['attempts']} attempts")
        shown = kit.admin.get(f"/api/accounts/{account['id']}").get_json()
        assert "IMAP" in (shown["last_sync_error"] or "") and shown["sync_task_id"] is None
        interval, tick = shown["sync_interval"], 300.0
        with sessions() as session:
            now = utcnow()
            assert account["id"] not in accounts.due_account_ids(session, now, tick_seconds=tick)
            later = now + timedelta(seconds=1.5 * interval + tick)
            assert account["id"] in accounts.due_account_ids(session, later, tick_seconds=tick)
        server.start()
        seed(server, mailbox_user, "INBOX", 5, start=20)
        again = sync()
        assert again["state"] == "succeeded", again
        name, password = mailbox_user
        assert stored(sessions, account["id"]) == len(server.uids(name, password, "INBOX")) == 25
        assert kit.admin.get(f"/api/accounts/{account['id']}").get_json()["last_sync_error"] is None
    finally:
        server.cleanup()


def test_a_scheduled_send_whose_time_passed_with_no_worker_goes_out_once(
    kit, account, smtp, base_values
) -> None:
    """A scheduled send is accepted while no send worker runs, and its ``send_at`` passes;
    the send worker that then starts sends it once, at once."""
    broker = RedisServer()
    broker.start()
    values = {**base_values, "broker_url": broker.url}
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    worker = CeleryWorker(["send"], env=worker_env(env_for(values)), name=f"late-{uuid.uuid4().hex[:6]}")
    try:
        send_at = datetime.now(UTC) + timedelta(seconds=2)
        body = {"to": ["a@example.test"], "text": "late", "save_sent": False, "send_at": send_at.isoformat()}
        accepted = api.post(f"/api/accounts/{account['id']}/send", json=body).get_json()
        task_id, message_id = accepted["task_id"], accepted["message_id"]
        time.sleep(max(0.0, (send_at - datetime.now(UTC)).total_seconds()) + 0.5)
        assert delivered(smtp, message_id) == [] and api.task(task_id)["state"] == "queued"
        worker.start()
        task = api.wait_task(task_id, timeout=30)
        time.sleep(1)
    finally:
        worker.stop()
        broker.stop()
    assert task["state"] == "succeeded" and task["attempts"] == 1, task
    assert len(delivered(smtp, message_id)) == 1
    assert _received(worker.log_text(), task_id) == 1


def test_spam_worker_killed_mid_check_stores_each_verdict_once(
    kit, dovecot, smtp, mailbox_user, sessions, base_values, workers
) -> None:
    """The spam worker's pool child is SIGKILLed while a check scores and moves spam to
    Junk batch by batch. The message goes back to the queue (the attempt was lost), the
    check runs again and ends; every message has its verdict, each spam message is in
    Junk once, and a sync afterwards finds one row per message on the server."""
    from tests.test_spam_task import mails, new_account

    account_id = new_account(kit, dovecot, smtp, mailbox_user, spam_move_to_junk=True)
    assert (
        kit.admin.patch(
            "/api/spam/settings", json={"block": ["offers.example"], "allow": ["partner.example"]}
        ).status_code
        == 200
    )
    ham, spam = 1200, 300
    dovecot.append_messages(
        *mailbox_user,
        "INBOX",
        mails(ham // 2, "colleague@partner.example", "Minutes", "The minutes of the meeting.")
        + mails(spam, "deals@news.offers.example", "Offer", "Our weekly newsletter.", start=ham // 2)
        + mails(ham // 2, "colleague@partner.example", "Notes", "Notes.", start=ham // 2 + spam),
    )
    broker = RedisServer()
    broker.start()
    values = {**base_values, "broker_url": broker.url}
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    worker = CeleryWorker(["spam"], env=worker_env(env_for(values)), name=f"spam-{uuid.uuid4().hex[:6]}")
    worker.start(wait_ready=False)  # starts while the shared sync worker syncs the mailbox
    try:
        first = kit.admin.post(f"/api/accounts/{account_id}/sync").get_json()["task_id"]
        assert kit.admin.wait_task(first, timeout=90)["state"] == "succeeded"
        worker.wait_ready()
        task_id = api.post(f"/api/accounts/{account_id}/spam-check", json={"folder": "INBOX"}).get_json()[
            "task_id"
        ]
        api.wait_task(task_id, where=lambda t: t["state"] == "running" and t["progress"] > 0, timeout=60)
        assert worker.pid is not None
        children = psutil.Process(worker.pid).children(recursive=True)
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
        task = api.wait_task(task_id, timeout=90)
    finally:
        worker.stop()
        broker.stop()
    assert children and task["state"] == "succeeded" and task["attempts"] == 2, task
    again = kit.admin.post(f"/api/accounts/{account_id}/sync").get_json()["task_id"]
    assert kit.admin.wait_task(again, timeout=90)["state"] == "succeeded"
    on_server = len(dovecot.uids(*mailbox_user, "INBOX")) + len(dovecot.uids(*mailbox_user, "Junk"))
    assert on_server == ham + spam and len(dovecot.uids(*mailbox_user, "Junk")) == spam
    with sessions() as session:
        mine = Message.account_id == account_id
        rows, headers, scored = session.execute(
            select(
                func.count(),
                func.count(func.distinct(Message.message_id_header)),
                func.count(Message.spam_score),
            ).where(mine)
        ).one()
        junk = session.scalar(
            select(func.count())
            .select_from(Message)
            .join(Folder)
            .where(mine, Folder.name == "Junk", Message.is_spam.is_(True))
        )
    assert (rows, headers, scored, junk) == (ham + spam, ham + spam, ham + spam, spam)


def test_a_task_past_its_hard_time_limit_ends_failed_at_once(stack, dovecot, mailbox_user) -> None:
    """The pool process running a sync stops answering (SIGSTOP, as if stuck in a C call
    that the soft limit's exception cannot interrupt). At the hard time limit the worker
    kills it, and the record ends ``failed`` (``time_limit``) then, with the account's sync
    lock free: not ``running`` until the stale-record sweep, hours later."""
    stack, _ = stack
    limits = {"task_soft_time_limit": "4", "task_hard_time_limit": "6", "broker_visibility_timeout": "11"}
    stack = Stack({**stack.values, **limits})
    worker = stack.worker("sync")
    worker.start(wait_ready=False)
    try:
        seed(dovecot, mailbox_user, "INBOX", 2000, size=600)
        account = stack.make_account(dovecot, mailbox_user)
        worker.wait_ready()
        task_id = stack.dispatch_sync(account)
        stack.wait(task_id, lambda r: r.state == "running" and r.progress > 0, timeout=30)
        assert worker.pid is not None
        for child in psutil.Process(worker.pid).children(recursive=True):
            os.kill(child.pid, signal.SIGSTOP)
        record = stack.wait(task_id, lambda r: r.is_final, timeout=30)
    finally:
        worker.stop()
    assert (record.state, record.error_code, record.attempts) == ("failed", "time_limit", 1), (
        record.last_error
    )
    assert "Hard time limit" in worker.log_text()
    with stack.sessions() as session:
        assert session.get(Account, account.id).sync_task_id is None  # type: ignore[union-attr]


def test_beat_runs_the_sweep_every_minute_on_the_periodic_queue(settings) -> None:
    app = make_celery(settings)
    app.loader.import_default_modules()
    entry = app.conf.beat_schedule["redispatch-lost"]
    assert entry["task"] == "mailroom.redispatch_lost" and entry["task"] in app.tasks
    assert entry["schedule"] == 60 and entry["options"]["queue"] == "periodic"
    assert app.amqp.router.route({}, entry["task"])["queue"].name == "periodic"
