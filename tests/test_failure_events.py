"""The two ends of a task life outside the attempt's own error handling report
``task.failed`` like the others: a message whose worker was lost too often (failed by the
next delivery) and a task killed at its hard time limit (failed by the worker's main
process). Real PostgreSQL, broker, Celery workers and an HTTP receiver started here."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded

from services.db import tenant_sessions, transaction
from services.models import TaskRecord
from tasks.celery_app import make_celery
from tasks.lifecycle import _on_hard_time_limit

pytestmark = pytest.mark.usefixtures("workers")

VERIFY = "mailroom.verify_account"


class Receiver:
    """A real HTTP server in a thread that answers 200 and keeps each request's path and body."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.received, self.lock = received, lock

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def wait_one(self, path: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                bodies = [body for p, body in self.received if p == path]
            if bodies:
                assert len(bodies) == 1, bodies
                return bodies[0]
            time.sleep(0.05)
        raise AssertionError(f"no delivery to {path} within {timeout}s")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rcv = Receiver()
    thread = threading.Thread(target=rcv.server.serve_forever, daemon=True)
    thread.start()
    yield rcv
    rcv.server.shutdown()
    rcv.server.server_close()


def _running_record(sessions: Any, kit: Any, account: dict[str, Any], attempts: int) -> str:
    """A verify record left ``running`` by ``attempts`` attempts (no retries allowed)."""
    with transaction(tenant_sessions(sessions, kit.tenant_id)) as session:
        record = TaskRecord(
            tenant_id=kit.tenant_id,
            user_id=kit.admin_id,
            account_id=account["id"],
            type="verify",
            queue="sync",
            params={},
            state="running",
            attempts=attempts,
            max_retries=0,
        )
        session.add(record)
        session.flush()
        return record.id


def _hook(kit: Any, receiver: Receiver) -> str:
    path = f"/failed-{uuid.uuid4().hex[:8]}"
    response = kit.admin.post("/api/webhooks", json={"url": receiver.url(path), "events": ["task.failed"]})
    assert response.status_code == 201, response.get_json()
    return path


def test_a_task_failed_as_worker_lost_reports_task_failed(kit, account, sessions, settings, receiver) -> None:
    """The record is still ``running`` after its one allowed attempt when the message comes
    back (its worker was lost): the next delivery fails it and the event goes out."""
    path = _hook(kit, receiver)
    task_id = _running_record(sessions, kit, account, attempts=1)
    celery = make_celery(settings)
    celery.send_task(
        VERIFY,
        task_id=task_id,
        kwargs={
            "tenant_id": kit.tenant_id,
            "user_id": kit.admin_id,
            "account_id": account["id"],
            "params": {},
        },
        queue="sync",
        routing_key="sync",
    )
    event = receiver.wait_one(path, timeout=60)
    assert event["type"] == "task.failed"
    assert event["data"]["task_id"] == task_id and event["data"]["error"]["code"] == "worker_lost"
    task = kit.admin.get(f"/api/tasks/{task_id}").get_json()
    assert task["state"] == "failed" and task["error"]["code"] == "worker_lost"


def test_a_task_killed_at_its_hard_time_limit_reports_task_failed(
    kit, account, sessions, settings, receiver
) -> None:
    """What the worker's main process runs when a pool process was killed at the hard
    time limit (Celery's task_failure signal with TimeLimitExceeded)."""
    path = _hook(kit, receiver)
    task_id = _running_record(sessions, kit, account, attempts=1)
    celery = make_celery(settings)
    celery.loader.import_default_modules()
    _on_hard_time_limit(
        sender=celery.tasks[VERIFY],
        task_id=task_id,
        exception=TimeLimitExceeded(6.0),
        kwargs={"tenant_id": kit.tenant_id, "account_id": account["id"]},
    )
    task = kit.admin.get(f"/api/tasks/{task_id}").get_json()
    assert task["state"] == "failed" and task["error"]["code"] == "time_limit"
    event = receiver.wait_one(path, timeout=60)
    assert event["type"] == "task.failed"
    assert event["data"]["task_id"] == task_id and event["data"]["error"]["code"] == "time_limit"
