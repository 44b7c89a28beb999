"""Floods and fairness: one tenant's flood of spam checks and of API requests does not slow
another tenant down.

Tenant A queues a flood of real ``spam_check`` tasks (each scores 5 of its synced messages,
fetched from Dovecot) and hammers the API far past its rate limit from a second thread,
while tenant B syncs and sends through the API. B never sees a 429 (the limits count per
tenant), and B's queue wait (task record ``started_at - created_at``) stays within 1.5x of
its wait on the idle system measured in the same test, with an absolute floor of 2 s so
that a busy 2-core machine cannot fail it. The session's workers serve it: one process per
queue, as in production, so A's backlog sits on the ``spam`` queue that B never uses.

The suite's budget allows a flood of :data:`FLOOD` tasks; ``bench/bench_flood.py`` runs the
same scenario with 20,000 and prints the exact ratio.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mailroom.app import create_app
from services.db import transaction
from services.models import Message, TaskRecord
from services.settings import load_settings
from tasks.celery_app import make_celery
from tasks.dispatch import dispatch
from tasks.monitoring import get_queue_stats
from tests.conftest import account_body
from tests.servers.dovecot import DovecotServer
from tests.servers.mailgen import message
from tests.servers.smtp import SmtpServer
from tests.support import Api, make_tenant

#: Spam checks tenant A queues (bench/bench_flood.py: 20,000).
FLOOD = 1000
#: Messages in A's INBOX; each spam check scores PER_TASK of them.
A_MESSAGES, PER_TASK = 100, 5
#: Samples of B per phase (syncs and sends alternately).
SAMPLES = 10
#: B's pace: at most one request every this many seconds, far under its own limits.
B_PACE = 0.4
#: Rate limits of this test's API (per tenant): A goes far past them, B stays under.
LIMITS = {"rate_limit_per_second": 10, "rate_limit_per_minute": 300, "rate_limit_queue_per_minute": 100}
FINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Tenant:
    """A tenant's admin key and API client, and its account at a Dovecot user."""

    tenant_id: str
    user_id: str
    key: str
    account_id: str
    login: tuple[str, str]
    api: Api


def make_tenant_with_account(
    app: Any, sessions: sessionmaker[Session], dovecot: DovecotServer, smtp: SmtpServer
) -> Tenant:
    with transaction(sessions) as session:
        kit = make_tenant(session, app)
    name = "u" + uuid.uuid4().hex[:10]
    login = (name, "pw-" + name)
    dovecot.add_user(*login)
    api = Api(app, kit.admin_key)
    response = api.post("/api/accounts", json=account_body(dovecot, smtp, login))
    assert response.status_code == 201, response.get_json()
    return Tenant(kit.tenant_id, kit.admin_id, kit.admin_key, response.get_json()["id"], login, api)


def seed(
    tenants: list[Tenant], sessions: sessionmaker[Session], dovecot: DovecotServer, a_messages: int
) -> list[str]:
    """``a_messages`` messages in the first tenant's INBOX (a third ham), every tenant's
    account synced through the API; returns the first tenant's message ids."""
    a = tenants[0]
    now = datetime.now(UTC)
    mail = [
        message(
            f"Offer {i}",
            "Cheap pills, act now, click here!" if i % 3 else "Minutes of the meeting are attached.",
            sender=f"x{i}@n.test",
            to="a@a.test",
            date=now,
        )
        for i in range(a_messages)
    ]
    dovecot.append_messages(a.login[0], a.login[1], "INBOX", mail)
    for tenant in tenants:
        response = tenant.api.post(f"/api/accounts/{tenant.account_id}/sync")
        assert response.status_code == 202, response.get_json()
        record = wait_record(sessions, response.get_json()["task_id"])
        assert record.state == "succeeded", record.last_error
    with sessions() as session:
        return list(session.scalars(select(Message.id).where(Message.account_id == a.account_id)))


