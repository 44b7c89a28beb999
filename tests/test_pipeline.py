"""The task pipeline end to end: API → broker → the queue's own worker process → record.

Everything here is real: the Flask app, PostgreSQL, two Redis servers (broker and result
backend), Celery worker subprocesses, Dovecot and aiosmtpd."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from services.models import TaskRecord
from services.retry import backoff_delay
from tasks.celery_app import make_celery
from tasks.dispatch import dispatch
from tasks.monitoring import get_queue_stats
from tests.conftest import account_body, env_for, worker_env
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api, error_of

pytestmark = pytest.mark.usefixtures("workers")


def test_verify_travels_to_the_sync_worker_and_reports_capabilities(kit, account) -> None:
    response = kit.admin.post(f"/api/accounts/{account['id']}/verify")
    assert response.status_code == 202
    accepted = response.get_json()
    assert accepted["state"] == "queued" and accepted["queue"] == "sync"
    assert response.headers["Location"] == f"/api/tasks/{accepted['task_id']}"
    task = kit.admin.wait_task(accepted["task_id"])
    assert task["state"] == "succeeded", task
    assert task["progress"] == 100 and task["attempts"] == 1 and task["error"] is None
    assert "IMAP4REV1" in task["result"]["imap"]["capabilities"]
    assert "auth" in task["result"]["smtp"]["extensions"]
    assert task["estimated_duration"] is not None and task["duration"] >= 0
    assert kit.admin.get(f"/api/accounts/{account['id']}").get_json()["capabilities"]


def test_record_names_the_worker_of_its_queue(kit, account, sessions) -> None:
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    kit.admin.wait_task(task_id)
    with sessions() as session:
        assert session.get(TaskRecord, task_id).worker.startswith("sync@")


@pytest.mark.parametrize(
    ("type", "queue", "params", "code"),
    [
        # Parameters only a buggy or hostile publisher would send: the worker of the task's
        # own queue must be the one that refuses them (send, delete and spam checks do real
        # work, tested in test_send*.py, test_delete*.py and test_spam_task*.py).
        (
            "send",
            "send",
            {"outbox_id": "not-an-outbox", "message_id": "<x@example.test>"},
            "validation_error",
        ),
        ("delete", "delete", {"message_ids": ["m1"]}, "validation_error"),
        ("spam_check", "spam", {"message_ids": ["m1"], "learn": "spam"}, "validation_error"),
    ],
)
def test_each_task_type_runs_on_its_own_queue(app, kit, account, sessions, type, queue, params, code) -> None:
    """Each task type travels on its own queue to that queue's worker, which validates the
    parameters again and reports on the record."""
    st = app.extensions["mailroom"]
    result = dispatch(
        st.celery,
        sessions,
        type=type,
        tenant_id=kit.tenant_id,
        user_id=kit.admin_id,
        account_id=account["id"],
        params=params,
    )
    task = kit.admin.wait_task(result.record.id)
    assert task["queue"] == queue and task["state"] == "failed"
    assert task["error"]["code"] == code and task["attempts"] == 1, task["error"]
    with sessions() as session:
        assert session.get(TaskRecord, result.record.id).worker.startswith(f"{queue}@")


def test_worker_validates_parameters_again(app, kit, account, sessions) -> None:
    st = app.extensions["mailroom"]
    result = dispatch(
        st.celery,
        sessions,
        type="send",
        tenant_id=kit.tenant_id,
        user_id=kit.admin_id,
        account_id=account["id"],
        params={"to": [], "text": "x"},
    )
    task = kit.admin.wait_task(result.record.id)
    assert task["state"] == "failed" and task["error"]["code"] == "validation_error" and task["attempts"] == 1


def test_worker_rechecks_ownership(kit, other_kit, account, app, sessions) -> None:
    """A message naming another tenant's account (forged, or the account changed hands):
    the worker checks ownership itself and refuses to act."""
    st = app.extensions["mailroom"]
    result = dispatch(
        st.celery,
        sessions,
        type="verify",
        tenant_id=other_kit.tenant_id,
        user_id=other_kit.admin_id,
        account_id=account["id"],
        params={},
    )
    task = other_kit.admin.wait_task(result.record.id)
    assert task["state"] == "failed" and task["error"]["code"] == "not_found" and task["result"] is None


def test_worker_rechecks_a_member_may_act_on_the_account(kit, account, app, sessions) -> None:
    """Within one tenant: a message naming the admin's account for a member (not its owner,
    not an admin) is refused by the worker; the same message for the admin runs."""
    st = app.extensions["mailroom"]

    def run_as(user_id: str) -> dict[str, Any]:
        result = dispatch(
            st.celery,
            sessions,
            type="verify",
            tenant_id=kit.tenant_id,
            user_id=user_id,
            account_id=account["id"],
            params={},
        )
        return kit.admin.wait_task(result.record.id)  # type: ignore[no-any-return]

    refused = run_as(kit.member_id)
    assert refused["state"] == "failed" and refused["error"]["code"] == "not_found", refused
    assert "for this user" in refused["error"]["message"]
    assert run_as(kit.admin_id)["state"] == "succeeded"


def test_wrong_password_fails_at_once_without_retry(kit, dovecot, smtp, mailbox_user) -> None:
    body = account_body(dovecot, smtp, (mailbox_user[0], "wrong-password"))
    account = kit.admin.post("/api/accounts", json=body).get_json()
    task = kit.admin.wait_task(kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"])
    assert task["state"] == "failed" and task["attempts"] == 1
    assert task["error"]["code"] == "mail_auth_failed"
    assert "refused the login" in task["error"]["message"]


@pytest.mark.slow
def test_transient_error_retries_with_backoff_then_gives_up(kit, dovecot, smtp, mailbox_user) -> None:
    body = account_body(dovecot, smtp, mailbox_user)
    body["imap"]["port"] = free_port()  # nothing listens: connection refused, a transient fault
    account = kit.admin.post("/api/accounts", json=body).get_json()
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    retrying = kit.admin.wait_task(task_id, states={"retrying"})
    assert retrying["next_retry_at"] and retrying["error"]["code"] == "mail_unavailable"
    task = kit.admin.wait_task(task_id, timeout=90)
    assert task["state"] == "failed"
    assert task["attempts"] == 6  # the first try and the sync queue's 5 retries
    assert task["error"]["message"].startswith("gave up after 6 attempts")


@pytest.mark.slow
def test_transient_error_then_recovery_succeeds(kit, smtp, mailbox_user) -> None:
    server = DovecotServer()
    server.start()
    try:
        server.add_user(*mailbox_user)
        body = account_body(server, smtp, mailbox_user)
        account = kit.admin.post("/api/accounts", json=body).get_json()
        server.stop()
        task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
        kit.admin.wait_task(task_id, states={"retrying"})
        server.restart()
        task = kit.admin.wait_task(task_id, timeout=60)
        assert task["state"] == "succeeded" and task["attempts"] >= 2
    finally:
        server.stop()


def test_backoff_doubles_from_base_with_cap_and_jitter() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(n, base=5, cap=600, rng=rng) for n in range(10)]
    for n, delay in enumerate(delays):
        nominal = min(600, 5 * 2**n)
        assert 0.8 * nominal <= delay <= min(600, 1.2 * nominal)
    assert delays[-1] <= 600 and delays[0] < delays[3] < delays[6]


def test_spam_backlog_does_not_delay_sync(app, kit, account, sessions) -> None:
    """Thousands of spam tasks queued; a sync-queue task still runs at once, while the
    spam queue is still deep — dedicated workers per queue."""
    celery = app.extensions["mailroom"].celery
    with celery.producer_pool.acquire(block=True) as producer:
        for _ in range(3000):
            celery.send_task(
                "mailroom.check_spam",
                kwargs={"tenant_id": kit.tenant_id, "params": {"folder": "x"}},
                queue="spam",
                routing_key="spam",
                producer=producer,
            )
    task = kit.admin.wait_task(kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"])
    assert task["state"] == "succeeded"
    assert get_queue_stats(celery)["spam"] > 1000
    celery.control.purge()


def test_broker_down_is_503_and_the_record_says_so(kit, account, settings, sessions) -> None:
    from mailroom.app import create_app

    dead = RedisServer()
    dead.start()
    app = create_app(settings.model_copy(update={"broker_url": dead.url}))
    dead.kill()
    api = Api(app, kit.admin_key)
    response = api.post(f"/api/accounts/{account['id']}/verify")
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "service_unavailable"
    task = kit.admin.task(error["details"]["task_id"])
    assert task["state"] == "failed" and task["error"]["code"] == "dispatch_failed"
    assert api.get("/readyz").status_code == 503
    # a sync that could not be queued does not hold the account's sync lock
    response = api.post(f"/api/accounts/{account['id']}/sync")
    assert response.status_code == 503
    with sessions() as session:
        queued = session.scalars(
            select(TaskRecord).where(TaskRecord.tenant_id == kit.tenant_id, TaskRecord.state == "queued")
        ).all()
    assert queued == []
    assert kit.admin.get(f"/api/accounts/{account['id']}").get_json()["sync_task_id"] is None


# --- tests with a private broker, so a queue can have no consumer for a while -------------


@pytest.fixture
def private_broker(base_values: dict[str, Any], tmp_path) -> Any:
    server = RedisServer()
    server.start()
    values = {**base_values, "broker_url": server.url}
    yield server, values
    server.stop()


def _worker(values: dict[str, Any], queue: str) -> CeleryWorker:
    return CeleryWorker(
        [queue], env=worker_env(env_for(values)), name=f"private-{queue}-{uuid.uuid4().hex[:6]}"
    )


def test_cancelled_queued_task_never_runs(kit, account, private_broker, sessions) -> None:
    from mailroom.app import create_app
    from services.settings import load_settings

    _, values = private_broker
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    task_id = api.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    cancelled = api.post(f"/api/tasks/{task_id}/cancel")
    assert cancelled.status_code == 202 and cancelled.get_json()["state"] == "cancelled"
    worker = _worker(values, "sync")
    worker.start()
    try:
        celery = make_celery(load_settings(**values))
        deadline = time.monotonic() + 20
        while get_queue_stats(celery)["sync"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        task = api.task(task_id)
        assert task["state"] == "cancelled" and task["attempts"] == 0 and task["started_at"] is None
        assert task["stage"] == "cancelled before it ran" and task["error"] is None
        again = api.post(f"/api/tasks/{task_id}/cancel")
        assert again.status_code == 409 and error_of(again)["code"] == "conflict"
    finally:
        worker.stop()


def test_user_triggered_runs_before_beat_triggered(kit, account, private_broker, sessions) -> None:
    from services.settings import load_settings

    _, values = private_broker
    celery = make_celery(load_settings(**values))
    common = {"tenant_id": kit.tenant_id, "user_id": kit.admin_id, "account_id": account["id"], "params": {}}
    beat_ids = [
        dispatch(celery, sessions, type="verify", origin="beat", **common).record.id for _ in range(4)
    ]
    user_id = dispatch(celery, sessions, type="verify", **common).record.id
    worker = _worker(values, "sync")
    worker.start()
    try:
        for task_id in [*beat_ids, user_id]:
            kit.admin.wait_task(task_id)
        with sessions() as session:
            started = {
                r.id: r.started_at
                for r in session.scalars(select(TaskRecord).where(TaskRecord.id.in_([*beat_ids, user_id])))
            }
            priorities = {
                r.id: r.priority
                for r in session.scalars(select(TaskRecord).where(TaskRecord.id.in_([*beat_ids, user_id])))
            }
        assert started[user_id] == min(started.values())
        assert priorities[user_id] == 10 and all(priorities[b] == 5 for b in beat_ids)
    finally:
        worker.stop()


def test_admin_views(kit, account) -> None:
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    kit.admin.wait_task(task_id)
    stats = kit.admin.get("/api/admin/stats").get_json()
    assert set(stats["queues"]) == {"sync", "send", "delete", "spam", "periodic", "webhooks"}
    assert stats["queues"]["sync"]["priority"] == 10 and stats["queues"]["spam"]["priority"] == 3
    assert stats["queues"]["webhooks"]["priority"] == 2
    assert stats["tasks_by_state"]["succeeded"] == 1
    assert "verify" in stats["average_duration_seconds"]
    health = kit.admin.get("/api/admin/health").get_json()
    assert health["database"]["ok"] and health["broker"]["ok"] and health["result_backend"]["ok"]
    assert all(health["workers"][q] >= 1 for q in ("sync", "send", "delete", "spam", "periodic"))
    # This stack runs no Beat (tests queue periodic work themselves): health says so.
    assert health["beat"] == {"ok": False, "last_tick_at": None, "seconds_ago": None}
    assert health["status"] == "degraded"
    assert kit.admin.get("/api/admin/active-tasks").get_json() == {"items": []}


def test_task_list_filters_and_pages(kit, account) -> None:
    ids = [kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"] for _ in range(3)]
    for task_id in ids:
        kit.admin.wait_task(task_id)
    page = kit.admin.get("/api/tasks?limit=2").get_json()
    assert (
        [t["id"] for t in page["items"]] == ids[::-1][:2] and page["total"] == 3 and page["next_offset"] == 2
    )
    assert kit.admin.get("/api/tasks?state=succeeded&type=verify").get_json()["total"] == 3
    assert kit.admin.get("/api/tasks?state=failed").get_json()["total"] == 0
    assert kit.admin.get(f"/api/tasks?account_id={account['id']}").get_json()["total"] == 3
    assert kit.member.get("/api/tasks").get_json()["total"] == 0


def test_cancel_all_stops_only_this_tenants_work(
    kit, other_kit, account, private_broker, dovecot, smtp
) -> None:
    from mailroom.app import create_app
    from services.settings import load_settings
    from tests.conftest import account_body

    _, values = private_broker
    app = create_app(load_settings(**values))
    mine, theirs = Api(app, kit.admin_key), Api(app, other_kit.admin_key)
    my_tasks = [mine.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"] for _ in range(3)]
    their_account = theirs.post("/api/accounts", json=account_body(dovecot, smtp, ("x", "y"))).get_json()
    their_task = theirs.post(f"/api/accounts/{their_account['id']}/verify").get_json()["task_id"]
    active = mine.get("/api/admin/active-tasks").get_json()["items"]
    assert sorted(t["id"] for t in active) == sorted(my_tasks)
    assert kit.member.post("/api/admin/cancel-all").status_code == 403
    response = mine.post("/api/admin/cancel-all")
    assert response.status_code == 202 and response.get_json() == {"cancelled": 3, "stopping": 0}
    assert all(mine.task(t)["state"] == "cancelled" for t in my_tasks)
    assert theirs.task(their_task)["state"] == "queued"
    assert mine.get("/api/admin/active-tasks").get_json() == {"items": []}


def test_wrong_smtp_password_is_permanent(kit, dovecot, smtp, mailbox_user) -> None:
    body = account_body(dovecot, smtp, mailbox_user)
    body["smtp"]["password"] = "not-the-smtp-password"
    account = kit.admin.post("/api/accounts", json=body).get_json()
    task = kit.admin.wait_task(kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"])
    assert task["state"] == "failed" and task["attempts"] == 1
    assert task["error"]["code"] == "mail_auth_failed" and "SMTP" in task["error"]["message"]


def test_cancel_a_task_waiting_to_retry(kit, dovecot, smtp, mailbox_user) -> None:
    body = account_body(dovecot, smtp, mailbox_user)
    body["smtp"]["port"] = free_port()  # SMTP unreachable: transient, so it waits to retry
    account = kit.admin.post("/api/accounts", json=body).get_json()
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    retrying = kit.admin.wait_task(task_id, states={"retrying"})
    assert "SMTP connection failed" in retrying["error"]["message"]
    response = kit.admin.post(f"/api/tasks/{task_id}/cancel")
    assert response.status_code == 202 and response.get_json()["state"] == "cancelled"
    time.sleep(2)  # past the next retry time: the retry message arrives and is dropped
    task = kit.admin.task(task_id)
    assert task["state"] == "cancelled" and task["attempts"] == retrying["attempts"]
    # It ran (and failed) at least once: it says so, keeps that attempt's error, and no
    # retry is coming.
    assert task["stage"] == "cancelled while waiting to retry", task
    assert task["error"] == retrying["error"] and task["next_retry_at"] is None


def test_queue_helpers_see_a_waiting_task(kit, other_kit, account, private_broker, sessions) -> None:
    from services.errors import NotFound
    from services.settings import load_settings
    from services.tenancy import Principal
    from tasks import get_active_tasks, get_task_status, revoke_task

    _, values = private_broker
    celery = make_celery(load_settings(**values))
    result = dispatch(
        celery,
        sessions,
        type="verify",
        tenant_id=kit.tenant_id,
        user_id=kit.admin_id,
        account_id=account["id"],
        params={},
    )
    owner = Principal(kit.tenant_id, kit.admin_id, "admin")
    with sessions() as session:
        status = get_task_status(celery, session, result.record.id, owner)
        assert status["record"].state == "queued" and status["celery_state"] == "PENDING"
        assert [r.id for r in get_active_tasks(session, owner)] == [result.record.id]
        with pytest.raises(NotFound):
            get_task_status(
                celery, session, result.record.id, Principal(other_kit.tenant_id, other_kit.admin_id, "admin")
            )
    assert get_queue_stats(celery)["sync"] == 1
    revoke_task(celery, result.record.id)  # no worker listens: a broadcast, harmless


def test_queue_details_by_priority_and_oldest_age(kit, account, private_broker, sessions) -> None:
    """No consumer: what dispatch published waits on the broker, split by priority, and the
    oldest message's age grows from its dispatch stamp; the scrape shows both."""
    from mailroom.app import create_app
    from services.settings import load_settings
    from tasks.monitoring import get_queue_details

    _, values = private_broker
    celery = make_celery(load_settings(**values))
    common = {"tenant_id": kit.tenant_id, "user_id": kit.admin_id, "account_id": account["id"], "params": {}}
    dispatch(celery, sessions, type="verify", origin="beat", **common)
    time.sleep(1.0)
    dispatch(celery, sessions, type="verify", **common)
    details = get_queue_details(celery)
    assert details["sync"].by_priority == {10: 1, 5: 1} and details["sync"].depth == 2
    assert 1.0 <= details["sync"].oldest_age < 30
    assert details["spam"].depth == 0 and details["spam"].oldest_age is None
    metrics = Api(create_app(load_settings(**values)), kit.admin_key).get("/metrics").get_data(as_text=True)
    assert 'mailroom_queue_depth_by_priority{priority="10",queue="sync"} 1.0' in metrics
    assert 'mailroom_queue_depth{queue="sync"} 2.0' in metrics
    assert 'mailroom_dependency_up{dependency="result_backend"} 1.0' in metrics
    age = re.search(r'mailroom_queue_oldest_age_seconds\{queue="sync"\} ([0-9.e+]+)', metrics)
    assert age and float(age.group(1)) >= 1.0, metrics
