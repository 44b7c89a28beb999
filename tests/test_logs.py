"""Logs: JSON lines with the task's context from every worker, and no secret in the logs of
a real run (accounts added, verified, synced, mail sent, logins refused)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mailroom.app import create_app
from services.logs import log_context, make_handler
from services.settings import load_settings
from services.webhooks import sign
from tests.conftest import env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.smtp import SmtpServer
from tests.servers.workers import CeleryWorker
from tests.support import Api


def test_json_lines_carry_the_context_and_never_url_credentials() -> None:
    stream = io.StringIO()
    handler = make_handler("json")
    handler.setStream(stream)  # type: ignore[attr-defined]
    logger = logging.getLogger("mailroom.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with log_context(task_id="t-1", tenant_id="ten-1"), log_context(queue="sync", attempt=2):
            logger.info("cannot reach %s", "redis://:hunter2@db.internal:6379/0")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "cannot reach redis://***:***@db.internal:6379/0"
    assert (first["task_id"], first["tenant_id"], first["queue"], first["attempt"]) == (
        "t-1",
        "ten-1",
        "sync",
        2,
    )
    assert (
        first["level"] == "INFO"
        and first["logger"] == "mailroom.test.logs"
        and first["time"].endswith("+00:00")
    )
    assert "task_id" not in second and "hunter2" not in stream.getvalue()


@pytest.fixture
def logged_stack(
    base_values: dict[str, Any], tmp_path
) -> Iterator[tuple[dict[str, Any], list[CeleryWorker], SmtpServer]]:
    broker = RedisServer()
    broker.start()
    smtp = SmtpServer(require_auth=("mailer", "smtp-secret-" + uuid.uuid4().hex[:8]))
    smtp.start()
    values = {**base_values, "broker_url": broker.url, "log_format": "json", "log_level": "INFO"}
    env = worker_env(env_for(values))
    workers = [
        CeleryWorker([q], env=env, name=f"logs-{q}-{uuid.uuid4().hex[:6]}", log_dir=tmp_path)
        for q in ("sync", "send", "webhooks")
    ]
    for worker in workers:
        worker.start(wait_ready=False)
    for worker in workers:
        worker.wait_ready(90)
    try:
        yield values, workers, smtp
    finally:
        for worker in workers:
            worker.stop()
        smtp.stop()
        broker.stop()


class _Receiver:
    """A webhook endpoint: a real HTTP server on a free port that keeps what it is sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_no_secret_reaches_the_logs_of_a_real_run(kit, dovecot, mailbox_user, logged_stack, caplog) -> None:
    """... nor the task results, the API's answers (errors included), /metrics, or the
    webhook deliveries: with an outbound endpoint receiving the run's task events and a
    signed (and a wrongly signed) inbound hook, their secrets are scanned for too."""
    caplog.set_level(logging.DEBUG)
    values, workers, smtp = logged_stack
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    answers: list[bytes] = []  # every API answer the run got, errors included
    receiver = _Receiver()
    endpoint = api.post(
        "/api/webhooks", json={"url": receiver.url, "events": ["task.succeeded", "task.failed"]}
    )
    assert endpoint.status_code == 201, endpoint.get_json()
    webhook_secret = endpoint.get_json()["secret"]
    smtp_user, smtp_password = smtp.require_auth  # type: ignore[misc]
    wrong_imap, wrong_smtp = "imap-wrong-" + uuid.uuid4().hex[:8], "smtp-wrong-" + uuid.uuid4().hex[:8]

    def account(imap_password: str, smtp_pass: str) -> dict[str, Any]:
        body = {
            "email": f"{mailbox_user[0]}@example.test",
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.port,
                "tls": "none",
                "username": mailbox_user[0],
                "password": imap_password,
            },
            "smtp": {
                "host": "127.0.0.1",
                "port": smtp.port,
                "tls": "none",
                "username": smtp_user,
                "password": smtp_pass,
            },
        }
        created = api.post("/api/accounts", json=body)
        answers.append(created.data)
        assert created.status_code == 201, created.get_json()
        return created.get_json()  # type: ignore[no-any-return]

    def run(path: str, **kw: Any) -> dict[str, Any]:
        response = api.post(path, **kw)
        answers.append(response.data)
        assert response.status_code in (200, 202), response.get_json()
        return api.wait_task(response.get_json()["task_id"])

    dovecot.append_messages(*mailbox_user, "INBOX", [b"Subject: hello\r\nMessage-ID: <a@x>\r\n\r\nbody\r\n"])
    good = account(mailbox_user[1], smtp_password)
    assert run(f"/api/accounts/{good['id']}/verify")["state"] == "succeeded"
    assert run(f"/api/accounts/{good['id']}/sync")["state"] == "succeeded"
    mail = {"to": [{"email": "friend@example.test"}], "subject": "hi", "text": "hello", "save_sent": False}
    assert run(f"/api/accounts/{good['id']}/send", json=mail)["state"] == "succeeded"
    bad_imap = account(wrong_imap, smtp_password)
    assert run(f"/api/accounts/{bad_imap['id']}/verify")["error"]["code"] == "mail_auth_failed"
    bad_smtp = account(mailbox_user[1], wrong_smtp)
    assert run(f"/api/accounts/{bad_smtp['id']}/send", json=mail)["error"]["code"] == "mail_auth_failed"
    # The inbound hook: its secret signs one good request (a sync) and a wrong one (a 401).
    made = api.post(f"/api/accounts/{good['id']}/hook-secret")  # its one answer that shows it
    hook_secret, wrong_hook = made.get_json()["secret"], "whsec_wrong" + uuid.uuid4().hex
    payload, stamp = b'{"folder": "INBOX"}', str(int(time.time()))
    for key, status in ((wrong_hook, 401), (hook_secret, 202)):
        signed = api.client.post(
            f"/api/hooks/inbound/{good['id']}",
            data=payload,
            content_type="application/json",
            headers={"X-Mailroom-Timestamp": stamp, "X-Mailroom-Signature": sign(key, stamp, payload)},
        )
        answers.append(signed.data)
        assert signed.status_code == status, signed.get_json()
    assert api.wait_task(signed.get_json()["task_id"])["state"] == "succeeded"
    # Refused requests that carry a secret: a key one character off, a bad field beside a
    # password, a wrong metrics token.
    answers.append(
        api.client.get("/api/accounts", headers={"Authorization": f"Bearer {kit.admin_key}x"}).data
    )
    bad_port = {
        "imap": {"host": "127.0.0.1", "port": 0, "tls": "none", "username": "u", "password": wrong_imap}
    }
    answers.append(api.post("/api/accounts", json={"email": "x@example.test", **bad_port}).data)
    deadline = time.monotonic() + 30
    while len(receiver.bodies) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    receiver.close()
    assert len(receiver.bodies) >= 6, receiver.bodies  # one event per task of the run
    time.sleep(0.5)  # the last attempt's closing log line

    tasks = api.get("/api/tasks", query_string={"limit": 200}).get_json()["items"]
    answers += [api.get(f"/api/tasks/{t['id']}").data for t in tasks]
    answers.append(api.get(f"/api/webhooks/{endpoint.get_json()['id']}/deliveries").data)
    answers.append(api.client.get("/metrics").data)
    logs = caplog.text + "".join(worker.log_text() for worker in workers)
    seen = {
        "logs": logs,
        "API answers, task results and /metrics": b"".join(answers).decode("utf-8", "replace"),
        "webhook deliveries": b"".join(receiver.bodies).decode(),
    }
    secrets = [
        mailbox_user[1],
        smtp_password,
        wrong_imap,
        wrong_smtp,
        kit.admin_key,
        kit.member_key,
        values["secret_key"],
        webhook_secret,
        hook_secret,
        wrong_hook,
    ]
    for where, text in seen.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:4]}...) is in the {where}"
    assert len(tasks) == 6 and all(t["state"] in {"succeeded", "failed"} for t in tasks)
    # Every worker record is a JSON line, and each attempt's closing line names its task.
    ended = []
    for worker in workers[:2]:
        for line in worker.log_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record["message"].startswith("task attempt ended"):
                    ended.append(record)
    assert len(ended) == 6, ended
    for record in ended:
        assert record["tenant_id"] == kit.tenant_id and record["task_id"] and record["attempt"] == 1
        assert record["queue"] in {"sync", "send"} and record["duration_s"] >= 0
    assert {r["outcome"] for r in ended} == {"succeeded", "failed"}
