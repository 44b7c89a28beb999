"""Exactly once under SIGKILL: a send worker killed after the SMTP server accepted the
message (the outbox row says ``accepted``) and before the Sent copy was filed. The broker
hands the unacknowledged message to the next worker, which must not send again and must
file exactly one copy."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from services.models import OutboxEntry
from tests.conftest import account_body, env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api
from tests.test_send import delivered, sent_copies


class HoldingProxy:
    """A TCP proxy to ``target`` that, while held, accepts connections but forwards nothing
    until released: an IMAP client connecting through it waits for the greeting."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self.open.clear()

    def release(self) -> None:
        self.open.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.open.wait()
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        self._sockets += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
        for s in self._sockets:
            s.close()


def _state(sessions, outbox_id: str) -> str:
    with sessions() as session:
        return session.scalar(select(OutboxEntry.state).where(OutboxEntry.id == outbox_id)) or ""


@pytest.mark.slow
def test_send_worker_killed_after_the_server_accepted_sends_once_and_files_one_copy(
    kit, dovecot, smtp, mailbox_user, sessions, base_values: dict[str, Any]
) -> None:
    from mailroom.app import create_app
    from services.settings import load_settings

    proxy = HoldingProxy(("127.0.0.1", dovecot.port))
    broker = RedisServer()
    broker.start()
    values = {
        **base_values,
        "broker_url": broker.url,
        "task_soft_time_limit": "10",
        "task_hard_time_limit": "12",
        "broker_visibility_timeout": "20",
    }
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    body = account_body(dovecot, smtp, mailbox_user)
    body["imap"]["port"] = proxy.port
    account = api.post("/api/accounts", json=body).get_json()
    env = worker_env(env_for(values))
    sync_worker = CeleryWorker(["sync"], env=env, name=f"sync-{uuid.uuid4().hex[:6]}")
    first = CeleryWorker(["send"], env=env, name=f"doomed-{uuid.uuid4().hex[:6]}")
    second: CeleryWorker | None = None
    try:
        sync_worker.start()
        first.start()
        task = api.wait_task(api.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"])
        assert task["state"] == "succeeded", task

        proxy.hold()  # the worker will hang connecting to IMAP, right after "accepted"
        subject = "Once " + uuid.uuid4().hex[:6]
        sent = api.post(
            f"/api/accounts/{account['id']}/send",
            json={"to": ["a@example.test"], "subject": subject, "text": "x"},
        ).get_json()
        deadline = time.monotonic() + 30
        while _state(sessions, sent["outbox_id"]) != "accepted":
            assert time.monotonic() < deadline, _state(sessions, sent["outbox_id"])
            time.sleep(0.01)
        first.kill()
        assert first.processes() == []
        assert len(delivered(smtp, sent["message_id"])) == 1
        assert sent_copies(dovecot, mailbox_user, sent["message_id"]) == []
        proxy.release()

        # Kombu restores unacknowledged messages older than the visibility timeout when a
        # worker starts consuming, then only every ~100 s: start the heir once it has passed.
        time.sleep(21)
        second = CeleryWorker(["send"], env=env, name=f"heir-{uuid.uuid4().hex[:6]}")
        second.start()
        try:
            task = api.wait_task(sent["task_id"], timeout=60)
        except AssertionError:
            raise AssertionError(second.log_text()[-4000:]) from None
        assert task["state"] == "succeeded" and task["attempts"] == 2, (task, second.log_text()[-3000:])
        assert len(delivered(smtp, sent["message_id"])) == 1  # never sent again
        [(copy, flags)] = sent_copies(dovecot, mailbox_user, sent["message_id"])
        assert copy == delivered(smtp, sent["message_id"])[0]["data"] and b"\\Seen" in flags
        assert task["result"]["sent_copy"]["message_id"] is not None
        listed = api.get(f"/api/accounts/{account['id']}/messages?folder=Sent").get_json()["items"]
        assert [m["id"] for m in listed if m["subject"] == subject] == [
            task["result"]["sent_copy"]["message_id"]
        ]
    finally:
        proxy.release()
        for worker in (first, second, sync_worker):
            if worker is not None:
                worker.stop()
        broker.stop()
        proxy.close()
