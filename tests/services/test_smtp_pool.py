"""The send worker's SMTP connections under `mailroom run`, whose send worker runs its
tasks on 4 threads of one process (tasks/embedded.py) instead of one per prefork child."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.errors import MailError
from services.mail.hosts import pin
from services.mail.imap import ImapEndpoint
from services.mail.smtp import SmtpEndpoint, process_pool
from services.send import imap_pool
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp import SmtpServer

THREADS = 4
MESSAGES_PER_THREAD = 10


def test_threads_of_one_process_send_at_once(smtp: SmtpServer) -> None:
    """Each thread gets a pool of its own (its own event loop and connections): sends that
    run at the same time in one process all go out, none fails on another's event loop
    ("This event loop is already running") or interleaves commands on its connection."""
    endpoint = SmtpEndpoint("127.0.0.1", smtp.port, "none", "smtpuser", "smtppass")
    pinned = pin("127.0.0.1", smtp.port, ["127.0.0.1"])
    start = threading.Barrier(THREADS)
    run = uuid.uuid4().hex[:8]  # the server is shared with other tests: count only ours

    def send_some(thread: int) -> list[str]:
        pool = process_pool(30.0, 100)
        start.wait()
        replies = []
        for n in range(MESSAGES_PER_THREAD):
            raw = f"Subject: {run} {thread}-{n}\r\n\r\nbody\r\n".encode()
            outcome = pool.send(
                ("account", "smtp"),  # one account: all threads share its key
                pinned,
                endpoint,
                timeout=10,
                sender="a@example.test",
                recipients=["b@example.test"],
                raw=raw,
            )
            replies.append(outcome.reply)
        pool.close_all()
        return replies

    with ThreadPoolExecutor(THREADS) as threads:
        replies = [r for batch in threads.map(send_some, range(THREADS)) for r in batch]
    assert len(replies) == THREADS * MESSAGES_PER_THREAD
    first_lines = (m["data"].split(b"\r\n", 1)[0].decode() for m in smtp.received())
    subjects = sorted(line for line in first_lines if line.startswith(f"Subject: {run} "))
    expected = sorted(f"Subject: {run} {t}-{n}" for t in range(THREADS) for n in range(MESSAGES_PER_THREAD))
    assert subjects == expected


def test_a_fault_of_ours_is_not_blamed_on_the_server(smtp: SmtpServer) -> None:
    """An exception that is no SMTP or network fault (here a message that is not bytes, as a
    bug of ours would hand over) comes out as itself, so that the task ends ``internal_error``
    (tasks.lifecycle), not as a permanent ``mail_rejected`` that blames the server."""
    endpoint = SmtpEndpoint("127.0.0.1", smtp.port, "none", "smtpuser", "smtppass")
    pinned = pin("127.0.0.1", smtp.port, ["127.0.0.1"])
    pool = process_pool(30.0, 100)
    try:
        with pytest.raises(TypeError) as caught:
            pool.send(
                ("account", "bug"),
                pinned,
                endpoint,
                timeout=10,
                sender="a@example.test",
                recipients=["b@example.test"],
                raw=12345,  # type: ignore[arg-type]
            )
        assert not isinstance(caught.value, MailError)
    finally:
        pool.close_all()


def test_threads_of_one_process_share_the_imap_pool_without_sharing_a_connection(
    sync_dovecot: DovecotServer,
) -> None:
    """The Sent copies' IMAP pool: a connection is out of the pool while a thread uses it,
    so four threads filing copies for one account at once each get their own; every copy
    lands, and the pool keeps one connection for the account afterwards (the others are
    closed, not left open)."""
    user = ("u" + uuid.uuid4().hex[:10], "pw-imap-pool")
    sync_dovecot.add_user(*user)
    endpoint = ImapEndpoint("127.0.0.1", sync_dovecot.port, "none", *user)
    pool = imap_pool.ImapPool(idle_seconds=30.0, max_uses=100)
    start = threading.Barrier(THREADS)
    clients: dict[int, Any] = {}

    def file_some(thread: int) -> None:
        start.wait()
        for n in range(MESSAGES_PER_THREAD):
            with pool.session(("account",), endpoint, timeout=10, allow_private=True) as pooled:
                clients[id(pooled.client)] = pooled.client
                pooled.client.append("INBOX", f"Subject: {thread}-{n}\r\n\r\nbody\r\n".encode())

    with ThreadPoolExecutor(THREADS) as threads:
        list(threads.map(file_some, range(THREADS)))
    assert len(sync_dovecot.uids(*user, "INBOX")) == THREADS * MESSAGES_PER_THREAD
    assert len(clients) >= 2  # the threads did overlap: more than one connection was made
    assert len(pool._conns) == 1
    kept = pool._conns[("account",)].client
    kept.noop()  # the kept one still works, and every other one was logged out
    assert [c._imap.state for c in clients.values() if c is not kept] == ["LOGOUT"] * (len(clients) - 1)
    pool._drop(("account",))
