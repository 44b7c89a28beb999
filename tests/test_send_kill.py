"""Exactly once under SIGKILL. A send worker killed after the SMTP server accepted the
message (the outbox row says ``accepted``) and before the Sent copy was filed: the broker
hands the unacknowledged message to the next worker, which must not send again and must
file exactly one copy. A worker killed inside the DATA window (the server took the message,
the row still says ``sending``): the heir does not send again where the server filed the
message in Sent, and elsewhere sends it once more, as deliver.py documents."""

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


class KillingSmtp:
    """A real aiosmtpd server (in this process) whose DATA handler, while ``armed``, files a
    copy in Sent itself for the senders in ``files_sent`` (an IMAP APPEND, as a server that
    files sent mail does), waits until ``expect`` messages are in, SIGKILLs ``victim``, and
    only then answers 250: the worker dies after the server took the message and before it
    could read the reply. Disarmed, it accepts and records like any server."""

    def __init__(self, dovecot, files_sent: dict[str, tuple[str, str]], expect: int) -> None:  # type: ignore[no-untyped-def]
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult

        from tests.servers.ports import free_port

        self.dovecot = dovecot
        self.files_sent = files_sent
        self.expect = expect
        self.victim: CeleryWorker | None = None
        self.armed = True
        self.killed = False
        self.received: list[tuple[str, bytes]] = []
        self._all_in: Any = None
        self._kill: Any = None
        self.port = free_port()
        self.controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            authenticator=lambda *args: AuthResult(success=True),
            auth_require_tls=False,
        )

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    def delivered(self, message_id: str) -> list[bytes]:
        return [data for _, data in self.received if f"Message-ID: {message_id}".encode() in data]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        data = bytes(envelope.original_content)
        self.received.append((envelope.mail_from, data))
        if not self.armed:
            return "250 OK"
        loop = asyncio.get_running_loop()
        if envelope.mail_from in self.files_sent:
            await loop.run_in_executor(None, self._file_in_sent, self.files_sent[envelope.mail_from], data)
        if self._all_in is None:
            self._all_in = asyncio.Event()
        if len(self.received) >= self.expect:
            self._all_in.set()
        try:
            await asyncio.wait_for(self._all_in.wait(), timeout=30)
        finally:
            # One kill, and every handler waits for it before it answers.
            if self._kill is None and self.victim is not None:
                self._kill = loop.run_in_executor(None, self._kill_victim)
            if self._kill is not None:
                await self._kill
        return "250 OK"

    def _kill_victim(self) -> None:
        assert self.victim is not None
        self.victim.kill()
        self.killed = True

    def _file_in_sent(self, user: tuple[str, str], data: bytes) -> None:
        with self.dovecot.client(*user) as client:
            client.append("Sent", data, flags=[b"\\Seen"])


@pytest.mark.slow
def test_send_worker_killed_before_it_read_the_reply_to_data(
    kit, dovecot, mailbox_user, sessions, base_values: dict[str, Any]
) -> None:
    """The windows a redelivery meets with its row still ``sending``: the server has the
    message, Mailroom has not recorded it. Where the server filed the message in Sent itself
    (the account's save_sent_copy off, or on) the heir finds it there and never sends again;
    where it did not, the heir sends a second time, exactly as deliver.py's comment on the
    remaining window says: the same bytes with the same Message-ID, and one Sent copy."""
    from mailroom.app import create_app
    from services.settings import load_settings

    mailboxes: dict[str, tuple[str, str]] = {}
    for name in ("server_files", "both_on", "plain"):
        login = "u" + uuid.uuid4().hex[:10]
        dovecot.add_user(login, "pw-" + login)
        mailboxes[name] = (login, "pw-" + login)
    addresses = {name: f"{user[0]}@example.test" for name, user in mailboxes.items()}
    smtp = KillingSmtp(
        dovecot,
        files_sent={
            addresses["server_files"]: mailboxes["server_files"],
            addresses["both_on"]: mailboxes["both_on"],
        },
        expect=3,
    )
    smtp.start()
    broker = RedisServer()
    broker.start()
    # Short limits, so the visibility timeout (which decides when the heir gets the
    # messages) may be short too: it must exceed the hard limit plus the longest retry delay.
    values = {
        **base_values,
        "broker_url": broker.url,
        "task_soft_time_limit": "8",
        "task_hard_time_limit": "10",
        "broker_visibility_timeout": "15",
    }
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    env = worker_env(env_for(values))
    doomed = CeleryWorker(["send"], env=env, concurrency=3, name=f"doomed-{uuid.uuid4().hex[:6]}")
    heir: CeleryWorker | None = None
    try:
        accounts = {}
        for name, user in mailboxes.items():
            body = account_body(dovecot, smtp, user, save_sent_copy=name != "server_files")  # type: ignore[arg-type]
            body["smtp"]["port"] = smtp.port
            created = api.post("/api/accounts", json=body)
            assert created.status_code == 201, created.get_json()
            accounts[name] = created.get_json()
        smtp.victim = doomed
        doomed.start()
        sent = {
            name: api.post(
                f"/api/accounts/{account['id']}/send",
                json={"to": ["a@example.test"], "subject": f"Window {name}", "text": name},
            ).get_json()
            for name, account in accounts.items()
        }
        deadline = time.monotonic() + 60
        while not (smtp.killed and doomed.processes() == []):
            assert time.monotonic() < deadline, (len(smtp.received), doomed.log_text()[-3000:])
            time.sleep(0.05)
        for name, item in sent.items():
            assert _state(sessions, item["outbox_id"]) == "sending", name
            assert len(smtp.delivered(item["message_id"])) == 1, name
        smtp.armed = False

        time.sleep(16)  # past the visibility timeout: the heir's start restores the messages
        heir = CeleryWorker(["send"], env=env, name=f"heir-{uuid.uuid4().hex[:6]}")
        heir.start()
        tasks = {}
        for name, item in sent.items():
            try:
                tasks[name] = api.wait_task(item["task_id"], timeout=60)
            except AssertionError:
                raise AssertionError(heir.log_text()[-4000:]) from None
            task = tasks[name]
            assert task["state"] == "succeeded" and task["attempts"] == 2, (name, task)
            assert task["result"]["state"] == "sent", (name, task)

        # The server filed the message: the heir found it in Sent and sent nothing again,
        # whether or not the account files copies itself, and filed no second copy.
        for name in ("server_files", "both_on"):
            item = sent[name]
            [arrived] = smtp.delivered(item["message_id"])
            [(copy, flags)] = sent_copies(dovecot, mailboxes[name], item["message_id"])
            assert copy == arrived and b"\\Seen" in flags
        assert tasks["server_files"]["result"]["sent_copy"] is None  # the account's own filing
        assert tasks["both_on"]["result"]["sent_copy"]["folder"] == "Sent"

        # The remaining window: nothing told the heir the server had the message, so it
        # was delivered once more, the same bytes under the same Message-ID; one Sent copy.
        item = sent["plain"]
        first, second = smtp.delivered(item["message_id"])
        assert first == second
        [(copy, flags)] = sent_copies(dovecot, mailboxes["plain"], item["message_id"])
        assert copy == first and b"\\Seen" in flags
    finally:
        for worker in (doomed, heir):
            if worker is not None:
                worker.stop()
        broker.stop()
        smtp.stop()
