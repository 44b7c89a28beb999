"""The dispatch path: one transaction on one connection, an O(1) duration estimate kept as
tasks succeed, no result backend needed, a per-tenant cap on tasks in flight, and stats
and metrics that never read the task history. Real PostgreSQL, Redis and workers."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from services import task_stats
from services.models import TaskDuration, TaskRecord
from services.settings import load_settings
from tasks.celery_app import make_celery
from tasks.dispatch import dispatch
from tests.conftest import account_body, env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api, TenantKit, error_of


@contextmanager
def watch_engine(app: Any) -> Iterator[dict[str, list[Any]]]:
    """Connection checkouts and SQL statements of ``app``'s engine while the block runs."""
    engine = app.extensions["mailroom"].sessions.kw["bind"]
    seen: dict[str, list[Any]] = {"checkouts": [], "statements": []}

    def checkout(*_: Any) -> None:
        seen["checkouts"].append(1)

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen["statements"].append(" ".join(statement.split()))

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "checkout", checkout)
        event.remove(engine, "before_cursor_execute", before)


def cancel_all(sessions: sessionmaker[Session], account_id: str) -> None:
    """Every task of the account ``cancelled``: none holds its sync lock any more."""
    with sessions() as session:
        session.execute(
            update(TaskRecord)
            .where(TaskRecord.account_id == account_id)
            .values(state="cancelled")
            .execution_options(synchronize_session=False)
        )
        session.commit()


def test_dispatch_is_one_transaction_on_one_connection(app, kit, account, sessions) -> None:
    """Key lookup; one INSERT … SELECT that checks the account and the cap and reads the
    estimate: one connection, two statements, one commit, and nothing reads the task
    history for the estimate."""
    path = f"/api/accounts/{account['id']}/verify"
    kit.admin.post(path)  # the key's last_used_at is written at most once a minute
    with watch_engine(app) as seen:
        response = kit.admin.post(path)
    assert response.status_code == 202, response.get_json()
    assert len(seen["checkouts"]) == 1, seen
    statements = seen["statements"]
    assert len(statements) == 2, statements
    assert not [s for s in statements if s.startswith("UPDATE api_keys")], statements
    history_reads = [s for s in statements if re.search(r"FROM tasks\b", s) and "state IN ('queued'" not in s]
    assert history_reads == [], history_reads
    with sessions() as session:
        record = session.get(TaskRecord, response.get_json()["task_id"])
        assert record is not None and record.state in {"queued", "running", "succeeded"}


def test_dispatch_on_an_account_the_caller_cannot_see_is_404(kit, other_kit, account, sessions) -> None:
    path = f"/api/accounts/{account['id']}/verify"
    for api in (other_kit.admin, kit.member):  # another tenant; a member, not the owner
        response = api.post(path)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    with sessions() as session:
        written = session.scalars(select(TaskRecord.id).where(TaskRecord.account_id == account["id"])).all()
    assert written == []


