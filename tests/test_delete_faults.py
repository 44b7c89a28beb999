"""Deletes that something stops half way, through the REST API and real delete workers:
the IMAP connection dropped in the middle, a cancel of a running large delete, and a
delete worker SIGKILLed after the server moved (or only copied) a batch and before its
rows were committed. Afterwards server and rows agree, and moved messages keep their ids.

The stop is made real by a TCP proxy in front of Dovecot that watches the commands going
to the server: at the chosen command it forwards the command and then holds the server's
answer (the worker waits in the middle of the command, as on a slow network), or drops
the connection."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from services.models import DeleteJournalEntry
from tests.conftest import account_body, env_for, worker_env
from tests.servers.dovecot import DovecotServer
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryWorker
from tests.support import Api
from tests.test_delete import WITHOUT_MOVE, assert_counts_exact, rows, seed, sync


class CommandGate:
    """A TCP proxy to ``target`` that watches client lines for ``verb`` (e.g.
    ``b" UID MOVE "``). At its ``nth`` occurrence it forwards the command, then either holds
    every answer of the server until :meth:`release` (``action="hold"``), or holds the
    answer, lets the server run the command, and closes both sides of that connection
    (``"drop_after"``); ``"drop_before"`` closes them without forwarding the command."""

    def __init__(self, target: tuple[str, int], verb: bytes, nth: int, action: str = "hold") -> None:
        self.target, self.verb, self.nth, self.action = target, verb, nth, action
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.seen = 0
        self.fired = threading.Event()
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        self.server.close()
        for s in self._sockets:
            _close(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client), daemon=True).start()

    def _to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    hit = not self.fired.is_set() and self.verb in data.upper()
                    if hit:
                        self.seen += 1
                        hit = self.seen == self.nth
                        if hit and self.action != "drop_before":
                            self._flowing.clear()  # the client never sees the answer
                if hit and self.action == "drop_before":
                    self.fired.set()
                    break
                upstream.sendall(data)
                if hit:
                    self.fired.set()
                    if self.action == "drop_after":
                        time.sleep(0.3)  # let the server run the command before it sees EOF
                        break
        except OSError:
            pass
        for s in (client, upstream):
            _close(s)
        if self.action == "drop_after" and self.fired.is_set():
            self._flowing.set()  # the next connection talks freely

    def _to_client(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                self._flowing.wait()
                client.sendall(data)
        except OSError:
            pass
        for s in (client, upstream):
            _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def journal_left(sessions: Any, account_id: str) -> int:
    with sessions() as session:
        return session.scalar(
            select(func.count())
            .select_from(DeleteJournalEntry)
            .where(DeleteJournalEntry.account_id == account_id)
        )


def make_account(api: Api, server: DovecotServer, smtp: Any, user: tuple[str, str], port: int) -> str:
    body = account_body(server, smtp, user)
    body["imap"]["port"] = port
    created = api.post("/api/accounts", json=body)
    assert created.status_code == 201, created.get_json()
    return created.get_json()["id"]  # type: ignore[no-any-return]


def assert_agree(sessions: Any, server: DovecotServer, user: tuple[str, str], account_id: str) -> None:
    """Rows and the server name the same UIDs in INBOX and Trash, counts are exact, the
    journal is empty, and a sync finds nothing to change."""
    stored = rows(sessions, account_id)
    for folder in ("INBOX", "Trash"):
        assert sorted(uid for name, uid in stored.values() if name == folder) == server.uids(*user, folder), (
            folder
        )
    assert_counts_exact(sessions, account_id)
    assert journal_left(sessions, account_id) == 0


def start_delete(api: Api, account_id: str, ids: list[str], **extra: Any) -> str:
    response = api.post(f"/api/accounts/{account_id}/delete", json={"message_ids": ids, **extra})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]  # type: ignore[no-any-return]


@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize(
    ("action", "permanent"), [("drop_after", False), ("drop_before", False), ("drop_after", True)]
)
def test_a_connection_dropped_between_batches_is_retried_and_rows_agree_with_the_server(
    kit, dovecot, smtp, mailbox_user, sessions, action, permanent
) -> None:
    verb = b" UID EXPUNGE " if permanent else b" UID MOVE "
    gate = CommandGate(("127.0.0.1", dovecot.port), verb, nth=2, action=action)
    try:
        account_id = make_account(kit.admin, dovecot, smtp, mailbox_user, gate.port)
        uids = seed(dovecot, mailbox_user, "INBOX", 1100)
        sync(kit.admin, account_id)
        inbox = folder_ids_all(kit.admin, account_id, "INBOX")
        chosen = [inbox[u] for u in uids[:1050]]  # three batches of 500, 500, 50

        task = kit.admin.wait_task(
            start_delete(kit.admin, account_id, chosen, permanent=permanent), timeout=90
        )
        assert gate.fired.is_set()
        assert task["state"] == "succeeded" and task["attempts"] == 2, (task["error"], task["attempts"])
        result = task["result"]
        if permanent:  # rows the first attempt deleted are gone for the second
            assert result["deleted"] + len(result["gone"]) == 1050 and result["moved"] == 0, result
            # The first attempt's first batch is committed; its second, expunged by the
            # server with its rows unwritten, is counted from the journal.
            assert result["deleted"] == 550 and result["gone"] == chosen[:500], result
        else:
            assert result["moved"] == 1050 and result["gone"] == [], result
        assert dovecot.uids(*mailbox_user, "INBOX") == uids[1050:]
        stored = rows(sessions, account_id)
        if permanent:
            assert dovecot.uids(*mailbox_user, "Trash") == [] and not set(chosen) & set(stored)
        else:  # every moved message kept its id, under its Trash UID
            assert {stored[i][0] for i in chosen} == {"Trash"}
            assert sorted(stored[i][1] for i in chosen) == dovecot.uids(*mailbox_user, "Trash")
        assert_agree(sessions, dovecot, mailbox_user, account_id)
        before = rows(sessions, account_id)
        sync(kit.admin, account_id)
        assert rows(sessions, account_id) == before
    finally:
        gate.close()


def folder_ids_all(api: Api, account_id: str, folder: str) -> dict[int, str]:
    """uid → id of every message of the folder, as the API lists them, page by page."""
    out: dict[int, str] = {}
    url = f"/api/accounts/{account_id}/messages?folder={folder}&limit=500"
    cursor = None
    while True:
        page = api.get(url + (f"&cursor={cursor}" if cursor else "")).get_json()
        out.update({m["uid"]: m["id"] for m in page["items"]})
        cursor = page.get("next_cursor")
        if not cursor:
            return out


@pytest.mark.usefixtures("workers")
def test_a_cancelled_large_delete_ends_cancelled_with_what_was_done_on_server_and_in_rows(
    kit, dovecot, smtp, mailbox_user, sessions
) -> None:
    gate = CommandGate(("127.0.0.1", dovecot.port), b" UID MOVE ", nth=2)
    try:
        account_id = make_account(kit.admin, dovecot, smtp, mailbox_user, gate.port)
        uids = seed(dovecot, mailbox_user, "INBOX", 2000)
        sync(kit.admin, account_id)
        inbox = folder_ids_all(kit.admin, account_id, "INBOX")
        chosen = [inbox[u] for u in uids]
        task_id = start_delete(kit.admin, account_id, chosen)
        assert gate.fired.wait(30)  # the second batch's MOVE is at the server; its answer waits

        response = kit.admin.post(f"/api/tasks/{task_id}/cancel")
        assert response.status_code == 202, response.get_json()
        gate.release()
        task = kit.admin.wait_task(task_id, timeout=60)
        assert task["state"] == "cancelled", task

        left = dovecot.uids(*mailbox_user, "INBOX")
        trash = dovecot.uids(*mailbox_user, "Trash")
        assert 0 < len(left) < 2000 and len(left) + len(trash) == 2000
        assert left == uids[2000 - len(left) :]  # whole batches, lowest UIDs first
        stored = rows(sessions, account_id)
        moved = [i for i in chosen if stored[i][0] == "Trash"]
        assert sorted(stored[i][1] for i in moved) == trash  # moved ones kept their ids
        assert sorted(stored[i][1] for i in chosen if stored[i][0] == "INBOX") == left
        assert_agree(sessions, dovecot, mailbox_user, account_id)
    finally:
        gate.close()


@pytest.mark.slow
@pytest.mark.parametrize("server_has_move", [True, False])
def test_a_delete_worker_killed_between_the_imap_command_and_its_rows_is_put_right_on_redelivery(
    kit, dovecot, smtp, mailbox_user, sessions, base_values: dict[str, Any], server_has_move: bool
) -> None:
    from mailroom.app import create_app
    from services.settings import load_settings

    server = dovecot if server_has_move else DovecotServer(imap_capability=WITHOUT_MOVE).start()
    user: tuple[str, str] = mailbox_user
    if not server_has_move:
        user = ("u" + uuid.uuid4().hex[:10], "pw-nomove")
        server.add_user(*user)
    # Without MOVE the batch is COPY, STORE, UID EXPUNGE: hold the answer to the COPY, so
    # the worker dies with the copies in Trash and the originals still in INBOX.
    verb = b" UID MOVE " if server_has_move else b" UID COPY "
    gate = CommandGate(("127.0.0.1", server.port), verb, nth=2)
    broker = RedisServer()
    broker.start()
    values = {
        **base_values,
        "broker_url": broker.url,
        "task_soft_time_limit": "8",
        "task_hard_time_limit": "10",
        "broker_visibility_timeout": "15",
    }
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    env = worker_env(env_for(values))
    sync_worker = CeleryWorker(["sync"], env=env, name=f"sync-{uuid.uuid4().hex[:6]}")
    first = CeleryWorker(["delete"], env=env, name=f"doomed-{uuid.uuid4().hex[:6]}")
    second: CeleryWorker | None = None
    try:
        sync_worker.start()
        first.start()
        account_id = make_account(api, server, smtp, user, gate.port)
        uids = seed(server, user, "INBOX", 1100)
        sync(api, account_id)
        inbox = folder_ids_all(api, account_id, "INBOX")
        chosen = [inbox[u] for u in uids[:1050]]
        task_id = start_delete(api, account_id, chosen)

        assert gate.fired.wait(30)
        # The server did the second batch (500 more left INBOX, or were copied to Trash);
        # the worker waits for the answer, its rows not written: kill it there.
        deadline = time.monotonic() + 10
        while len(server.uids(*user, "Trash")) < 1000:
            assert time.monotonic() < deadline, len(server.uids(*user, "Trash"))
            time.sleep(0.02)
        first.kill()
        assert first.processes() == []
        stored = rows(sessions, account_id)
        assert sum(1 for i in chosen if stored[i][0] == "INBOX") >= 550  # the gap was hit
        assert journal_left(sessions, account_id) == 1
        gate.release()

        # Kombu restores unacknowledged messages older than the visibility timeout when a
        # worker starts consuming: start the heir once it has passed.
        time.sleep(16)
        second = CeleryWorker(["delete"], env=env, name=f"heir-{uuid.uuid4().hex[:6]}")
        second.start()
        try:
            task = api.wait_task(task_id, timeout=60)
        except AssertionError:
            raise AssertionError(second.log_text()[-4000:]) from None
        assert task["state"] == "succeeded" and task["attempts"] == 2, (task, second.log_text()[-3000:])
        assert task["result"]["moved"] == 1050 and task["result"]["gone"] == [], task["result"]
        assert server.uids(*user, "INBOX") == uids[1050:]
        trash = server.uids(*user, "Trash")
        assert len(trash) == 1050  # never copied twice
        stored = rows(sessions, account_id)
        assert {stored[i][0] for i in chosen} == {"Trash"}
        assert sorted(stored[i][1] for i in chosen) == trash  # every id kept
        assert_agree(sessions, server, user, account_id)
        before = rows(sessions, account_id)
        sync(api, account_id)
        assert rows(sessions, account_id) == before
    finally:
        gate.close()
        for worker in (first, second, sync_worker):
            if worker is not None:
                worker.stop()
        broker.stop()
        if server is not dovecot:
            server.stop()
