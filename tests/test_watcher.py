"""The watcher, for real: `mailroom watcher` subprocesses against the session's Dovecot,
PostgreSQL, Redis and sync worker. No Beat runs in the test session, so whatever reaches
the API got there because the watcher queued a sync."""

from __future__ import annotations

import asyncio
import itertools
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services.db import transaction
from services.mail.hosts import pin
from services.mail.imap import ImapEndpoint
from services.models import Account, TaskRecord, TaskState
from services.settings import Settings, load_settings
from services.tenant_slots import broker_redis
from services.watcher.imap import ImapConnection, encode_mailbox, parse_untagged, status_values
from services.watcher.shard import Registry, owner
from tasks.watcher import WatcherThread
from tests.conftest import ROOT, account_body, env_for, worker_env
from tests.servers.dovecot import DovecotServer
from tests.servers.mailgen import message
from tests.servers.smtp import SmtpServer
from tests.servers.watcher import WatcherProcess
from tests.servers.workers import CeleryWorker
from tests.services.test_hosts_tls import Pki, SniLog, TlsRelay, pki  # noqa: F401 - the fixture
from tests.support import TenantKit

#: Fast clocks, so a test sees a takeover within seconds.
FAST = {
    "watcher_reload_seconds": "0.5",
    "watcher_heartbeat_seconds": "0.5",
    "watcher_ttl_seconds": "2",
    "watcher_poll_seconds": "0.1",
    "watcher_status_seconds": "0.5",
    "watcher_backoff_max_seconds": "2",
}


@pytest.fixture
def start_watcher(
    base_values: dict[str, Any], kit: TenantKit, tmp_path: Any
) -> Iterator[Callable[..., WatcherProcess]]:
    """Starts watchers of a group of this test's own, watching only ``kit``'s tenant."""
    group = "t" + uuid.uuid4().hex[:8]
    started: list[WatcherProcess] = []

    def start(*, ready: bool = True, **overrides: str) -> WatcherProcess:
        values = {
            **base_values,
            **FAST,
            "watcher_group": group,
            "watcher_tenants": kit.tenant_id,
            **overrides,
        }
        watcher = WatcherProcess(worker_env(env_for(values)), cwd=str(ROOT), log_dir=str(tmp_path))
        started.append(watcher)
        return watcher.start(wait_ready=ready, timeout=60)

    yield start
    for watcher in started:
        watcher.stop(timeout=10)


def start_watching(
    start_watcher: Callable[..., WatcherProcess],
    account: dict[str, Any],
    *,
    mode: str = "",
    timeout: float = 30,
    **overrides: str,
) -> WatcherProcess:
    """A watcher of this test's group (``overrides`` its settings), once it logs that it
    watches ``account`` (in ``mode``, NOTIFY or IDLE, when given)."""
    watcher = start_watcher(**overrides)
    watching = rf"account {account['id']}: watching" + (rf" .*{mode}" if mode else "")
    watcher.wait_for_log(watching, timeout=timeout)
    return watcher


def wait_until(check: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}")


def listed(kit: TenantKit, account_id: str, folder: str) -> list[dict[str, Any]]:
    response = kit.admin.get(
        f"/api/accounts/{account_id}/messages", query_string={"folder": folder, "limit": 500}
    )
    if response.status_code == 404:  # the folder is not stored yet
        return []
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]  # type: ignore[no-any-return]


def make_message(subject: str) -> bytes:
    return message(subject, "hello", sender="bob@example.test", to="alice@example.test")


def user_of(account: dict[str, Any]) -> tuple[str, str]:
    name = account["imap"]["username"]
    return name, "pw-" + name


@pytest.mark.slow
@pytest.mark.parametrize("notify", ["true", "false"], ids=["notify", "idle_status"])
def test_append_flag_and_expunge_in_another_folder_reach_the_api(
    notify: str,
    kit: TenantKit,
    account: dict[str, Any],
    dovecot: DovecotServer,
    workers: dict[str, CeleryWorker],
    start_watcher: Callable[..., WatcherProcess],
) -> None:
    start_watching(
        start_watcher, account, mode="NOTIFY" if notify == "true" else "IDLE", watcher_notify=notify
    )
    user = user_of(account)
    (uid,) = dovecot.append_messages(*user, "Archive", [make_message(subject="pushed")])
    items = wait_until(lambda: listed(kit, account["id"], "Archive"), what="the appended message")
    assert [(m["uid"], m["subject"], m["flagged"]) for m in items] == [(uid, "pushed", False)]

    dovecot.set_flags(*user, "Archive", [uid], [b"\\Flagged"])
    wait_until(lambda: listed(kit, account["id"], "Archive")[0]["flagged"], what="the flag change")

    dovecot.expunge(*user, "Archive", [uid])
    wait_until(lambda: not listed(kit, account["id"], "Archive"), what="the expunge")


