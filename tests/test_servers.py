"""Smoke tests of the test-server layer (tests/servers): each server starts for real, does
one real operation, and stops without leaving a process behind."""

from __future__ import annotations

import asyncio
import email
import os
import socket
import time
from email import policy
from pathlib import Path

import aiosmtplib
import imapclient
import psycopg
import pytest
import redis
import sqlalchemy
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers.dovecot import DovecotServer, parse_rawlog_commands
from tests.servers.mailgen import message
from tests.servers.ports import free_port, port_is_open, wait_for_port
from tests.servers.postgres import PostgresServer
from tests.servers.processes import ServerStartError, process_alive
from tests.servers.redis import RedisServer
from tests.servers.smtp import SmtpServer
from tests.servers.workers import CeleryBeat, CeleryWorker


def processes_with_title(fragment: str) -> list[int]:
    """Live processes whose command line contains ``fragment`` (Dovecot's children are
    titled ``dovecot-INSTANCE/imap`` …)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fragment in cmdline and process_alive(int(entry)):
            found.append(int(entry))
    return found


def test_wait_for_port_times_out_with_the_address() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port} within 0.3s"):
        wait_for_port("127.0.0.1", port, timeout=0.3)
    assert time.monotonic() - started < 2


def test_postgres_create_database_connect_stop() -> None:
    server = PostgresServer()
    try:
        server.start()
        url = server.create_database("smoke")
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/smoke"
        engine = sqlalchemy.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE t (x int)"))
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (42)"))
            assert conn.execute(sqlalchemy.text("SELECT x FROM t")).scalar() == 42
            assert conn.execute(sqlalchemy.text("SHOW max_connections")).scalar() == "200"
            assert conn.execute(sqlalchemy.text("SHOW fsync")).scalar() == "off"
        # drop_database disconnects sessions still open (the engine's pool holds one).
        server.drop_database("smoke")
        engine.dispose()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.conninfo("smoke")).close()
        pid = server._postmaster_pid()
        assert pid is not None
    finally:
        server.stop()
        server.stop()  # a second stop is harmless
    assert not process_alive(pid) and not port_is_open("127.0.0.1", server.port)
    server.cleanup()
    assert not server.dir.exists()


def test_redis_ping_kill_restart() -> None:
    server = RedisServer(password="s3cr@t")
    try:
        server.start()
        assert server.url == f"redis://:s3cr%40t@127.0.0.1:{server.port}/0"
        # No retries: redis-py would otherwise retry the refused connection with backoff.
        client = redis.Redis.from_url(server.url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
        assert client.ping()
        client.set("k", "v")
        server.kill()
        assert server.processes() == []
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.restart()
        assert client.ping() and client.get("k") is None  # same port, data gone
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong", retry=Retry(NoBackoff(), 0)).ping()
    finally:
        server.cleanup()
    assert server.processes() == [] and not server.dir.exists()


def test_dovecot_users_seeding_and_inspection() -> None:
    server = DovecotServer()
    server.add_user("ann", "pw-ann")  # before start
    try:
        server.start()
        server.add_user("bob", "pw-bob")  # after start: the passwd-file is re-read
        with server.client("bob", "pw-bob") as client:
            folders = {name: flags for flags, _sep, name in client.list_folders()}
            assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= set(folders)
            assert b"\\Sent" in folders["Sent"] and b"\\Junk" in folders["Junk"]
            assert b"MULTIAPPEND" in client.capabilities()
        # More sessions of one user from one IP than Dovecot's default limit of 10.
        sessions = [server.client("bob", "pw-bob") for _ in range(15)]
        for session in sessions:
            session.logout()

        messages = [
            message(f"Message {i}", "Hello", sender="ann@example.test", to="bob@example.test", size_hint=4096)
            for i in range(1000)
        ]
        started = time.monotonic()
        uids = server.append_messages("bob", "pw-bob", "INBOX", messages)
        assert time.monotonic() - started < 5
        assert uids == list(range(1, 1001))
        assert server.uids("bob", "pw-bob", "INBOX") == uids

        server.create_folder("bob", "pw-bob", "Projects/2024")
        assert server.append_messages("bob", "pw-bob", "Projects/2024", messages[:3], flags=[b"\\Seen"]) == [
            1,
            2,
            3,
        ]
        server.set_flags("bob", "pw-bob", "Projects/2024", [1], [b"\\Flagged"])
        server.expunge("bob", "pw-bob", "Projects/2024", [2])
        with server.client("bob", "pw-bob") as client:
            client.select_folder("Projects/2024", readonly=True)
            flags = {uid: set(data[b"FLAGS"]) for uid, data in client.fetch([1, 3], ["FLAGS"]).items()}
        assert flags == {1: {b"\\Flagged"}, 3: {b"\\Seen"}}

        before = server.uidvalidity("bob", "pw-bob", "INBOX")
        server.set_uidvalidity("bob", "INBOX", before + 1000)
        assert server.uidvalidity("bob", "pw-bob", "INBOX") == before + 1000
        assert server.uids("bob", "pw-bob", "INBOX") == uids  # Dovecot keeps the UIDs

        server.delete_folder("bob", "pw-bob", "Projects/2024")
        with pytest.raises(imapclient.exceptions.LoginError):
            server.client("bob", "wrong")
    finally:
        server.cleanup()
    assert processes_with_title(server.instance) == []


def test_dovecot_one_unselectable_folder_answers_no() -> None:
    with DovecotServer() as server:
        server.add_user("eve", "pw")
        server.create_folder("eve", "pw", "Broken")
        server.append_messages("eve", "pw", "Broken", [b"Subject: x\r\n\r\nx\r\n"])
        server.append_messages("eve", "pw", "INBOX", [b"Subject: y\r\n\r\ny\r\n"])
        server.make_folder_unselectable("eve", "Broken")
        with server.client("eve", "pw") as client:
            with pytest.raises(imapclient.exceptions.IMAPClientError, match=r"SERVERBUG"):
                client.select_folder("Broken")
            assert client.select_folder("INBOX")[b"EXISTS"] == 1  # the others still work
            assert client.folder_status("Sent", ["MESSAGES"])[b"MESSAGES"] == 0
        server.make_folder_selectable("eve", "Broken")
        assert server.uids("eve", "pw", "Broken") == [1]


def test_dovecot_kill_restart_and_command_log() -> None:
    server = DovecotServer(rawlog=True)
    try:
        server.add_user("amy", "pw")
        server.start()
        server.append_messages("amy", "pw", "INBOX", [b"Subject: z\r\n\r\nz\r\n"] * 3)
        with server.client("amy", "pw") as client:
            mark = server.rawlog_mark("amy")
            client.select_folder("INBOX")
            client.fetch([1, 2, 3], ["FLAGS"])
            client.noop()
            counts = server.imap_command_counts("amy", since=mark)
            assert counts["SELECT"] == 1 and counts["UID FETCH"] == 1 and counts["NOOP"] == 1

            pid = server.pid
            assert pid is not None and len(server.processes()) > 1
            server.kill()  # mid-session, like a network fault
            assert server.processes() == [] and processes_with_title(server.instance) == []
            with pytest.raises((imapclient.exceptions.IMAPClientAbortError, OSError)):
                client.noop()
        server.restart()  # same port, same users and mail
        assert server.uids("amy", "pw", "INBOX") == [1, 2, 3]
        server.stop()
        assert not port_is_open(server.host, server.port)
        server.start()  # start after stop keeps everything too
        assert server.uids("amy", "pw", "INBOX") == [1, 2, 3]
    finally:
        server.cleanup()
    assert processes_with_title(server.instance) == [] and not server.dir.exists()


def test_rawlog_parser_counts_multiappend_as_one_command() -> None:
    raw = (
        b"1.000001 A1 SELECT INBOX\r\n"
        b"1.000002 A2 APPEND INBOX {12+}\r\n"
        b"1.000002 Subject: a\r\n"
        b"1.000003  {3+}\r\n"
        b"1.000003 x\r\n"
        b"1.000003 \r\n"
        b"1.000004 A3 IDLE\r\n"
        b"1.000005 DONE\r\n"
        b"1.000006 A4 UID FETCH 1:* (FLAGS)\r\n"
    )
    assert parse_rawlog_commands(raw) == [
        "SELECT INBOX",
        "APPEND INBOX {12+} {3+}",
        "IDLE",
        "UID FETCH 1:* (FLAGS)",
    ]


def test_smtp_auth_and_rejections() -> None:
    server = SmtpServer(require_auth=("mailer", "pw"), reject_with=(451, "4.7.1 Try again later"))
    sent = message("Hi", "Body", sender="ann@example.test", to="bob@example.test")

    async def send(**auth: str) -> object:
        return await aiosmtplib.send(
            sent,
            sender="ann@example.test",
            recipients=["bob@example.test"],
            hostname=server.host,
            port=server.port,
            start_tls=False,
            timeout=5,
            **auth,
        )

    try:
        server.start()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as no_auth:
            asyncio.run(send())
        assert no_auth.value.code == 530
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as bad_auth:
            asyncio.run(send(username="mailer", password="wrong"))
        assert bad_auth.value.code == 535

        with pytest.raises(aiosmtplib.SMTPDataError) as temporary:
            asyncio.run(send(username="mailer", password="pw"))
        assert temporary.value.code == 451
        server.set_reject(550, "5.1.1 No such user", stage="rcpt")
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            asyncio.run(send(username="mailer", password="pw"))
        assert refused.value.recipients[0].code == 550
        assert server.received() == []

        server.set_reject(451, "4.3.0 Busy", times=1)  # one failure, then accepted
        with pytest.raises(aiosmtplib.SMTPDataError):
            asyncio.run(send(username="mailer", password="pw"))
        asyncio.run(send(username="mailer", password="pw"))
        [received] = server.received()
        assert received["mail_from"] == "ann@example.test"
        assert received["rcpt_tos"] == ["bob@example.test"]
        assert received["data"] == sent and received["auth_user"] == "mailer"
        assert [a["reply"][:3] for a in server.attempts()] == ["451", "550", "451", "250"]
        pid = server.pid
    finally:
        server.stop()
        server.stop()
    assert pid is not None and not process_alive(pid)
    assert len(server.received()) == 1  # readable after stop, until cleanup
    server.cleanup()
    assert not server.dir.exists()


THROWAWAY_APP = """
import os
import time
from celery import Celery