def wait_record(sessions: sessionmaker[Session], task_id: str, timeout: float = 120) -> TaskRecord:
    """Poll the record until it is final; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            record = session.get(TaskRecord, task_id)
            assert record is not None
            if record.state in FINAL:
                return record
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} did not end within {timeout} s")


class Hammer(threading.Thread):
    """Tenant A's client gone wild: reads and spam-check requests as fast as it can."""

    def __init__(self, tenant: Tenant, message_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.tenant = tenant
        self.message_ids = message_ids
        self.statuses: Counter[int] = Counter()
        self.codes: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        api = Api(self.tenant.api.client.application, self.tenant.key)
        i = 0
        while not self.stop.is_set():
            if i % 2:
                response = api.get("/api/accounts")
            else:
                ids = self.message_ids[(i * PER_TASK) % len(self.message_ids) :][:PER_TASK]
                response = api.post(
                    f"/api/accounts/{self.tenant.account_id}/spam-check", json={"message_ids": ids}
                )
            self.statuses[response.status_code] += 1
            if response.status_code == 429:
                self.codes[response.get_json()["error"]["code"]] += 1
            i += 1


class Flood(threading.Thread):
    """Tenant A's spam checks, dispatched the way the API does it (record, commit, publish):
    ``count`` of them, or fewer if stopped."""

    def __init__(
        self, settings: Any, sessions: sessionmaker[Session], tenant: Tenant, ids: list[str], count: int
    ) -> None:
        super().__init__(daemon=True)
        self.celery = make_celery(settings)
        self.sessions = sessions
        self.tenant = tenant
        self.ids = ids
        self.count = count
        self.done = 0
        self.stop = threading.Event()

    def run(self) -> None:
        ids = self.ids + self.ids
        for i in range(self.count):
            if self.stop.is_set():
                return
            start = (i * PER_TASK) % len(self.ids)
            dispatch(
                self.celery,
                self.sessions,
                type="spam_check",
                tenant_id=self.tenant.tenant_id,
                user_id=self.tenant.user_id,
                account_id=self.tenant.account_id,
                params={"message_ids": ids[start : start + PER_TASK]},
            )
            self.done += 1


def end_flood(celery: Any, sessions: sessionmaker[Session], tenant: Tenant) -> None:
    """Empty the spam queue and cancel the tenant's queued records (a worker skips those)."""
    with celery.connection_for_write() as conn:
        conn.default_channel.queue_purge("spam")
    with transaction(sessions) as session:
        session.execute(
            update(TaskRecord)
            .where(TaskRecord.tenant_id == tenant.tenant_id, TaskRecord.state.in_(["queued", "retrying"]))
            .values(state="cancelled")
            .execution_options(synchronize_session=False)
        )


def b_samples(b: Tenant, sessions: sessionmaker[Session], celery: Any, count: int) -> list[dict[str, Any]]:
    """``count`` tasks of B through the API, one at a time (sync, send, sync, …): each one's
    HTTP status, type, queue wait, final state, and the spam backlog when it was asked for."""
    samples = []
    for i in range(count):
        began = time.monotonic()
        backlog = get_queue_stats(celery)["spam"]
        if i % 2 == 0:
            kind = "sync"
            response = b.api.post(f"/api/accounts/{b.account_id}/sync")
        else:
            kind = "send"
            response = b.api.post(
                f"/api/accounts/{b.account_id}/send",
                json={"to": ["someone@example.test"], "subject": f"B {i}", "text": "Hello from B."},
            )
        sample: dict[str, Any] = {"type": kind, "status": response.status_code, "backlog": backlog}
        if response.status_code == 202:
            record = wait_record(sessions, response.get_json()["task_id"])
            assert record.started_at is not None
            sample["wait"] = (record.started_at - record.created_at).total_seconds()
            sample["state"] = record.state
        samples.append(sample)
        time.sleep(max(0.0, B_PACE - (time.monotonic() - began)))
    return samples


def median_wait(samples: list[dict[str, Any]], kind: str) -> float:
    return statistics.median(s["wait"] for s in samples if s["type"] == kind and "wait" in s)


@pytest.mark.slow
def test_a_flood_of_one_tenant_leaves_another_tenants_waits_and_limits_alone(
    base_values: dict[str, Any],
    sessions: sessionmaker[Session],
    workers: Any,
    dovecot: DovecotServer,
    smtp: SmtpServer,
) -> None:
    settings = load_settings(**{**base_values, **LIMITS, "max_tasks_in_flight_per_queue": FLOOD + 5000})
    app = create_app(settings)
    celery = make_celery(settings)
    a = make_tenant_with_account(app, sessions, dovecot, smtp)
    b = make_tenant_with_account(app, sessions, dovecot, smtp)
    t0 = time.monotonic()
    a_ids = seed([a, b], sessions, dovecot, A_MESSAGES)
    t1 = time.monotonic()
    assert len(a_ids) == A_MESSAGES

    b_samples(b, sessions, celery, 2)  # warm up: first connections of the workers and the API
    idle = b_samples(b, sessions, celery, SAMPLES)

    t2 = time.monotonic()
    hammer = Hammer(a, a_ids)
    flood = Flood(settings, sessions, a, a_ids, FLOOD)
    try:
        flood.start()
        hammer.start()
        # B starts once A's backlog is there and A is past its limits.
        deadline = time.monotonic() + 60
        while (flood.done < FLOOD // 2 or not hammer.codes) and time.monotonic() < deadline:
            time.sleep(0.05)
        t3 = time.monotonic()
        loaded = b_samples(b, sessions, celery, SAMPLES)
        t4 = time.monotonic()
    finally:
        hammer.stop.set()
        flood.stop.set()
        hammer.join(timeout=30)
        flood.join(timeout=30)
        end_flood(celery, sessions, a)  # nothing of A's left for the session's spam worker

    print(f"\nseed {t1 - t0:.1f} s, idle {t2 - t1:.1f} s, flood {t3 - t2:.1f} s, loaded {t4 - t3:.1f} s")
    report = {kind: (median_wait(idle, kind), median_wait(loaded, kind)) for kind in ("sync", "send")}
    backlogs = [s["backlog"] for s in loaded]
    print(
        f"\nA: {flood.done} spam checks dispatched, API answers {dict(hammer.statuses)} "
        f"(429 codes {dict(hammer.codes)}); spam backlog during B's samples {max(backlogs)} → {min(backlogs)}"
    )
    for kind, (quiet, busy) in report.items():
        print(
            f"B {kind}: median queue wait idle {quiet * 1000:.0f} ms, flooded {busy * 1000:.0f} ms, "
            f"ratio {busy / quiet if quiet else float('inf'):.2f}"
        )

    # B never saw a 429 (nor anything but 202), and every task of B succeeded.
    assert [s["status"] for s in idle + loaded] == [202] * (2 * SAMPLES)
    assert {s["state"] for s in idle + loaded} == {"succeeded"}
    # A really was past its limits, and its flood really was queued while B ran.
    assert hammer.codes["rate_limited"] > 0
    assert flood.done >= FLOOD // 2
    assert sum(1 for n in backlogs if n > 0) >= SAMPLES // 2
    # B's waits: within 1.5x of idle, or 2 s of it on a busy machine.
    for quiet, busy in report.values():
        assert busy <= max(1.5 * quiet, quiet + 2.0), report