@pytest.mark.slow
@pytest.mark.parametrize("notify", ["true", "false"], ids=["notify", "idle_status"])
def test_a_message_another_client_moves_keeps_its_id(
    notify: str,
    kit: TenantKit,
    account: dict[str, Any],
    dovecot: DovecotServer,
    workers: dict[str, CeleryWorker],
    start_watcher: Callable[..., WatcherProcess],
) -> None:
    """The watcher queues a sync of the folder it hears about first; that sync sees one half
    of a move (the message gone from INBOX, or new in Archive) and goes on into the other
    folders, so the message keeps its id, in either direction."""
    user = user_of(account)
    dovecot.append_messages(*user, "INBOX", [make_message(subject="to be moved")])
    task = kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()
    kit.admin.wait_task(task["task_id"])
    (stored,) = listed(kit, account["id"], "INBOX")
    start_watching(
        start_watcher, account, mode="NOTIFY" if notify == "true" else "IDLE", watcher_notify=notify
    )
    for source, target in (("INBOX", "Archive"), ("Archive", "INBOX")):
        with dovecot.client(*user) as client:
            client.select_folder(source)
            client.move(client.search(["ALL"]), target)
        moved = wait_until(
            lambda source=source, target=target: (  # type: ignore[misc]
                not listed(kit, account["id"], source) and listed(kit, account["id"], target)
            ),
            what=f"the move to {target}",
        )
        assert [m["id"] for m in moved] == [stored["id"]], (target, moved)
        assert kit.admin.get(f"/api/messages/{stored['id']}").get_json()["folder"] == target


@pytest.mark.slow
def test_a_deleted_accounts_changes_are_dropped_quietly_until_the_reload(
    kit: TenantKit,
    account: dict[str, Any],
    dovecot: DovecotServer,
    workers: dict[str, CeleryWorker],
    start_watcher: Callable[..., WatcherProcess],
) -> None:
    """Between an account's deletion and the watcher's next reload its connection may still
    report changes: the sync it would queue cannot name the account, and the watcher says so
    in one line instead of logging the failed INSERT with its parameters at every poll."""
    watcher = start_watching(start_watcher, account, watcher_notify="true", watcher_reload_seconds="60")
    assert kit.admin.delete(f"/api/accounts/{account['id']}").status_code == 204
    for n in range(3):
        dovecot.append_messages(*user_of(account), "INBOX", [make_message(subject=f"late {n}")])
        time.sleep(0.3)
    watcher.wait_for_log(rf"account {account['id']} was deleted; it stops being watched", timeout=30)
    time.sleep(1)
    log = watcher.log_text()
    assert "IntegrityError" not in log and "INSERT" not in log, log[-2000:]
    assert log.count(f"account {account['id']} was deleted") == 1


@pytest.mark.slow
def test_a_killed_watchers_accounts_are_taken_over(
    kit: TenantKit,
    account: dict[str, Any],
    dovecot: DovecotServer,
    workers: dict[str, CeleryWorker],
    start_watcher: Callable[..., WatcherProcess],
    sessions: sessionmaker[Session],
) -> None:
    first = start_watching(start_watcher, account)
    # Killed once the sync it queues on connecting has reached a worker: a watcher killed
    # between that record's commit and its publish leaves a record without a message, which
    # the next watcher finds in flight and waits for until Beat's lost-message sweep
    # publishes it again (tests/test_faults.py); that is not the takeover tested here.
    started = select(TaskRecord.id).where(
        TaskRecord.account_id == account["id"], TaskRecord.origin == "watcher", TaskRecord.attempts > 0
    )

    def picked_up() -> bool:
        with transaction(sessions) as session:
            return session.scalar(started.limit(1)) is not None

    wait_until(picked_up, what="the first watcher's sync to reach a worker")
    first.kill()
    # The replacement sees the dead one's heartbeat until it is older than the TTL (2 s),
    # and takes its accounts at the next reload after that.
    start_watching(start_watcher, account, timeout=20)
    user = user_of(account)
    (uid,) = dovecot.append_messages(*user, "Sent", [make_message(subject="after the crash")])
    items = wait_until(lambda: listed(kit, account["id"], "Sent"), what="the message after the takeover")
    assert [m["uid"] for m in items] == [uid]