app = Celery("throwaway", broker=os.environ["BROKER_URL"], backend=os.environ["BROKER_URL"])
app.conf.update(
    worker_hijack_root_logger=False,  # as tasks/celery_app.py sets it
    task_acks_late=True,
    beat_schedule={"tick": {"task": "tasks.celery_app.pid", "schedule": 0.5}},
)


@app.task
def pid():
    return os.getpid()


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds
"""


def test_celery_worker_and_beat(tmp_path: Path) -> None:
    """A real worker and beat, against a throwaway ``tasks.celery_app`` in tmp_path."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "celery_app.py").write_text(THROWAWAY_APP)
    broker = RedisServer().start()
    env = {"BROKER_URL": broker.url}
    worker = CeleryWorker(["sync", "send"], env=env, concurrency=2, name="smoke", cwd=tmp_path)
    beat = CeleryBeat(env=env, cwd=tmp_path)
    try:
        worker.start()
        assert worker.hostname == f"smoke@{socket.gethostname()}"
        assert len(worker.processes()) == 3  # main process + 2 pool children
        client = Celery(broker=broker.url, backend=broker.url)
        child_pid = client.send_task("tasks.celery_app.pid", queue="sync").get(timeout=10)
        assert child_pid in worker.processes()

        client.send_task("tasks.celery_app.sleep", args=[60], queue="send")
        worker.wait_for_log(r"Task tasks.celery_app.sleep\[.*\] received", timeout=10)
        worker.kill()  # the main process and its pool children, mid-task
        assert worker.processes() == [] and not process_alive(child_pid)

        beat.start()
        beat.wait_for_log("Sending due task tick", timeout=5)
        beat.stop()
        assert beat.processes() == []
        assert "ready." in worker.log_text() and "beat: Starting..." in beat.log_text()

        broken = CeleryWorker(["sync"], env=env, cwd=tmp_path, app="tasks.missing")
        with pytest.raises(ServerStartError, match="exited with code"):
            broken.start(timeout=20)
        broken.cleanup()
    finally:
        worker.cleanup()
        beat.cleanup()
        broker.cleanup()
    assert not worker.dir.exists() and not beat.dir.exists()


def test_mailgen_message_is_realistic() -> None:
    raw = message(
        "Grüße aus Köln",
        "Hallo Bob,\nanbei der Bericht.",
        sender="Ann Müller <ann@example.test>",
        to=["bob@example.test", "Cy <cy@example.test>"],
        message_id="<fixed@example.test>",
        size_hint=8000,
        attachment=("report.pdf", b"%PDF-1.4 fake"),
    )
    assert b"\n" not in raw.replace(b"\r\n", b"") and raw.isascii()
    assert 7900 <= len(raw) <= 8300
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert parsed["Subject"] == "Grüße aus Köln"
    assert parsed["From"].addresses[0].display_name == "Ann Müller"
    assert parsed["Message-ID"] == "<fixed@example.test>"
    body = parsed.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert body.startswith("Hallo Bob,\nanbei der Bericht.\n")
    [attachment] = parsed.iter_attachments()
    assert attachment.get_filename() == "report.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == b"%PDF-1.4 fake"
