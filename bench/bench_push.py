"""Push latency: from an IMAP APPEND to the message listed by the API, through the watcher,
beside the periodic-sync path in the same run; and the watcher's memory per watched account.

Private PostgreSQL, Redis and Dovecot (bench.environment), a real sync worker, and:

1. reference, the periodic path: Beat (periodic_sync every ``--tick`` s) and the periodic
   worker, accounts on the shortest sync_interval allowed (60 s), no watcher. One message
   is appended to each account at a random moment of a 60 s window; each is timed until
   ``GET /api/accounts/{id}/messages?folder=…`` lists it.
2. the watcher (Beat stopped): ``--appends`` APPENDs, one at a time, to a random folder of
   a random account, each timed the same way; NOTIFY, then the IDLE + STATUS path.
3. memory: a fresh watcher process per step watches 1, 100 and ``--accounts`` Dovecot
   users (no sync worker: the syncs each connect queues are left in the broker); its RSS
   less that of a watcher with no account, per account. The bench's Dovecot serves 100
   clients per imap process so that 1,000 connections do not mean 1,000 processes.

The API is the real Flask app (``create_app``) called in-process: the same route, query and
serialisation as over HTTP, without gunicorn's share of the machine.

Goal: watcher p50 < 1 s and p99 < 2 s on every folder.

    .venv/bin/python bench/bench_push.py [--appends 60] [--accounts 1000]
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "src")) if p not in sys.path]

import psutil  # noqa: E402
from sqlalchemy import update  # noqa: E402

from bench.environment import BenchEnvironment, fmt, percentile, print_table  # noqa: E402
from services import accounts, tenancy  # noqa: E402
from services.accounts import AccountInput  # noqa: E402
from services.crypto import SecretBox  # noqa: E402
from services.db import transaction  # noqa: E402
from services.models import Account  # noqa: E402
from services.tenancy import Principal  # noqa: E402
from tests.servers import mailgen  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.watcher import WatcherProcess  # noqa: E402
from tests.servers.workers import CeleryBeat, CeleryWorker  # noqa: E402

FOLDERS = ["INBOX", "Archive", "Sent", "Drafts", "Junk", "Trash"]
WATCHER: dict[str, Any] = {
    "watcher_reload_seconds": 1,
    "watcher_heartbeat_seconds": 1,
    "watcher_ttl_seconds": 5,
    "watcher_poll_seconds": 0.1,
    "watcher_status_seconds": 1,
}


class ManyClientsDovecot(DovecotServer):
    """The test Dovecot, with up to 100 clients per imap process (Dovecot's default of one
    process per connection would start a process per watched account)."""

    def _config(self) -> str:
        return (
            super()._config()
            + "service imap {\n  service_count = 0\n  client_limit = 100\n  process_limit = 64\n}\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=60, help="APPENDs timed per watcher mode")
    parser.add_argument("--users", type=int, default=4, help="accounts that receive the appends")
    parser.add_argument("--reference", type=int, default=10, help="appends timed on the periodic path")
    parser.add_argument("--tick", type=float, default=5.0, help="Beat's periodic_sync period (reference)")
    parser.add_argument("--accounts", type=int, default=1000, help="largest memory step")
    args = parser.parse_args()

    env = BenchEnvironment(periodic_sync_seconds=args.tick, **WATCHER)
    with env:
        dovecot = ManyClientsDovecot()
        env.add_cleanup(dovecot.cleanup)
        env.dovecot = dovecot
        bench = Bench(env, dovecot)
        users = bench.create_tenant_accounts(args.users)
        bench.start_worker("sync", 4)

        print("reference: the periodic path (Beat, sync_interval 60 s) …", flush=True)
        bench.sync_first(users)
        reference = bench.reference(users, args.reference)

        print(f"watcher, NOTIFY: {args.appends} appends …", flush=True)
        notify = bench.watcher_latency(users, args.appends, notify=True)
        print(f"watcher, IDLE + STATUS: {args.appends} appends …", flush=True)
        idle = bench.watcher_latency(users, args.appends, notify=False)

        rows = [
            latency_row("periodic sync (Beat, interval 60 s) — reference", reference),
            latency_row("watcher, NOTIFY", notify),
            latency_row("watcher, IDLE + STATUS (every 1 s)", idle),
        ]
        print_table(
            "APPEND → listed by GET /api/accounts/{id}/messages (seconds)",
            ["path", "n", "p50", "p99", "max"],
            rows,
        )
        for worker in bench.workers:
            worker.stop()
        bench.workers.clear()

        print("memory per watched account …", flush=True)
        print_table(
            "watcher RSS (the first connection also opens the database pool and the broker connection)",
            [
                "accounts watched",
                "RSS MiB",
                "KiB per account over baseline",
                "KiB per account over previous step",
            ],
            bench.memory(args.accounts),
        )
        goal = percentile(notify, 50) < 1 and percentile(notify, 99) < 2
        print(f"goal (NOTIFY p50 < 1 s, p99 < 2 s): {'met' if goal else 'NOT met'}")


def latency_row(name: str, values: list[float]) -> list[str]:
    return [name, str(len(values)), fmt(percentile(values, 50), 2), fmt(percentile(values, 99), 2),
            fmt(max(values), 2)]  # fmt: skip


class Bench:
    def __init__(self, env: BenchEnvironment, dovecot: ManyClientsDovecot) -> None:
        from mailroom.app import create_app

        self.env, self.dovecot = env, dovecot
        self.sessions = env.sessions()
        self.app = create_app(env.settings)
        logging.getLogger("mailroom.access").setLevel(logging.WARNING)  # a line per poll otherwise
        self.client = self.app.test_client()
        self.workers: list[CeleryWorker] = []
        self.tenants: list[tuple[str, str]] = []  # (tenant id, API key)
        self.key_of: dict[str, str] = {}  # account id -> API key

    # -- set-up ----------------------------------------------------------------------

    def create_tenant_accounts(self, count: int) -> list[tuple[str, str, str]]:
        """A tenant with ``count`` accounts on new Dovecot users; (account id, user, password)."""
        box = SecretBox(self.env.settings.encryption_keys())
        if self.dovecot.is_running():
            self.dovecot.stop()  # users added while it runs wait for auth to re-read the file
        created: list[tuple[str, str, str]] = []
        with transaction(self.sessions) as session:
            tag = uuid.uuid4().hex[:10]
            tenant = tenancy.create_tenant(session, name=f"Push {tag}", slug=f"push-{tag}")
            admin = tenancy.create_user(session, tenant_id=tenant.id, email=f"admin@{tag}.test", role="admin")
            _, key = tenancy.create_api_key(session, admin, name="bench")
            principal = Principal(tenant_id=tenant.id, user_id=admin.id, role=admin.role)
            for _ in range(count):
                user = f"p{uuid.uuid4().hex[:12]}"
                self.dovecot.add_user(user, f"pw-{user}")
                login = {"host": "127.0.0.1", "tls": "none", "username": user, "password": f"pw-{user}"}
                account = accounts.create_account(
                    session,
                    principal,
                    AccountInput(
                        email=f"{user}@example.test",
                        imap={**login, "port": self.dovecot.port},
                        smtp={**login, "port": 9},
                        sync_interval=60,
                    ),
                    box,
                    allow_private=True,
                )
                created.append((account.id, user, f"pw-{user}"))
                self.key_of[account.id] = key
        self.tenants.append((tenant.id, key))
        self.dovecot.start()
        return created

    def start_worker(self, queue: str, concurrency: int) -> CeleryWorker:
        worker = CeleryWorker(
            [queue], env=self.env.subprocess_env(), concurrency=concurrency, name=queue, cwd=ROOT
        )
        self.env.add_cleanup(worker.cleanup)
        worker.start(timeout=120)
        self.workers.append(worker)
        return worker

    def sync_first(self, users: list[tuple[str, str, str]]) -> None:
        """Every folder exists and is stored, and every account counts as just synced."""
        watcher = self.start_watcher(notify=True)  # its first connect syncs each account whole
        for account_id, _, _ in users:
            watcher.wait_for_log(rf"account {account_id}: watching", timeout=60)
        time.sleep(3)
        watcher.stop()

    def start_watcher(self, *, notify: bool, tenants: list[str] | None = None) -> WatcherProcess:
        env = self.env.subprocess_env()
        env["MAILROOM_WATCHER_NOTIFY"] = "true" if notify else "false"
        env["MAILROOM_WATCHER_GROUP"] = "g" + uuid.uuid4().hex[:8]
        env["MAILROOM_WATCHER_TENANTS"] = ",".join(
            tenants if tenants is not None else [t for t, _ in self.tenants]
        )
        env["MAILROOM_LOG_LEVEL"] = "INFO"
        watcher = WatcherProcess(env, cwd=str(ROOT))
        self.env.add_cleanup(watcher.cleanup)
        watcher.start(timeout=60)
        return watcher

    # -- latency ---------------------------------------------------------------------

    def listed(self, account_id: str, folder: str, subject: str) -> bool:
        response = self.client.get(
            f"/api/accounts/{account_id}/messages",
            query_string={"folder": folder, "subject": subject, "limit": 1},
            headers={"Authorization": f"Bearer {self.key_of[account_id]}"},
        )
        return response.status_code == 200 and bool(response.get_json()["items"])

    def timed_append(self, account: tuple[str, str, str], folder: str, timeout: float) -> float:
        account_id, user, password = account
        subject = f"push {uuid.uuid4().hex[:12]}"
        raw = mailgen.message(subject, "hello", sender="bob@example.test", to="me@example.test")
        started = time.monotonic()
        self.dovecot.append_messages(user, password, folder, [raw])
        while time.monotonic() - started < timeout:
            if self.listed(account_id, folder, subject):
                return time.monotonic() - started
            time.sleep(0.02)
        return float("inf")

    def reference(self, users: list[tuple[str, str, str]], count: int) -> list[float]:
        periodic = self.start_worker("periodic", 1)
        beat = CeleryBeat(self.env.subprocess_env(), cwd=ROOT)
        self.env.add_cleanup(beat.cleanup)
        # Every account synced just now: the first Beat sync comes one interval later.
        with transaction(self.sessions) as session:
            session.execute(
                update(Account).values(last_sync_at=None).execution_options(synchronize_session=False)
            )
        beat.start(timeout=60)
        time.sleep(2 * self.env.settings.periodic_sync_seconds)  # the first round of syncs
        results: list[float] = []
        lock = threading.Lock()

        def one(delay: float) -> None:
            time.sleep(delay)
            value = self.timed_append(random.choice(users), random.choice(FOLDERS), timeout=150)
            with lock:
                results.append(value)

        threads = [threading.Thread(target=one, args=(random.uniform(0, 60),)) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        beat.stop()
        periodic.stop()
        self.workers.remove(periodic)
        return results

    def watcher_latency(self, users: list[tuple[str, str, str]], count: int, *, notify: bool) -> list[float]:
        watcher = self.start_watcher(notify=notify)
        for account_id, _, _ in users:
            watcher.wait_for_log(rf"account {account_id}: watching", timeout=60)
        time.sleep(3)  # the connect-time syncs end
        results = []
        for _ in range(count):
            results.append(self.timed_append(random.choice(users), random.choice(FOLDERS), timeout=30))
            time.sleep(random.uniform(0.05, 0.3))
        watcher.stop()
        return results

    # -- memory ----------------------------------------------------------------------

    def memory(self, largest: int) -> list[list[str]]:
        steps = [1, 100, largest] if largest > 100 else [1, largest]
        groups: list[str] = []
        made = 0
        for step in steps:
            tenant_accounts = self.create_tenant_accounts(step - made)
            made = step
            groups.append(self.tenants[-1][0])
            del tenant_accounts
        baseline = self.watcher_rss([], "")
        rows = [["0 (baseline)", fmt(baseline / 2**20, 1), "—", "—"]]
        before, before_count = baseline, 0
        for count, tenants in zip(steps, [groups[: i + 1] for i in range(len(groups))], strict=True):
            rss = self.watcher_rss(tenants, count)
            rows.append(
                [
                    f"{count:,}",
                    fmt(rss / 2**20, 1),
                    fmt((rss - baseline) / count / 1024, 1),
                    fmt((rss - before) / (count - before_count) / 1024, 1),
                ]
            )
            before, before_count = rss, count
        return rows

    def watcher_rss(self, tenants: list[str], count: int | str) -> int:
        watcher = self.start_watcher(notify=True, tenants=tenants or ["none"])
        pattern = re.compile(r"watching every folder")
        deadline = time.monotonic() + 300
        while count and time.monotonic() < deadline:
            if len(pattern.findall(watcher.log_text())) >= int(count):
                break
            time.sleep(0.5)
        else:
            time.sleep(3)
        time.sleep(3)  # the connect-time dispatches settle
        assert watcher.pid is not None
        rss = int(psutil.Process(watcher.pid).memory_info().rss)
        watcher.stop()
        return rss


if __name__ == "__main__":
    main()