@pytest.mark.slow
def test_a_burst_keeps_one_sync_in_flight_and_ends_exact(
    kit: TenantKit,
    account: dict[str, Any],
    dovecot: DovecotServer,
    workers: dict[str, CeleryWorker],
    sessions: sessionmaker[Session],
    start_watcher: Callable[..., WatcherProcess],
) -> None:
    start_watching(start_watcher, account)
    user = user_of(account)
    folders = ["INBOX", "Archive", "Drafts", "Junk"]
    expected: dict[str, set[int]] = {f: set() for f in folders}
    for i in range(24):  # one APPEND each, spread over the folders, as fast as Dovecot takes them
        folder = folders[i % len(folders)]
        expected[folder].update(dovecot.append_messages(*user, folder, [make_message(subject=f"burst {i}")]))
    gone = sorted(expected["Archive"])[:2]
    dovecot.expunge(*user, "Archive", gone)
    expected["Archive"] -= set(gone)

    def exact() -> bool:
        return all({m["uid"] for m in listed(kit, account["id"], f)} == expected[f] for f in folders)

    wait_until(exact, timeout=40, what="every folder to match the server")
    with transaction(sessions) as session:
        syncs = session.execute(
            select(TaskRecord.started_at, TaskRecord.finished_at, TaskRecord.origin).where(
                TaskRecord.account_id == account["id"], TaskRecord.type == "sync"
            )
        ).all()
    assert syncs and {s.origin for s in syncs} == {"watcher"}
    ran = sorted((s.started_at, s.finished_at) for s in syncs if s.started_at is not None)
    for (_, end), (start, _) in itertools.pairwise(ran):
        assert end is not None and end <= start, "two syncs of one account overlapped"
    # Far fewer syncs than changes: changes during a sync wait for it and go in one more.
    assert len(syncs) < 26


def watched(watcher: WatcherProcess) -> list[str]:
    """The accounts whose connection ``watcher`` set up, in order (one line per connect)."""
    return re.findall(r"account (\S+): watching", watcher.log_text())


def watcher_id(watcher: WatcherProcess) -> str:
    found = re.search(r"watcher (\S+) started", watcher.log_text())
    assert found is not None
    return found.group(1)


def watcher_syncs(sessions: sessionmaker[Session], account_ids: list[str]) -> dict[str, list[str]]:
    """Each account's watcher-origin syncs (their states), oldest first."""
    with transaction(sessions) as session:
        rows = session.execute(
            select(TaskRecord.account_id, TaskRecord.state)
            .where(
                TaskRecord.account_id.in_(account_ids),
                TaskRecord.type == "sync",
                TaskRecord.origin == "watcher",
            )
            .order_by(TaskRecord.created_at)
        ).all()
    found: dict[str, list[str]] = {a: [] for a in account_ids}
    for account_id, state in rows:
        found[str(account_id)].append(str(getattr(state, "value", state)))
    return found