@pytest.mark.usefixtures("workers")
def test_estimate_is_a_running_mean_kept_as_tasks_succeed(kit, account, sessions) -> None:
    first = kit.admin.wait_task(kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"])
    assert first["state"] == "succeeded"
    with sessions() as session:
        stats = session.get(TaskDuration, (account["id"], "verify"))
        record = session.get(TaskRecord, first["id"])
    assert stats is not None and record is not None and stats.runs == 1
    assert record.started_at is not None and record.finished_at is not None
    took = (record.finished_at - record.started_at).total_seconds()
    assert stats.recent_seconds == pytest.approx(took, abs=1e-3)
    second = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    assert kit.admin.task(second)["estimated_duration"] == pytest.approx(took, abs=1e-3)
    assert kit.admin.wait_task(second)["state"] == "succeeded"
    stats_out = kit.admin.get("/api/admin/stats").get_json()
    assert stats_out["tasks_by_state"]["succeeded"] == 2
    with sessions() as session:
        stats = session.get(TaskDuration, (account["id"], "verify"))
        assert stats is not None and stats.runs == 2
        assert stats_out["average_duration_seconds"]["verify"] == pytest.approx(
            stats.total_seconds / 2, abs=1e-3
        )


def test_running_mean_weighs_like_the_last_runs(kit, account, sessions) -> None:
    """A hundred 1 s runs after one 100 s run: the estimate (weighted like the last ~20
    runs) has forgotten the outlier, the all-time mean keeps every run."""
    with sessions() as session:
        for seconds in [100.0] + [1.0] * 100:
            _succeed(session, kit, account["id"], seconds)
        session.commit()
        estimate = task_stats.estimate(session, account["id"], "verify")
        means = task_stats.average_durations(session, kit.tenant_id)
    assert estimate is not None and 1.0 <= estimate < 1.2
    assert means["verify"] == pytest.approx(200.0 / 101, abs=1e-3)


def _succeed(session: Session, kit: TenantKit, account_id: str, seconds: float) -> None:
    from datetime import timedelta

    from services.models import utcnow

    now = utcnow()
    record = TaskRecord(
        tenant_id=kit.tenant_id,
        user_id=kit.admin_id,
        account_id=account_id,
        type="verify",
        queue="sync",
        params={},
        state="succeeded",
        started_at=now - timedelta(seconds=seconds),
        finished_at=now,
    )
    session.add(record)
    session.flush()
    task_stats.record_success(session, record.id)


# --- no result backend needed ------------------------------------------------------------


@pytest.fixture
def private_servers(base_values: dict[str, Any]) -> Iterator[tuple[RedisServer, RedisServer, dict[str, Any]]]:
    """A broker and a result backend of this test's own (so only its own worker consumes)."""
    broker, results = RedisServer(), RedisServer()
    broker.start()
    results.start()
    values = {**base_values, "broker_url": broker.url, "result_backend_url": results.url}
    yield broker, results, values
    broker.stop()
    results.stop()


def test_result_backend_down_dispatch_and_worker_still_work(kit, account, private_servers) -> None:
    from mailroom.app import create_app

    _, results, values = private_servers
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    results.kill()
    response = api.post(f"/api/accounts/{account['id']}/verify")
    assert response.status_code == 202, response.get_json()
    task_id = response.get_json()["task_id"]
    worker = CeleryWorker(["sync"], env=worker_env(env_for(values)), name="no-results-sync")
    worker.start()
    try:
        task = api.wait_task(task_id, timeout=60)
        assert task["state"] == "succeeded", task
        assert task["result"]["imap"]["capabilities"], task
    finally:
        worker.stop()


# --- the cap on tasks in flight per tenant and queue -------------------------------------


def test_cap_on_tasks_in_flight_is_per_tenant(
    kit, other_kit, account, private_servers, dovecot, smtp, mailbox_user
) -> None:
    """With no worker the tasks stay queued: the third dispatch of a tenant capped at two
    is a 429 with Retry-After, and another tenant still dispatches."""
    from mailroom.app import create_app

    _, _, values = private_servers
    app = create_app(load_settings(**values, max_tasks_in_flight_per_queue=2))
    mine, theirs = Api(app, kit.admin_key), Api(app, other_kit.admin_key)
    path = f"/api/accounts/{account['id']}/verify"
    assert [mine.post(path).status_code for _ in range(2)] == [202, 202]
    refused = mine.post(path)
    assert refused.status_code == 429
    error = error_of(refused)
    assert error["code"] == "too_many_tasks_in_flight"
    assert error["details"]["limit"] == 2 and error["details"]["queue"] == "sync"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # a sync on the same queue is refused too; nothing was written for either
    assert mine.post(f"/api/accounts/{account['id']}/sync").status_code == 429
    assert mine.get(f"/api/accounts/{account['id']}").get_json()["sync_task_id"] is None
    assert mine.get("/api/tasks").get_json()["total"] == 2
    other_account = theirs.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user))
    assert other_account.status_code == 201, other_account.get_json()
    assert theirs.post(f"/api/accounts/{other_account.get_json()['id']}/verify").status_code == 202
    # once one of the tenant's tasks ends, a slot is free again
    first = mine.get("/api/tasks").get_json()["items"][0]["id"]
    assert mine.post(f"/api/tasks/{first}/cancel").status_code == 202
    assert mine.post(path).status_code == 202


def test_cap_count_uses_the_in_flight_index(sessions: sessionmaker[Session], kit) -> None:
    """PostgreSQL can answer the cap's count from the partial index (the predicate is a
    literal, so it is provably the index's even once psycopg prepares the statement)."""
    with sessions() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        for _ in range(7):  # past psycopg's prepare threshold (5)
            task_stats.in_flight(session, kit.tenant_id, "sync", up_to=1000)
        query = (
            select(TaskRecord.id)
            .where(
                TaskRecord.tenant_id == kit.tenant_id,
                TaskRecord.queue == "sync",
                text(task_stats.IN_FLIGHT_SQL),
            )
            .limit(1000)
        )
        compiled = query.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
        plan = "\n".join(row[0] for row in session.execute(text(f"EXPLAIN {compiled}")))
    assert "ix_tasks_in_flight" in plan, plan


# --- stats and the scrape read no history ------------------------------------------------


