"""Webhooks both ways, against the real stack: signed deliveries to a real HTTP receiver
started here (retried after a 500, recorded, redelivered), the host policy, tenants kept
apart, and the signed inbound hook that queues a sync (bad, stale and replayed ones refused,
nothing queued)."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import func, select

from services import webhooks
from services.crypto import SecretBox
from services.db import tenant_sessions, transaction
from services.models import TaskRecord, WebhookDelivery
from services.settings import load_settings
from tests.servers.mailgen import message
from tests.support import Api, error_of, fields_of

pytestmark = pytest.mark.usefixtures("workers")

ALL_EVENTS = [
    "task.succeeded",
    "task.failed",
    "message.new",
    "message.deleted",
    "message.spam",
    "account.error",
]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> str:
        return self.headers.get("X-Mailroom-Event", "")

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """A real HTTP server in a thread: records every request, answers 500 to the first
    ``fail_first[(path, event)]`` requests of that path and event, 200 to the rest."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    fail_first: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Seconds to wait before answering a path (a slow endpoint).
    delays: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait(self, what: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            time.sleep(0.05)
        raise AssertionError(f"receiver: condition not met within {timeout}s; got {self.requests}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rcv = holder["r"]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k: v for k, v in self.headers.items()}
            key = (self.path, headers.get("X-Mailroom-Event", ""))
            with rcv.lock:
                failing = rcv.fail_first.get(key, 0)
                if failing:
                    rcv.fail_first[key] = failing - 1
                status = 500 if failing else 200
                rcv.requests.append(Received(self.path, headers, body, status))
                delay = rcv.delays.get(self.path, 0.0)
            time.sleep(delay)
            try:
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:
                pass  # the client gave up waiting

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder["r"]
    server.shutdown()
    server.server_close()


def verified(received: Received, secret: str, *, window: float = 300) -> bool:
    """The receiver's own check: HMAC-SHA256 of "<timestamp>." + body, and a fresh timestamp."""
    timestamp = received.headers.get("X-Mailroom-Timestamp", "")
    expected = (
        "sha256="
        + hmac.new(secret.encode(), timestamp.encode() + b"." + received.body, hashlib.sha256).hexdigest()
    )
    fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) <= window
    return fresh and hmac.compare_digest(expected, received.headers.get("X-Mailroom-Signature", ""))


def seed(dovecot: Any, user: tuple[str, str], count: int) -> None:
    dovecot.append_messages(
        *user,
        "INBOX",
        [
            message(f"Hook {i}", f"body {i}", sender="a@example.test", to="b@example.test")
            for i in range(count)
        ],
    )


def test_signed_deliveries_retry_after_a_500_and_stay_with_their_tenant(
    kit, other_kit, account, dovecot, mailbox_user, receiver
) -> None:
    ours, theirs = f"/ours-{uuid.uuid4().hex[:8]}", f"/theirs-{uuid.uuid4().hex[:8]}"
    receiver.fail_first[(ours, "task.succeeded")] = 1
    created = kit.admin.post(
        "/api/webhooks", json={"url": receiver.url(ours), "events": ["task.succeeded", "message.new"]}
    )
    assert created.status_code == 201, created.get_json()
    hook = created.get_json()
    secret = hook["secret"]
    assert (
        secret.startswith("whsec_")
        and "secret" not in kit.admin.get(f"/api/webhooks/{hook['id']}").get_json()
    )
    other = other_kit.admin.post("/api/webhooks", json={"url": receiver.url(theirs), "events": ALL_EVENTS})
    assert other.status_code == 201
    other_id = other.get_json()["id"]

    # Endpoints are the tenant's admins': a member is refused, another tenant finds nothing.
    assert (
        kit.member.post("/api/webhooks", json={"url": receiver.url(ours), "events": ALL_EVENTS}).status_code
        == 403
    )
    for method, path in [
        ("get", f"/api/webhooks/{other_id}"),
        ("get", f"/api/webhooks/{other_id}/deliveries"),
        ("patch", f"/api/webhooks/{other_id}"),
        ("delete", f"/api/webhooks/{other_id}"),
        ("post", f"/api/webhooks/{other_id}/deliveries/{uuid.uuid4()}/redeliver"),
    ]:
        response = getattr(kit.admin, method)(
            path, **({"json": {"enabled": False}} if method == "patch" else {})
        )
        assert response.status_code == 404 and error_of(response)["code"] == "not_found", (method, path)
    assert [h["id"] for h in kit.admin.get("/api/webhooks").get_json()["items"]] == [hook["id"]]

    seed(dovecot, mailbox_user, 3)
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/sync", json={}).get_json()["task_id"]
    assert kit.admin.wait_task(task_id)["state"] == "succeeded"

    def events_in() -> list[str]:
        return sorted(r.event for r in receiver.on(ours))

    # task.succeeded: a 500, then the retry's 200; message.new at once.
    receiver.wait(lambda: events_in() == ["message.new", "task.succeeded", "task.succeeded"])
    received = receiver.on(ours)
    assert all(verified(r, secret) for r in received)
    assert not verified(received[0], "whsec_wrong")
    bodies = {r.event: r.json() for r in received}
    assert bodies["task.succeeded"]["data"]["task_id"] == task_id
    assert bodies["message.new"]["data"] == {
        "task_id": task_id,
        "type": "sync",
        "account_id": account["id"],
        "new": 3,
        "folders": {"INBOX": 3},
    }
    retried = [r for r in received if r.event == "task.succeeded"]
    assert [r.status for r in retried] == [500, 200]
    assert retried[0].headers["X-Mailroom-Delivery"] == retried[1].headers["X-Mailroom-Delivery"]
    assert retried[0].body == retried[1].body

    page = kit.admin.get(f"/api/webhooks/{hook['id']}/deliveries").get_json()
    assert page["total"] == 2
    by_event = {d["event"]: d for d in page["items"]}
    done = by_event["task.succeeded"]
    assert done["state"] == "succeeded" and done["attempts"] == 2 and done["last_status_code"] == 200
    assert [a["status_code"] for a in done["recent_attempts"]] == [500, 200]
    assert done["recent_attempts"][0]["error"] and done["last_latency_ms"] >= 0
    assert done["payload"]["id"] == bodies["task.succeeded"]["id"]

    # A redelivery: the same event, freshly signed, recorded as one more attempt.
    new = by_event["message.new"]
    again = kit.admin.post(f"/api/webhooks/{hook['id']}/deliveries/{new['id']}/redeliver")
    assert again.status_code == 202, again.get_json()
    receiver.wait(lambda: events_in().count("message.new") == 2)
    copies = [r for r in receiver.on(ours) if r.event == "message.new"]
    assert copies[0].json()["id"] == copies[1].json()["id"] and verified(copies[1], secret)
    receiver.wait(
        lambda: (
            kit.admin.get(f"/api/webhooks/{hook['id']}/deliveries").get_json()["items"][0]["attempts"] >= 1
            and all(
                d["attempts"] == 2
                for d in kit.admin.get(f"/api/webhooks/{hook['id']}/deliveries").get_json()["items"]
            )
        )
    )

    # Now only deletes: a delete of one message reports its id.
    patched = kit.admin.patch(f"/api/webhooks/{hook['id']}", json={"events": ["message.deleted"]})
    assert patched.status_code == 200 and patched.get_json()["events"] == ["message.deleted"]
    doomed = kit.admin.get(f"/api/accounts/{account['id']}/messages?limit=1").get_json()["items"][0]["id"]
    deleting = kit.admin.post(f"/api/accounts/{account['id']}/delete", json={"message_ids": [doomed]})
    assert kit.admin.wait_task(deleting.get_json()["task_id"])["state"] == "succeeded"
    receiver.wait(lambda: "message.deleted" in events_in())
    (deleted,) = [r for r in receiver.on(ours) if r.event == "message.deleted"]
    assert verified(deleted, secret)
    assert deleted.json()["data"]["message_ids"] == [doomed] and deleted.json()["data"]["count"] == 1
    assert events_in().count("task.succeeded") == 2  # the delete's own success was not wanted

    # The other tenant's endpoint wants every event, and saw none of this tenant's.
    assert receiver.on(theirs) == []
    assert other_kit.admin.get(f"/api/webhooks/{other_id}/deliveries").get_json()["total"] == 0

    # Disabled: no more deliveries are recorded; deleted: gone.
    assert (
        kit.admin.patch(f"/api/webhooks/{hook['id']}", json={"enabled": False}).get_json()["enabled"] is False
    )
    assert kit.admin.delete(f"/api/webhooks/{hook['id']}").status_code == 204
    assert kit.admin.get(f"/api/webhooks/{hook['id']}").status_code == 404


def test_failed_tasks_report_task_failed_and_account_error(kit, account, receiver) -> None:
    path = f"/fail-{uuid.uuid4().hex[:8]}"
    secret = kit.admin.post(
        "/api/webhooks", json={"url": receiver.url(path), "events": ["task.failed", "account.error"]}
    ).get_json()["secret"]
    # A wrong IMAP password: the verify fails at once (a permanent error).
    imap = {**account["imap"], "password": "wrong"}
    assert kit.admin.patch(f"/api/accounts/{account['id']}", json={"imap": imap}).status_code == 200
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    failed = kit.admin.wait_task(task_id)
    assert failed["state"] == "failed"
    receiver.wait(lambda: sorted(r.event for r in receiver.on(path)) == ["account.error", "task.failed"])
    for received in receiver.on(path):
        assert verified(received, secret)
        data = received.json()["data"]
        assert data["task_id"] == task_id and data["error"]["code"] == failed["error"]["code"]
        # Times in the one form of every API time: UTC, ending in Z.
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", received.json()["created_at"])


def test_private_targets_are_refused_unless_allowed(
    app, kit, base_values, settings, sessions, receiver
) -> None:
    from mailroom.app import create_app

    strict_values = {**base_values, "allow_private_hosts": "false"}
    strict = Api(create_app(load_settings(**strict_values)), kit.admin_key)
    for url in (receiver.url("/x"), "http://10.1.2.3/hook", "http://localhost:8080/", "https://192.168.0.1/"):
        response = strict.post("/api/webhooks", json={"url": url, "events": ["task.failed"]})
        assert response.status_code == 422, (url, response.get_json())
        assert fields_of(error_of(response)["details"]) == ["url"]
    assert strict.get("/api/webhooks").get_json()["total"] == 0
    # Plain http to a public host is refused even where private hosts are allowed.
    public = kit.admin.post(
        "/api/webhooks", json={"url": "http://93.184.215.14/hook", "events": ["task.failed"]}
    )
    assert public.status_code == 422 and "tls" in error_of(public)["message"]
    for bad in (
        {"url": receiver.url("/x"), "events": ["message.read"]},
        {"url": receiver.url("/x"), "events": []},
        {"url": "ftp://127.0.0.1/x", "events": ["task.failed"]},
        {"url": "http://user:pw@127.0.0.1/x", "events": ["task.failed"]},
        {"url": receiver.url("/x"), "events": ["task.failed"], "secret": "mine"},
    ):
        response = kit.admin.post("/api/webhooks", json=bad)
        assert response.status_code == 422 and error_of(response)["code"] == "validation_error", bad
    assert kit.admin.get("/api/webhooks").get_json()["total"] == 0

    # An endpoint that was allowed, delivered by a worker whose policy refuses private
    # hosts (the service a worker runs, with that worker's settings): nothing is sent.
    path = f"/private-{uuid.uuid4().hex[:8]}"
    box = SecretBox(settings.encryption_keys())
    bound = tenant_sessions(sessions, kit.tenant_id)
    with transaction(bound) as session:
        endpoint, _ = webhooks.create_endpoint(
            session,
            tenant_id=kit.tenant_id,
            user_id=kit.admin_id,
            url=receiver.url(path),
            events=["task.failed"],
            description="",
            enabled=True,
            box=box,
            allow_private=True,
        )
        # Disabled for the workers, so only the calls below deliver it.
        endpoint.enabled = False
        delivery = WebhookDelivery(
            tenant_id=kit.tenant_id,
            endpoint_id=endpoint.id,
            event="task.failed",
            event_id=str(uuid.uuid4()),
            payload=json.dumps({"id": "x", "type": "task.failed", "data": {}}),
            state="pending",
            attempts=0,
            attempt_log=[],
        )
        session.add(delivery)
        session.flush()
        delivery_id, endpoint_id = delivery.id, endpoint.id
    with transaction(bound) as session:
        session.get(type(endpoint), endpoint_id).enabled = True  # type: ignore[union-attr]
    refusing = load_settings(**strict_values)
    outcome = webhooks.deliver(bound, delivery_id, box=box, settings=refusing)
    assert outcome.state == "failed" and outcome.retry_in is None
    with transaction(bound) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and row.attempts == 1 and row.last_status_code is None
        assert "private" in (row.last_error or "")
    assert receiver.on(path) == []
    # Allowed (the test stack's policy), the same delivery goes out.
    assert webhooks.deliver(bound, delivery_id, box=box, settings=settings, manual=True).state == "succeeded"
    assert len(receiver.on(path)) == 1
    with transaction(bound) as session:
        session.get(type(endpoint), endpoint_id).enabled = False  # type: ignore[union-attr]


def _signed(secret: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {
        "X-Mailroom-Timestamp": ts,
        "X-Mailroom-Signature": f"sha256={mac}",
        "Content-Type": "application/json",
    }


def test_inbound_hook_queues_a_sync_only_when_signed_fresh_and_new(
    app, kit, other_kit, account, sessions
) -> None:
    hook_url = f"/api/hooks/inbound/{account['id']}"
    anonymous = Api(app, None)

    def tasks_of_tenant() -> int:
        with sessions() as session:
            return (
                session.scalar(
                    select(func.count()).select_from(TaskRecord).where(TaskRecord.tenant_id == kit.tenant_id)
                )
                or 0
            )

    body = json.dumps({"folder": "INBOX"}).encode()
    # No secret yet: refused like any bad signature.
    no_secret = anonymous.post(hook_url, data=body, headers=_signed("whsec_none", body))
    assert no_secret.status_code == 401
    assert other_kit.admin.post(f"/api/accounts/{account['id']}/hook-secret").status_code == 404
    made = kit.admin.post(f"/api/accounts/{account['id']}/hook-secret")
    assert made.status_code == 201, made.get_json()
    secret = made.get_json()["secret"]
    assert made.get_json()["inbound_url"].endswith(hook_url)

    refusals = {
        "unsigned": anonymous.post(hook_url, data=body, headers={"Content-Type": "application/json"}),
        "bad signature": anonymous.post(hook_url, data=body, headers=_signed("whsec_wrong", body)),
        "other body": anonymous.post(hook_url, data=b'{"folder": "Junk"}', headers=_signed(secret, body)),
        "stale": anonymous.post(
            hook_url, data=body, headers=_signed(secret, body, timestamp=int(time.time()) - 400)
        ),
        "future": anonymous.post(
            hook_url, data=body, headers=_signed(secret, body, timestamp=int(time.time()) + 400)
        ),
        "unknown account": anonymous.post(
            f"/api/hooks/inbound/{uuid.uuid4()}", data=body, headers=_signed(secret, body)
        ),
        "not an id": anonymous.post("/api/hooks/inbound/nope", data=body, headers=_signed(secret, body)),
    }
    first = error_of(refusals["bad signature"])
    for name, response in refusals.items():
        assert response.status_code == 401 and error_of(response) == first, name
    assert tasks_of_tenant() == 0

    headers = _signed(secret, body)
    accepted = anonymous.post(hook_url, data=body, headers=headers)
    assert accepted.status_code == 202, accepted.get_json()
    task_id = accepted.get_json()["task_id"]
    task = kit.admin.wait_task(task_id)
    assert task["state"] == "succeeded" and task["type"] == "sync"
    assert task["origin"] == "hook" and task["params"] == {"folders": ["INBOX"]}
    # The same request again is a replay.
    replay = anonymous.post(hook_url, data=body, headers=headers)
    assert replay.status_code == 401 and error_of(replay) == first
    # An empty body syncs every folder.
    empty = anonymous.post(hook_url, data=b"", headers=_signed(secret, b""))
    assert empty.status_code == 202
    assert kit.admin.wait_task(empty.get_json()["task_id"])["params"] == {}
    assert tasks_of_tenant() == 2

    # A new secret replaces the old one; deleting it turns hooks off.
    newer = kit.admin.post(f"/api/accounts/{account['id']}/hook-secret").get_json()["secret"]
    fresh = json.dumps({"folder": "Sent"}).encode()
    assert anonymous.post(hook_url, data=fresh, headers=_signed(secret, fresh)).status_code == 401
    assert kit.admin.delete(f"/api/accounts/{account['id']}/hook-secret").status_code == 204
    assert anonymous.post(hook_url, data=fresh, headers=_signed(newer, fresh)).status_code == 401
    assert tasks_of_tenant() == 2


def _endpoint_with_deliveries(sessions, tenant_id: str, url: str, count: int, box: SecretBox) -> list[str]:
    """An endpoint of ``tenant_id`` and ``count`` deliveries for it, written directly (not
    published: only the calls of the test deliver them)."""
    with transaction(tenant_sessions(sessions, tenant_id)) as session:
        endpoint, _ = webhooks.create_endpoint(
            session,
            tenant_id=tenant_id,
            user_id=None,
            url=url,
            events=["message.spam"],
            description="",
            enabled=True,
            box=box,
            allow_private=True,
        )
        rows = [
            WebhookDelivery(
                tenant_id=tenant_id,
                endpoint_id=endpoint.id,
                event="message.spam",
                event_id=str(uuid.uuid4()),
                payload=json.dumps({"id": str(i), "type": "message.spam", "data": {}}),
                state="pending",
                attempts=0,
                attempt_log=[],
            )
            for i in range(count)
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def test_a_slow_endpoint_is_cut_at_the_timeout_and_then_left_alone(
    kit, other_kit, base_values, settings, sessions, receiver
) -> None:
    slow = f"/slow-{uuid.uuid4().hex[:8]}"
    fine = f"/fine-{uuid.uuid4().hex[:8]}"
    receiver.delays[slow] = 3.0
    short = load_settings(**{**base_values, "webhook_timeout_seconds": "0.5"})
    box = SecretBox(settings.encryption_keys())
    stuck = _endpoint_with_deliveries(sessions, kit.tenant_id, receiver.url(slow), 3, box)
    (theirs,) = _endpoint_with_deliveries(sessions, other_kit.tenant_id, receiver.url(fine), 1, box)
    ours, other = tenant_sessions(sessions, kit.tenant_id), tenant_sessions(sessions, other_kit.tenant_id)

    # The first delivery waits for the timeout, not for the endpoint's 3 s.
    first = webhooks.deliver(ours, stuck[0], box=box, settings=short)
    assert first.state == "retrying" and first.retry_in is not None
    # The next ones of that endpoint are not sent while it is down: no connection at all,
    # and they come back after the endpoint's window, not at the backoff's first step.
    later = [webhooks.deliver(ours, d, box=box, settings=short) for d in stuck[1:]]
    assert all(o.state == "retrying" and (o.retry_in or 0) >= webhooks.DOWN_SECONDS for o in later)
    assert len(receiver.on(slow)) == 1
    # Another tenant's endpoint is delivered meanwhile as usual.
    assert webhooks.deliver(other, theirs, box=box, settings=short).state == "succeeded"
    assert len(receiver.on(fine)) == 1
    with transaction(ours) as session:
        rows = [session.get(WebhookDelivery, d) for d in stuck]
        assert all(r is not None and r.attempts == 1 and r.state == "retrying" for r in rows)
        timed_out, *skipped = rows
        assert timed_out is not None and "timed out" in (timed_out.last_error or "").lower()
        # cut at the 0.5 s timeout: well below the 3 s the endpoint takes
        assert (timed_out.last_latency_ms or 0) < 3000 * 0.8
        assert all(
            r is not None and r.last_error == webhooks.NOT_SENT and r.last_latency_ms == 0 for r in skipped
        )


def test_a_spam_check_reports_the_spam_it_found() -> None:
    """The events of a finished spam check, from its record (the check itself is tested
    with real workers in tests/test_spam_task.py)."""
    record = TaskRecord(
        id=str(uuid.uuid4()),
        type="spam_check",
        account_id=str(uuid.uuid4()),
        state="succeeded",
        params={"message_ids": ["m1", "m2"]},
        result={
            "scored": 2,
            "spam": 1,
            "moved": 1,
            "messages": [{"id": "m1", "is_spam": True}, {"id": "m2", "is_spam": False}],
        },
    )
    events = dict(webhooks.task_events(record))
    assert set(events) == {"task.succeeded", "message.spam"}
    assert events["message.spam"]["spam"] == 1 and events["message.spam"]["message_ids"] == ["m1"]
    record.result = {**(record.result or {}), "spam": 0}
    assert [e for e, _ in webhooks.task_events(record)] == ["task.succeeded"]


def test_old_deliveries_are_forgotten(kit, settings, sessions, receiver) -> None:
    box = SecretBox(settings.encryption_keys())
    old, new = _endpoint_with_deliveries(sessions, kit.tenant_id, receiver.url("/old"), 2, box)
    with transaction(sessions) as session:
        session.get(WebhookDelivery, old).created_at = datetime.now(UTC) - timedelta(days=40)  # type: ignore[union-attr]
    with transaction(sessions) as session:
        assert webhooks.delete_old_deliveries(session, older_than=datetime.now(UTC) - timedelta(days=30)) >= 1
    with transaction(sessions) as session:
        assert session.get(WebhookDelivery, old) is None and session.get(WebhookDelivery, new) is not None


# --- the loose ends: rotation, the stale-task sweep, unpublished deliveries, real spam ------


def test_rotating_a_secret_signs_every_later_attempt_with_the_new_one_only(
    kit, other_kit, account, receiver
) -> None:
    path = f"/rotate-{uuid.uuid4().hex[:8]}"
    created = kit.admin.post("/api/webhooks", json={"url": receiver.url(path), "events": ["task.succeeded"]})
    hook_id, old = created.get_json()["id"], created.get_json()["secret"]
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    assert kit.admin.wait_task(task_id)["state"] == "succeeded"
    receiver.wait(lambda: len(receiver.on(path)) == 1)
    assert verified(receiver.on(path)[0], old)

    # Admins only; another tenant's endpoint is not found.
    assert kit.member.post(f"/api/webhooks/{hook_id}/secret").status_code == 403
    foreign = other_kit.admin.post(f"/api/webhooks/{hook_id}/secret")
    assert foreign.status_code == 404 and error_of(foreign)["code"] == "not_found"
    rotated = kit.admin.post(f"/api/webhooks/{hook_id}/secret")
    assert rotated.status_code == 200, rotated.get_json()
    new = rotated.get_json()["secret"]
    assert new.startswith("whsec_") and new != old and rotated.get_json()["id"] == hook_id
    assert "secret" not in kit.admin.get(f"/api/webhooks/{hook_id}").get_json()

    # The earlier event, sent again: signed with the new secret, no longer the old one.
    (delivery,) = kit.admin.get(f"/api/webhooks/{hook_id}/deliveries").get_json()["items"]
    assert kit.admin.post(f"/api/webhooks/{hook_id}/deliveries/{delivery['id']}/redeliver").status_code == 202
    receiver.wait(lambda: len(receiver.on(path)) == 2)
    again = receiver.on(path)[1]
    assert verified(again, new) and not verified(again, old)
    assert again.json()["id"] == receiver.on(path)[0].json()["id"]


def test_tasks_failed_by_the_stale_task_sweep_report_task_failed(
    kit, account, sessions, settings, receiver
) -> None:
    """The hourly cleanup fails a running record nobody reported on and a queued one no
    worker took: each reports task.failed (and account.error: they are verifies), signed."""
    from tasks.celery_app import make_celery

    path = f"/stale-{uuid.uuid4().hex[:8]}"
    secret = kit.admin.post(
        "/api/webhooks", json={"url": receiver.url(path), "events": ["task.failed", "account.error"]}
    ).get_json()["secret"]
    long_ago = datetime.now(UTC) - timedelta(days=3)
    with transaction(tenant_sessions(sessions, kit.tenant_id)) as session:
        rows = [
            TaskRecord(
                tenant_id=kit.tenant_id,
                account_id=account["id"],
                type="verify",
                queue="sync",
                params={},
                state=state,
                created_at=long_ago,
                updated_at=long_ago,
            )
            for state in ("running", "queued")
        ]
        session.add_all(rows)
        session.flush()
        stuck, lost = (r.id for r in rows)
    celery = make_celery(settings)
    summary = celery.send_task(
        "mailroom.cleanup_stale_results", queue="periodic", routing_key="periodic"
    ).get(timeout=60)
    assert summary["stuck_failed"] >= 1 and summary["undelivered_failed"] >= 1
    assert kit.admin.get(f"/api/tasks/{stuck}").get_json()["error"]["code"] == "stuck"
    receiver.wait(lambda: len(receiver.on(path)) == 4)
    seen = sorted((r.json()["data"]["task_id"], r.event) for r in receiver.on(path))
    assert seen == sorted(
        [(stuck, "task.failed"), (stuck, "account.error"), (lost, "task.failed"), (lost, "account.error")]
    )
    for received in receiver.on(path):
        assert verified(received, secret) and received.json()["data"]["error"]["code"] == "stuck"


def _pending_delivery(sessions, tenant_id: str, endpoint_id: str, age: timedelta) -> str:
    """A delivery recorded ``age`` ago and never published (its publish failed)."""
    at = datetime.now(UTC) - age
    with transaction(tenant_sessions(sessions, tenant_id)) as session:
        row = WebhookDelivery(
            tenant_id=tenant_id,
            endpoint_id=endpoint_id,
            event="task.succeeded",
            event_id=str(uuid.uuid4()),
            payload=json.dumps({"id": str(uuid.uuid4()), "type": "task.succeeded", "data": {}}),
            state="pending",
            attempts=0,
            attempt_log=[],
            created_at=at,
            updated_at=at,
        )
        session.add(row)
        session.flush()
        return row.id


@pytest.mark.slow
def test_deliveries_whose_publish_failed_are_published_by_the_sweep(
    kit, account, base_values, settings, sessions, receiver
) -> None:
    """A dispatch that finds the broker down fails its task, and the task.failed event it
    records cannot be published then; nor can one whose publisher died after the commit.
    Beat's sweep publishes both once the grace has passed, leaves a fresh one and one whose
    message waits in the broker alone, publishes each once however often it runs, and fails
    one a day old."""
    from services.errors import ServiceUnavailable
    from tasks.celery_app import make_celery
    from tasks.dispatch import dispatch
    from tasks.queues import WEBHOOK_TASK
    from tasks.webhook_tasks import sweep_unpublished
    from tests.servers.ports import free_port

    path = f"/unpublished-{uuid.uuid4().hex[:8]}"
    created = kit.admin.post(
        "/api/webhooks", json={"url": receiver.url(path), "events": ["task.succeeded", "task.failed"]}
    ).get_json()
    hook_id, secret = created["id"], created["secret"]

    # The broker unreachable at dispatch: 503 to the client, the task failed, its event pending.
    down = make_celery(load_settings(**{**base_values, "broker_url": f"redis://127.0.0.1:{free_port()}/0"}))
    refused = None
    with transaction(tenant_sessions(sessions, kit.tenant_id)) as session:
        try:
            dispatch(
                down,
                session,
                type="verify",
                tenant_id=kit.tenant_id,
                user_id=None,
                account_id=account["id"],
                params={},
                origin="api",
            )
        except ServiceUnavailable as exc:
            refused = exc
    assert refused is not None
    failed_task = refused.details["task_id"]  # type: ignore[index]
    assert kit.admin.get(f"/api/tasks/{failed_task}").get_json()["error"]["code"] == "dispatch_failed"
    with transaction(sessions) as session:
        (from_dispatch,) = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.endpoint_id == hook_id)
        ).all()
        assert from_dispatch.state == "pending" and from_dispatch.event == "task.failed"
        from_dispatch_id = from_dispatch.id
        # Minutes pass: past the sweep's grace.
        from_dispatch.created_at = from_dispatch.updated_at = datetime.now(UTC) - timedelta(minutes=10)

    lost = _pending_delivery(sessions, kit.tenant_id, hook_id, timedelta(minutes=10))
    fresh = _pending_delivery(sessions, kit.tenant_id, hook_id, timedelta(seconds=5))
    expired = _pending_delivery(sessions, kit.tenant_id, hook_id, timedelta(days=2))
    # One whose message is in the broker (held by the worker until its countdown): not lost.
    waiting = _pending_delivery(sessions, kit.tenant_id, hook_id, timedelta(minutes=10))
    celery = make_celery(settings)
    celery.send_task(
        WEBHOOK_TASK,
        task_id=waiting,
        kwargs={"tenant_id": kit.tenant_id, "delivery_id": waiting},
        queue="webhooks",
        routing_key="webhooks",
        countdown=2,
        ignore_result=True,
    )
    time.sleep(0.5)  # the worker has taken it (into the broker's unacked hash)

    first = sweep_unpublished(celery, sessions)
    assert first["expired"] >= 1 and first["republished"] >= 2
    receiver.wait(lambda: len(receiver.on(path)) == 3)  # from_dispatch, lost, then waiting's own
    second = sweep_unpublished(celery, sessions)

    def states() -> dict[str, str]:
        with transaction(sessions) as session:
            return {
                d: session.get(WebhookDelivery, d).state  # type: ignore[union-attr]
                for d in (from_dispatch_id, lost, fresh, expired, waiting)
            }

    receiver.wait(lambda: states()[waiting] == "succeeded")
    assert states() == {
        from_dispatch_id: "succeeded",
        lost: "succeeded",
        fresh: "pending",
        expired: "failed",
        waiting: "succeeded",
    }
    sent = receiver.on(path)
    assert sorted(r.headers["X-Mailroom-Delivery"] for r in sent) == sorted([from_dispatch_id, lost, waiting])
    assert all(verified(r, secret) for r in sent)
    by_id = {r.headers["X-Mailroom-Delivery"]: r for r in sent}
    assert by_id[from_dispatch_id].json()["data"]["task_id"] == failed_task
    assert second["republished"] == 0  # each was published once
    with transaction(sessions) as session:
        gone = session.get(WebhookDelivery, expired)
        assert gone is not None and gone.last_error == webhooks.NEVER_SENT and gone.attempts == 0


def test_a_real_spam_check_delivers_message_spam(kit, dovecot, smtp, mailbox_user, receiver) -> None:
    """A spam check on the real spam worker finds the block-listed sender's messages: one
    message.spam event with their count and ids, signed."""
    from tests.conftest import account_body

    path = f"/spam-{uuid.uuid4().hex[:8]}"
    secret = kit.admin.post(
        "/api/webhooks", json={"url": receiver.url(path), "events": ["message.spam"]}
    ).get_json()["secret"]
    assert kit.admin.patch("/api/spam/settings", json={"block": ["offers.example"]}).status_code == 200
    account_id = kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()[
        "id"
    ]
    dovecot.append_messages(
        *mailbox_user,
        "INBOX",
        [
            message(
                "Minutes",
                "The minutes of today's meeting.",
                sender="colleague@partner.example",
                to="b@x.test",
            ),
            message("Offer 1", "Our weekly newsletter.", sender="deals@news.offers.example", to="b@x.test"),
            message("Offer 2", "Our weekly newsletter.", sender="deals@news.offers.example", to="b@x.test"),
        ],
    )
    synced = kit.admin.post(f"/api/accounts/{account_id}/sync").get_json()["task_id"]
    assert kit.admin.wait_task(synced)["state"] == "succeeded"
    listed = kit.admin.get(f"/api/accounts/{account_id}/messages?limit=10").get_json()["items"]
    ids = {m["subject"]: m["id"] for m in listed}
    checked = kit.admin.post(
        f"/api/accounts/{account_id}/spam-check", json={"message_ids": list(ids.values())}
    )
    task_id = checked.get_json()["task_id"]
    task = kit.admin.wait_task(task_id)
    assert task["state"] == "succeeded" and task["result"]["spam"] == 2, task
    receiver.wait(lambda: len(receiver.on(path)) == 1)
    (received,) = receiver.on(path)
    assert received.event == "message.spam" and verified(received, secret)
    data = received.json()["data"]
    assert data["task_id"] == task_id and data["account_id"] == account_id and data["spam"] == 2
    assert sorted(data["message_ids"]) == sorted([ids["Offer 1"], ids["Offer 2"]])


def test_the_sweep_and_the_cleanup_read_deliveries_through_their_indexes(sessions) -> None:
    """On PostgreSQL, the sweep's query (its 'pending' inline, so the partial index matches
    in any plan) and the cleanup's range delete use their indexes on a table shaped as in
    service: thousands of finished deliveries, a few pending, all analyzed. The rows and the
    statistics are this test's own (one transaction, rolled back), so what other tests left
    in the shared table and when autovacuum last ran do not decide the plan; sequential
    scans are off because even 3,000 rows fit in a few pages."""
    from sqlalchemy import delete as sql_delete
    from sqlalchemy import select as sql_select
    from sqlalchemy import text
    from sqlalchemy.dialects import postgresql

    from services.models import Tenant, WebhookEndpoint, utcnow

    now = utcnow()
    session = sessions()
    try:
        if session.get_bind().dialect.name != "postgresql":
            pytest.skip("PostgreSQL plans")
        tenant = Tenant(name="plans", slug="plans-" + uuid.uuid4().hex[:12])
        session.add(tenant)
        session.flush()
        endpoint = WebhookEndpoint(
            tenant_id=tenant.id, url="https://hooks.example.com/", events=["task.failed"], secret_enc=b"x"
        )
        session.add(endpoint)
        session.flush()
        session.execute(
            text(
                "INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event, event_id, payload,"
                " state, attempts, attempt_log, created_at, updated_at)"
                " SELECT gen_random_uuid()::text, :tenant, :endpoint, 'task.failed',"
                " gen_random_uuid()::text, '{}', CASE WHEN n % 500 = 0 THEN 'pending' ELSE 'succeeded' END,"
                " 1, '[]', :now - n * interval '1 minute', :now - n * interval '1 minute'"
                " FROM generate_series(1, 3000) AS n"
            ),
            {"tenant": tenant.id, "endpoint": endpoint.id, "now": now},
        )
        session.execute(text("ANALYZE webhook_deliveries"))
        session.execute(text("SET LOCAL enable_seqscan = off"))
        captured: list[str] = []

        def plan(statement: Any) -> str:
            compiled = statement.compile(dialect=postgresql.dialect())
            rows = (
                session.connection()
                .exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
                .scalars()
                .all()
            )
            captured.append("\n".join(rows))
            return captured[-1]

        sweep = (
            sql_select(WebhookDelivery.id)
            .where(
                WebhookDelivery.state == webhooks._PENDING,
                WebhookDelivery.created_at >= now - webhooks.RETRY_WINDOW,
                WebhookDelivery.created_at < now - webhooks.PUBLISH_GRACE,
            )
            .order_by(WebhookDelivery.created_at)
            .limit(webhooks.SWEEP_LIMIT)
        )
        assert "ix_webhook_deliveries_pending" in plan(sweep), captured
        cleanup = sql_delete(WebhookDelivery).where(WebhookDelivery.created_at < now - timedelta(days=30))
        assert "ix_webhook_deliveries_created_at" in plan(cleanup), captured
    finally:
        session.rollback()
        session.close()