@pytest.mark.slow
def test_two_watchers_split_the_accounts_and_one_takes_over_when_the_other_dies(
    kit: TenantKit,
    dovecot: DovecotServer,
    smtp: SmtpServer,
    workers: dict[str, CeleryWorker],
    sessions: sessionmaker[Session],
    settings: Settings,
    start_watcher: Callable[..., WatcherProcess],
) -> None:
    # Both watchers see each other before the accounts exist, so each account is connected
    # once, by its owner, and never moves while both live.
    group = "t" + uuid.uuid4().hex[:8]
    first, second = (start_watcher(ready=False, watcher_group=group) for _ in range(2))
    first.wait_ready(timeout=60)
    second.wait_ready(timeout=60)
    ids = [watcher_id(first), watcher_id(second)]
    registry = Registry(broker_redis(settings), group, "test", float(FAST["watcher_ttl_seconds"]))
    wait_until(lambda: registry.live() == sorted(ids), timeout=10, what="both heartbeats")
    time.sleep(2 * float(FAST["watcher_reload_seconds"]) + 0.5)  # both have reloaded since
    users = []
    accounts: list[str] = []
    for _ in range(8):
        name = "u" + uuid.uuid4().hex[:10]
        dovecot.add_user(name, "pw-" + name)
        response = kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, (name, "pw-" + name)))
        assert response.status_code == 201, response.get_json()
        users.append((name, "pw-" + name))
        accounts.append(response.get_json()["id"])

    def split() -> bool:
        mine = {ids[0]: watched(first), ids[1]: watched(second)}
        return all(a in mine[str(owner(a, ids))] for a in accounts)

    wait_until(split, timeout=30, what="each account watched by its owner")

    # The connect-time syncs end; then one append per account is one more sync, queued once.
    def settled() -> dict[str, list[str]] | None:
        syncs = watcher_syncs(sessions, accounts)
        done = all(s and all(state in FINAL for state in s) for s in syncs.values())
        return syncs if done else None

    before = wait_until(settled, timeout=30, what="the connect-time syncs")
    time.sleep(1.0)  # a late duplicate would show up in the counts below
    before = wait_until(settled, timeout=30, what="the connect-time syncs")
    for watcher, watcher_name in ((first, ids[0]), (second, ids[1])):
        assert all(owner(a, ids) == watcher_name for a in watched(watcher)), "watched another's account"
    assert sorted(watched(first) + watched(second)) == sorted(accounts), "an account watched twice"
    uids = {
        a: dovecot.append_messages(*user, "Archive", [make_message(subject=f"split {i}")])
        for i, (a, user) in enumerate(zip(accounts, users, strict=True))
    }

    def appended() -> bool:
        return all([m["uid"] for m in listed(kit, a, "Archive")] == uids[a] for a in accounts)

    wait_until(appended, what="the append to each account")
    after = wait_until(settled, timeout=30, what="the append syncs")
    time.sleep(1.0)
    after = wait_until(settled, timeout=30, what="the append syncs")
    assert {a: len(after[a]) - len(before[a]) for a in accounts} == dict.fromkeys(accounts, 1)

    # The watcher with the most accounts dies; the other takes them after the TTL (2 s) at
    # its next reload (0.5 s), keeping its own connections.
    dying, survivor = (first, second) if len(watched(first)) >= len(watched(second)) else (second, first)
    kept = watched(survivor)
    orphans = [a for a in accounts if a not in kept]
    dying.kill()
    killed = time.monotonic()
    bound = float(FAST["watcher_ttl_seconds"]) + float(FAST["watcher_reload_seconds"])
    wait_until(
        lambda: all(a in watched(survivor) for a in orphans),
        timeout=bound * 5 + 10,
        what="the survivor to take the dead watcher's accounts",
    )
    took = time.monotonic() - killed
    assert took >= float(FAST["watcher_ttl_seconds"]) * 0.5  # not before the heartbeat aged
    assert sorted(watched(survivor)) == sorted(kept + orphans)  # its own were not reconnected
    a = orphans[0]
    user = users[accounts.index(a)]
    (uid,) = dovecot.append_messages(*user, "Sent", [make_message(subject="after the takeover")])
    wait_until(lambda: [m["uid"] for m in listed(kit, a, "Sent")] == [uid], what="the takeover's sync")