def test_stats_and_metrics_read_no_task_history(app, kit, account, sessions) -> None:
    with sessions() as session:
        for seconds in (2.0, 4.0):
            _succeed(session, kit, account["id"], seconds)
        # a task in flight, written as dispatch writes it (a real one could end before the
        # stats are read and move both the count and the mean)
        session.add(
            TaskRecord(
                tenant_id=kit.tenant_id,
                user_id=kit.admin_id,
                account_id=account["id"],
                type="verify",
                queue="sync",
                params={},
                state="queued",
            )
        )
        session.commit()
    with watch_engine(app) as seen:
        stats = kit.admin.get("/api/admin/stats")
        metrics = kit.admin.get("/metrics")
    assert stats.status_code == 200 and metrics.status_code == 200
    body = stats.get_json()
    assert body["tasks_by_state"]["succeeded"] == 2
    assert body["tasks_by_state"]["queued"] == 1
    assert body["average_duration_seconds"]["verify"] == pytest.approx(3.0)
    text_out = metrics.get_data(as_text=True)
    assert re.search(r'mailroom_tasks_succeeded_total\{queue="sync"\} \d', text_out), text_out
    reads = [s for s in seen["statements"] if re.search(r"FROM tasks\b", s)]
    assert reads, seen["statements"]
    bounded = [s for s in reads if "state IN ('queued'" in s or "state IN ('failed'" in s]
    assert bounded == reads, reads


def test_concurrent_sync_dispatches_queue_one_sync(kit, account, private_servers, sessions) -> None:
    """Eight dispatches of a sync of one account at once: one is queued, the others get its
    record. Each claim waits on the account row's lock and then decides on what the winner
    committed, not on its own stale snapshot."""
    _, _, values = private_servers
    celery = make_celery(load_settings(**values))
    start = threading.Barrier(8)

    def one() -> Any:
        start.wait()
        return dispatch(
            celery,
            sessions,
            type="sync",
            tenant_id=kit.tenant_id,
            user_id=kit.admin_id,
            account_id=account["id"],
            params={},
        )

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: one(), range(8)))
        assert sum(r.created for r in results) == 1
        assert len({r.record.id for r in results}) == 1
        cancel_all(sessions, account["id"])


@pytest.mark.usefixtures("workers")
def test_a_sync_whose_message_was_never_published_is_replaced_by_the_next_one(
    kit, account, sessions, settings
) -> None:
    """A process killed between a sync's commit and its publish leaves a ``queued`` record
    holding the account's sync lock with no message behind it. Once it is older than
    SYNC_NEVER_DELIVERED_AFTER, the next sync dispatched for the account fails it
    (``superseded``) and is queued and run in its place; a younger one is still answered
    as the sync in flight."""
    from datetime import timedelta

    from services import accounts, task_records
    from services.models import utcnow
    from tasks import dispatch as dispatching

    def orphan(age: timedelta) -> str:
        """A sync record and its claim on the account, committed, never published."""
        cancel_all(sessions, account["id"])  # no sync in flight (the first one may still run)
        with sessions() as session:
            record = task_records.create_record_if_allowed(
                session,
                tenant_id=kit.tenant_id,
                user_id=kit.admin_id,
                account_id=account["id"],
                type="sync",
                queue="sync",
                priority=9,
                params={},
                max_retries=5,
                origin="watcher",
                default_estimate=1.0,
                cap=None,
                visible_to=None,
            )
            assert record is not None
            assert accounts.claim_sync_lock(session, account["id"], record.id) is None
            session.execute(
                update(TaskRecord).where(TaskRecord.id == record.id).values(created_at=utcnow() - age)
            )
            session.commit()
            return record.id

    young = orphan(dispatching.SYNC_NEVER_DELIVERED_AFTER - timedelta(minutes=1))
    answer = kit.admin.post(f"/api/accounts/{account['id']}/sync")
    assert answer.status_code in (200, 202) and answer.get_json()["task_id"] == young

    lost = orphan(dispatching.SYNC_NEVER_DELIVERED_AFTER + timedelta(minutes=1))
    answer = kit.admin.post(f"/api/accounts/{account['id']}/sync")
    assert answer.status_code == 202, answer.get_json()
    replacement = answer.get_json()["task_id"]
    assert replacement != lost
    old = kit.admin.get(f"/api/tasks/{lost}").get_json()
    assert old["state"] == "failed" and old["error"]["code"] == "superseded", old
    deadline = time.monotonic() + 60
    while (state := kit.admin.get(f"/api/tasks/{replacement}").get_json()["state"]) not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state == "succeeded"
