"""The watcher, for real: `mailroom watcher` subprocesses against the session's Dovecot,
PostgreSQL, Redis and sync worker. No Beat runs in the test session, so whatever reaches
the API got there because the watcher queued a sync."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.db import transaction
from services.models import TaskRecord
from services.watcher.imap import encode_mailbox, parse_untagged, status_values
from services.watcher.shard import owner
from tests.conftest import ROOT, env_for, worker_env
from tests.servers.dovecot import DovecotServer
from tests.servers.mailgen import message
from tests.servers.watcher import WatcherProcess
from tests.servers.workers import CeleryWorker
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

    def start(**overrides: str) -> WatcherProcess:
        values = {
            **base_values,
            **FAST,
            "watcher_group": group,
            "watcher_tenants": kit.tenant_id,
            **overrides,
        }
        watcher = WatcherProcess(worker_env(env_for(values)), cwd=str(ROOT), log_dir=str(tmp_path))
        started.append(watcher)
        return watcher.start(timeout=60)

    yield start
    for watcher in started:
        watcher.stop(timeout=10)


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
    mode = "NOTIFY" if notify == "true" else "IDLE"
    watcher = start_watcher(watcher_notify=notify)
    watcher.wait_for_log(rf"account {account['id']}: watching .*{mode}", timeout=30)
    user = user_of(account)
    (uid,) = dovecot.append_messages(*user, "Archive", [make_message(subject="pushed")])
    items = wait_until(lambda: listed(kit, account["id"], "Archive"), what="the appended message")
    assert [(m["uid"], m["subject"], m["flagged"]) for m in items] == [(uid, "pushed", False)]

    dovecot.set_flags(*user, "Archive", [uid], [b"\\Flagged"])
    wait_until(lambda: listed(kit, account["id"], "Archive")[0]["flagged"], what="the flag change")

    dovecot.expunge(*user, "Archive", [uid])
    wait_until(lambda: not listed(kit, account["id"], "Archive"), what="the expunge")


@pytest.mark.slow
def test_a_killed_watchers_accounts_are_taken_over(
    kit: TenantKit,
    account: dict[str, Any],
    dovecot: DovecotServer,
    workers: dict[str, CeleryWorker],
    start_watcher: Callable[..., WatcherProcess],
) -> None:
    first = start_watcher()
    first.wait_for_log(rf"account {account['id']}: watching", timeout=30)
    first.kill()
    # The replacement sees the dead one's heartbeat until it is older than the TTL (2 s),
    # and takes its accounts at the next reload after that.
    second = start_watcher()
    second.wait_for_log(rf"account {account['id']}: watching", timeout=20)
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
    watcher = start_watcher()
    watcher.wait_for_log(rf"account {account['id']}: watching", timeout=30)
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