FINAL = {s.value for s in TaskState.final()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_watcher_tls_checks_the_name_on_the_pinned_connection(
    mode: str,
    pki: Pki,  # noqa: F811 - the fixture imported above
    dovecot: DovecotServer,
    mailbox_user: tuple[str, str],
) -> None:
    """The watcher's own asyncio IMAP client, through a TLS relay to the session's Dovecot:
    the certificate (which names only ``localhost``) is checked against the account's host
    name, sent as SNI, on the pinned address; the same server under another name is refused,
    and so is a certificate for another name."""
    context = pki.server_context("localhost")
    sni = SniLog(context)
    relay = TlsRelay(context, (dovecot.host, dovecot.port), starttls=mode == "starttls")
    elsewhere = TlsRelay(
        pki.server_context("mail.elsewhere.test"), (dovecot.host, dovecot.port), starttls=mode == "starttls"
    )

    async def session(name: str, port: int) -> tuple[str, frozenset[str]]:
        endpoint = ImapEndpoint(name, port, mode, *mailbox_user)
        conn = await ImapConnection.open(pin(name, port, ["127.0.0.1"]), endpoint, timeout=5)
        try:
            await conn.command("NOOP")  # logged in to Dovecot through the TLS layer
            peer = conn.writer.get_extra_info("peername")[0]
            assert conn.writer.get_extra_info("ssl_object") is not None
            return peer, conn.capabilities
        finally:
            conn.close()

    try:
        peer, capabilities = asyncio.run(session("localhost", relay.port))
        assert peer == "127.0.0.1"
        assert "IDLE" in capabilities and "LOGINDISABLED" not in capabilities  # Dovecot's, after login
        assert sni.names == ["localhost"]
        with pytest.raises(ssl.SSLCertVerificationError, match=r"pinned\.invalid"):
            asyncio.run(session("pinned.invalid", relay.port))
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(session("localhost", elsewhere.port))
    finally:
        relay.close()
        elsewhere.close()


@pytest.mark.slow
def test_the_watcher_loop_watches_over_tls_and_stops_at_a_certificate_for_another_name(
    pki: Pki,  # noqa: F811 - the fixture imported above
    base_values: dict[str, Any],
    kit: TenantKit,
    dovecot: DovecotServer,
    smtp: SmtpServer,
    workers: dict[str, CeleryWorker],
    sessions: sessionmaker[Session],
    mailbox_user: tuple[str, str],
) -> None:
    """The whole watch (host policy, pinning, TLS, login, IDLE or NOTIFY) of an ``ssl``
    account, on a watcher thread of this process (which trusts the test CA); the same
    account moved to a server whose certificate names another host is refused, and waits
    the longest backoff as the sync path gives up at once."""
    good = TlsRelay(pki.server_context("localhost"), (dovecot.host, dovecot.port))
    wrong = TlsRelay(pki.server_context("mail.elsewhere.test"), (dovecot.host, dovecot.port))
    imap = {"host": "localhost", "port": good.port, "tls": "ssl", "username": mailbox_user[0]}
    body = account_body(dovecot, smtp, mailbox_user)
    body["imap"] = {**imap, "password": mailbox_user[1]}
    response = kit.admin.post("/api/accounts", json=body)
    assert response.status_code == 201, response.get_json()
    account_id = response.get_json()["id"]
    group = "t" + uuid.uuid4().hex[:8]
    values = {**base_values, **FAST, "watcher_group": group, "watcher_tenants": kit.tenant_id}
    thread = WatcherThread(load_settings(**values))
    thread.start()
    try:
        watches = thread.watcher.watches

        def state() -> Any:
            watch = watches.get(account_id)
            return watch.state if watch is not None else None

        wait_until(lambda: state() is not None and state().mode, timeout=20, what="the TLS watch")
        assert state().connects == 1 and not state().last_error
        with transaction(sessions) as session:
            session.execute(update(Account).where(Account.id == account_id).values(imap_port=wrong.port))
        wait_until(
            lambda: state() is not None and "TLS certificate is not valid" in state().last_error,
            timeout=20,
            what="the certificate refused",
        )
        assert "'localhost'" in state().last_error, state().last_error  # the name it was checked against
        assert not state().mode and state().connects == 0  # a new watch (changed account), never logged in
    finally:
        thread.stop(timeout=10)
        good.close()
        wrong.close()


def test_rendezvous_hashing_moves_only_a_share_when_a_watcher_joins() -> None:
    accounts = [str(uuid.uuid4()) for _ in range(3000)]
    three = ["w1", "w2", "w3"]
    before = {a: owner(a, three) for a in accounts}
    after = {a: owner(a, [*three, "w4"]) for a in accounts}
    moved = [a for a in accounts if before[a] != after[a]]
    assert all(after[a] == "w4" for a in moved)  # nobody else's accounts move
    assert 0.15 < len(moved) / len(accounts) < 0.35  # about a quarter
    shares = {w: sum(1 for a in accounts if before[a] == w) for w in three}
    assert min(shares.values()) > 800
    without_w2 = {a: owner(a, ["w1", "w3"]) for a in accounts}
    assert all(without_w2[a] == before[a] for a in accounts if before[a] != "w2")


@pytest.mark.parametrize(
    ("line", "kind", "mailbox"),
    [
        ('STATUS "My Folder" (MESSAGES 2 UIDNEXT 3)', "STATUS", "My Folder"),
        ("STATUS Archive (UNSEEN 1 HIGHESTMODSEQ 4)", "STATUS", "Archive"),
        ('STATUS "Entw&APw-rfe" (MESSAGES 1)', "STATUS", "Entwürfe"),  # modified UTF-7
        ('STATUS "a \\"(b)\\"" (MESSAGES 1)', "STATUS", 'a "(b)"'),
        ('LIST (\\HasNoChildren) "/" "Projects/2024"', "LIST", "Projects/2024"),
        ('LIST () "/" New1', "LIST", "New1"),
        ("3 EXISTS", "EXISTS", None),
        ("7 FETCH (FLAGS (\\Seen) MODSEQ (12))", "FETCH", None),
    ],
)
def test_untagged_responses_name_their_folder(line: str, kind: str, mailbox: str | None) -> None:
    parsed = parse_untagged(line)
    assert (parsed.kind, parsed.mailbox) == (kind, mailbox)
    if kind == "STATUS":
        assert status_values(line)["MESSAGES" if "MESSAGES" in line else "UNSEEN"] >= 1
    assert encode_mailbox("Entwürfe") == '"Entw&APw-rfe"'
