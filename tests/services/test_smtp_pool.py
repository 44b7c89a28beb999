"""The send worker's SMTP connections under `mailroom run`, whose send worker runs its
tasks on 4 threads of one process (tasks/embedded.py) instead of one per prefork child."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.errors import MailError
from services.mail.hosts import pin
from services.mail.smtp import SmtpEndpoint, process_pool
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
