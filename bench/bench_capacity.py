"""The capacity model's check point: N accounts on a short sync interval, served by a real
Celery Beat and real workers against private PostgreSQL, Redis and Dovecot.

Set-up: ``--accounts`` Dovecot users with ``--messages`` messages each, one Mailroom
account per user (``--per-tenant`` accounts per tenant), every account's
``sync_interval`` set to ``--interval`` seconds, and Beat's ``periodic_sync`` running every
``--interval`` seconds too (``MAILROOM_PERIODIC_SYNC_SECONDS``). One prefork worker per
queue with the process counts of deploy/ (sync 4, send 4, delete 2, spam 2, periodic 1).
Every account's first sync is queued and finished before Beat starts, and one extra
account of ``--storage-messages`` messages is synced to measure storage per message.

Phases:

1. idle (``--idle`` seconds, workers running, no Beat): the baseline that idle workers
   cost (Redis polling, CPU), subtracted from the per-sync figures;
2. Beat runs for ``--duration`` seconds; then Beat stops, the queued syncs drain, and
   PostgreSQL's statistics settle before the last reading.

Printed: sync tasks completed per second beside the model's predictions (accounts /
interval; accounts / (interval + wait + run), since an account's next sync is due one
interval after its last one *ended*; the same with that gap taken to Beat's ticks as
services.accounts.due_account_ids does, and as it did before it took accounts due within
half a tick); mean and p95 duration of these syncs (unchanged
accounts); queue wait p50/p95 of the sync queue (task record ``started_at - created_at``);
CPU seconds per sync of the workers, PostgreSQL, Redis and Dovecot (their process trees);
Redis commands and PostgreSQL transactions per sync; how regularly each account was
synced (gaps between its syncs); table + index bytes per 10,000 synced messages.

Run: ``.venv/bin/python bench/bench_capacity.py [--accounts 500] [--interval 60] [--duration 240]``.
Everything it starts is stopped when it ends, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import redis
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [path for path in (str(ROOT), str(ROOT / "src")) if path not in sys.path]

from bench.environment import (  # noqa: E402
    BenchEnvironment,
    fmt,
    machine_busy_seconds,
    percentile,
    print_table,
    ratio,
)
from services import accounts, tenancy  # noqa: E402
from services.accounts import AccountInput  # noqa: E402
from services.crypto import SecretBox  # noqa: E402
from services.db import transaction  # noqa: E402
from services.models import Account, TaskRecord  # noqa: E402
from services.tenancy import Principal  # noqa: E402
from tasks.celery_app import make_celery  # noqa: E402
from tasks.dispatch import dispatch  # noqa: E402
from tests.servers import mailgen  # noqa: E402
from tests.servers.workers import CeleryBeat, CeleryWorker  # noqa: E402

#: Processes per pod of each queue's Deployment (deploy/worker-*.yaml).
DEPLOY_CONCURRENCY = {"sync": 4, "send": 4, "delete": 2, "spam": 2, "periodic": 1}
FINAL_STATES = ("succeeded", "failed", "cancelled")
#: PostgreSQL 15 flushes a busy backend's statistics at most every second and an idle one's
#: within 10 s: wait this long before reading pg_stat_database.
PG_STATS_SETTLE_SECONDS = 11.5
PERIODIC_RESULT = re.compile(r"mailroom\.periodic_sync\[[^\]]+\] succeeded in ([0-9.]+)s: .*?'queued': (\d+)")


@dataclass(frozen=True)
class Reading:
    """Counters at one moment."""

    at: float
    cpu: dict[str, float]
    redis_commands: int
    pg_commits: int
    machine_busy: float


@dataclass(frozen=True)
class Box:
    account_id: str
    user: str
    password: str


def tree_cpu_seconds(root: int | None) -> float:
    """CPU seconds (user + system) of ``root``, its live descendants and the children they
    reaped (a recycled pool child or an ended PostgreSQL backend still counts)."""
    if root is None:
        return math.nan
    total = 0.0
    try:
        procs = [psutil.Process(root)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return math.nan
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def postmaster_pid(env: BenchEnvironment) -> int | None:
    assert env.postgres is not None
    try:
        return int((env.postgres.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Capacity:
    def __init__(self, env: BenchEnvironment, args: argparse.Namespace) -> None:
        self.env = env
        self.args = args
        self.sessions: sessionmaker[Session] = env.sessions()
        self.celery = make_celery(env.settings)
        assert env.redis is not None and env.dovecot is not None
        self.redis = redis.Redis.from_url(env.values["broker_url"])
        self.workers: dict[str, CeleryWorker] = {}
        self.beat: CeleryBeat | None = None

    # -- set-up ----------------------------------------------------------------------

    def create_accounts(self, count: int, messages: int, interval: int) -> list[Box]:
        """``count`` Dovecot users with ``messages`` messages each and an account for each,
        ``per_tenant`` accounts per tenant (one admin owns them)."""
        dovecot = self.env.dovecot
        assert dovecot is not None
        box = SecretBox(self.env.settings.encryption_keys())
        created: list[Box] = []
        per_tenant = max(1, self.args.per_tenant)
        # A user added while Dovecot runs waits until its auth process re-read the users
        # file (about a second each): add them all while it is stopped, then start it again.
        dovecot.stop()
        for first in range(0, count, per_tenant):
            with transaction(self.sessions) as session:
                tag = uuid.uuid4().hex[:10]
                tenant = tenancy.create_tenant(session, name=f"Capacity {tag}", slug=f"cap-{tag}")
                admin = tenancy.create_user(
                    session, tenant_id=tenant.id, email=f"admin@{tag}.test", role="admin"
                )
                principal = Principal(tenant_id=tenant.id, user_id=admin.id, role=admin.role)
                for _ in range(min(per_tenant, count - first)):
                    user = f"c{uuid.uuid4().hex[:12]}"
                    password = f"pw-{user}"
                    dovecot.add_user(user, password)
                    account = accounts.create_account(
                        session,
                        principal,
                        AccountInput(
                            email=f"{user}@example.test",
                            name="Capacity mailbox",
                            imap={
                                "host": "127.0.0.1",
                                "port": dovecot.port,
                                "tls": "none",
                                "username": user,
                                "password": password,
                            },
                            smtp={
                                "host": "127.0.0.1",
                                "port": 9,
                                "tls": "none",
                                "username": user,
                                "password": password,
                            },
                            sync_interval=interval,
                        ),
                        box,
                        allow_private=True,
                    )
                    created.append(Box(account.id, user, password))
        dovecot.start()
        for mailbox in created:
            if messages:
                dovecot.append_messages(
                    mailbox.user, mailbox.password, "INBOX", self.mail(messages, mailbox.user)
                )
        return created

    @staticmethod
    def mail(count: int, prefix: str) -> list[bytes]:
        base = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
        return [
            mailgen.message(
                f"{prefix} note {n}",
                f"Hello,\n\nnote {n} of {prefix}.",
                sender=f"Colleague {n % 50} <colleague{n % 50}@example.com>",
                to=["me@example.com"],
                date=base + timedelta(minutes=n),
                message_id=f"<{prefix}-{n}-{uuid.uuid4().hex[:6]}@capacity>",
                size_hint=4096,
            )
            for n in range(count)
        ]

    def start_workers(self) -> None:
        env = self.env.subprocess_env()
        for queue, concurrency in DEPLOY_CONCURRENCY.items():
            worker = CeleryWorker([queue], env=env, concurrency=concurrency, name=queue, cwd=ROOT)
            self.env.add_cleanup(worker.cleanup)
            self.workers[queue] = worker
            worker.start(wait_ready=False)
        for worker in self.workers.values():
            worker.wait_ready(timeout=120)

    def start_beat(self) -> None:
        self.beat = CeleryBeat(self.env.subprocess_env(), cwd=ROOT)
        self.env.add_cleanup(self.beat.cleanup)
        self.beat.start(timeout=60)

    def sync_all(self, account_ids: Sequence[str], timeout: float) -> list[TaskRecord]:
        """Queue a sync of each account (as the API would) and wait until all ended."""
        ids: list[str] = []
        for account_id in account_ids:
            with self.sessions() as session:
                account = session.get(Account, account_id)
                assert account is not None
                tenant_id, user_id = account.tenant_id, account.user_id
            result = dispatch(
                self.celery,
                self.sessions,
                type="sync",
                tenant_id=tenant_id,
                user_id=user_id,
                account_id=account_id,
                params={},
            )
            ids.append(result.record.id)
        deadline = time.monotonic() + timeout
        while True:
            with self.sessions() as session:
                records = list(session.scalars(select(TaskRecord).where(TaskRecord.id.in_(ids))))
                if all(r.state in FINAL_STATES for r in records):
                    session.expunge_all()
                    failed = [r for r in records if r.state != "succeeded"]
                    if failed:
                        raise RuntimeError(f"{len(failed)} first syncs failed, e.g. {failed[0].last_error}")
                    return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"the syncs did not end within {timeout:g} s")
            time.sleep(0.5)

    # -- readings --------------------------------------------------------------------

    def pids(self) -> dict[str, int | None]:
        env = self.env
        assert env.redis is not None and env.dovecot is not None
        found: dict[str, int | None] = {f"worker {q}": w.pid for q, w in self.workers.items()}
        found["beat"] = self.beat.pid if self.beat is not None else None
        found["PostgreSQL"] = postmaster_pid(env)
        found["Redis"] = env.redis.pid
        found["Dovecot"] = env.dovecot.pid
        return found

    def read(self, beat_cpu: float = 0.0) -> Reading:
        cpu = {name: tree_cpu_seconds(pid) for name, pid in self.pids().items()}
        if self.beat is None or not self.beat.is_running():
            cpu["beat"] = beat_cpu
        commands = int(self.redis.info("stats")["total_commands_processed"])
        with self.sessions() as session:
            commits = int(
                session.scalar(
                    text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
                )
                or 0
            )
        return Reading(time.monotonic(), cpu, commands, commits, machine_busy_seconds())

    def in_flight_syncs(self) -> int:
        with self.sessions() as session:
            return int(
                session.scalar(
                    select(func.count()).where(
                        TaskRecord.queue == "sync", TaskRecord.state.not_in(FINAL_STATES)
                    )
                )
                or 0
            )

    def beat_syncs(self, since: datetime) -> list[TaskRecord]:
        with self.sessions() as session:
            rows = list(
                session.scalars(
                    select(TaskRecord).where(
                        TaskRecord.type == "sync", TaskRecord.origin == "beat", TaskRecord.created_at >= since
                    )
                )
            )
            session.expunge_all()
            return rows

    def messages_bytes(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(text("SELECT pg_total_relation_size('messages')")) or 0)

    def task_record_bytes(self) -> tuple[int, int]:
        """(bytes of the tasks table with its indexes and TOAST, records in it)."""
        with self.sessions() as session:
            size = int(session.scalar(text("SELECT pg_total_relation_size('tasks')")) or 0)
            return size, int(session.scalar(select(func.count()).select_from(TaskRecord)) or 0)


def mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else math.nan


def joined(values: Sequence[float], scale: float, digits: int, unit: str) -> str:
    """``"1.0 / 2.0 ms"``: the values times ``scale``, each as :func:`fmt` shows it."""
    return " / ".join(fmt(v * scale, digits) for v in values) + unit


def seconds(a: datetime | None, b: datetime | None) -> float:
    return (b - a).total_seconds() if a is not None and b is not None else math.nan


def run(args: argparse.Namespace) -> None:
    overrides: dict[str, Any] = {
        "periodic_sync_seconds": float(args.interval),
        # One tenant's queued syncs never hit the in-flight cap during the first syncs.
        "max_tasks_in_flight_per_queue": 100_000,
        "log_level": "INFO",
    }
    # What else keeps the machine busy (a shared machine): measured before anything starts.
    busy_before = machine_busy_seconds()
    time.sleep(5)
    args.machine_before = (machine_busy_seconds() - busy_before) / 5
    with BenchEnvironment(dovecot=True, **overrides) as env:
        bench = Capacity(env, args)
        print(
            f"creating {args.accounts:,} accounts with {args.messages} messages each, "
            f"and one of {args.storage_messages:,} …",
            flush=True,
        )
        started = time.perf_counter()
        boxes = bench.create_accounts(args.accounts, args.messages, args.interval)
        (storage_box,) = bench.create_accounts(1, 0, 86_400)
        assert env.dovecot is not None
        big = bench.mail(args.storage_messages, "storage")
        env.dovecot.append_messages(storage_box.user, storage_box.password, "INBOX", big)
        print(f"  done in {time.perf_counter() - started:.1f} s; starting workers …", flush=True)
        bench.start_workers()

        size_before = bench.messages_bytes()
        (storage_record,) = bench.sync_all([storage_box.account_id], timeout=600)
        storage_bytes = bench.messages_bytes() - size_before
        first_sync_seconds = seconds(storage_record.started_at, storage_record.finished_at)

        print(f"first sync of the {args.accounts:,} accounts …", flush=True)
        started = time.perf_counter()
        bench.sync_all([b.account_id for b in boxes], timeout=900)
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)

        time.sleep(PG_STATS_SETTLE_SECONDS)
        print(f"idle baseline ({args.idle:g} s, workers running, no Beat) …", flush=True)
        idle_a = bench.read()
        time.sleep(args.idle)
        idle_b = bench.read()

        print(f"Beat on, every {args.interval} s, for {args.duration:g} s …", flush=True)
        window_start = datetime.now(UTC)
        bench.start_beat()
        a = bench.read()
        time.sleep(args.duration)
        window_end = datetime.now(UTC)
        beat = bench.beat
        assert beat is not None
        beat_cpu = tree_cpu_seconds(beat.pid) - a.cpu["beat"]
        beat_log = beat.log_text()
        beat.stop()
        drain_deadline = time.monotonic() + 300
        while bench.in_flight_syncs() and time.monotonic() < drain_deadline:
            time.sleep(0.5)
        time.sleep(PG_STATS_SETTLE_SECONDS)
        b = bench.read(beat_cpu=a.cpu["beat"] + beat_cpu)
        records = bench.beat_syncs(window_start - timedelta(seconds=1))
        periodic_log = bench.workers["periodic"].log_text()
        sync_log = bench.workers["sync"].log_text()
        task_bytes = bench.task_record_bytes()

    report(
        args,
        records=records,
        window=(window_start, window_end),
        idle=(idle_a, idle_b),
        busy=(a, b),
        periodic_log=periodic_log,
        beat_ticks=beat_log.count("Scheduler: Sending due task periodic-sync"),
        sync_log_errors=len(re.findall(r'"level": ?"(?:ERROR|CRITICAL)"', sync_log)),
        storage=(storage_bytes, args.storage_messages, first_sync_seconds),
        task_bytes=task_bytes,
    )


def report(
    args: argparse.Namespace,
    *,
    records: list[TaskRecord],
    window: tuple[datetime, datetime],
    idle: tuple[Reading, Reading],
    busy: tuple[Reading, Reading],
    periodic_log: str,
    beat_ticks: int,
    sync_log_errors: int,
    storage: tuple[int, int, float],
    task_bytes: tuple[int, int],
) -> None:
    start, end = window
    window_s = (end - start).total_seconds()
    done = [r for r in records if r.state in FINAL_STATES]
    succeeded = [r for r in done if r.state == "succeeded"]
    in_window = [r for r in done if r.finished_at is not None and start <= r.finished_at <= end]
    durations = [seconds(r.started_at, r.finished_at) for r in succeeded]
    waits = [seconds(r.created_at, r.started_at) for r in done if r.started_at is not None]

    # Per-sync costs over the whole busy phase (Beat on, then the drain), less what the
    # idle workers cost in the same time at the idle phase's rate.
    (ia, ib), (ba, bb) = idle, busy
    idle_s, busy_s = ib.at - ia.at, bb.at - ba.at
    count = len(done)

    def per_sync(get: Callable[[Reading], float]) -> tuple[float, float]:
        gross = get(bb) - get(ba)
        net = gross - (get(ib) - get(ia)) / idle_s * busy_s
        return ratio(gross, count), ratio(net, count)

    rate = len(in_window) / window_s
    naive = args.accounts / args.interval
    # An account's next sync is due one interval after its last sync *ended*: I + wait + run
    # after the tick that queued it. Beat looks every tick and takes an account due before
    # the middle of the next tick, so the gap is I + wait + run taken to the nearest tick
    # (on average over ticks' phases, I + wait + run itself); before that rule it was the
    # next whole tick after I + wait + run.
    tick = args.interval
    lag = args.interval + mean(waits or [0.0]) + mean(durations or [0.0])
    continuous = args.accounts / lag
    nearest = tick * math.ceil(lag / tick - 0.5)
    whole = tick * math.ceil(lag / tick)

    print_table(
        f"Sync throughput: {args.accounts:,} accounts, sync_interval {args.interval} s, Beat every "
        f"{args.interval} s, {window_s:.0f} s window ({beat_ticks} Beat ticks of periodic-sync)",
        ["figure", "value (measured / model)"],
        [
            ["sync tasks completed per second (measured, ended inside the window)", fmt(rate, 2)],
            ["model: accounts / sync_interval", f"{fmt(naive, 2)} ({fmt(ratio(rate, naive), 2)})"],
            [
                f"model: accounts / (interval + wait + run) = accounts / {lag:.1f} s",
                f"{fmt(continuous, 2)} ({fmt(ratio(rate, continuous), 2)})",
            ],
            [
                f"model with Beat's ticks: accounts / {nearest} s (interval + wait + run, nearest tick)",
                f"{fmt(args.accounts / nearest, 2)} ({fmt(ratio(rate, args.accounts / nearest), 2)})",
            ],
            [
                f"former rule: accounts / {whole} s (the next whole tick after interval + wait + run)",
                f"{fmt(args.accounts / whole, 2)} ({fmt(ratio(rate, args.accounts / whole), 2)})",
            ],
            [
                "sync tasks queued by Beat (window + drain) / succeeded",
                f"{len(records):,} / {len(succeeded):,}",
            ],
        ],
    )

    by_account: dict[str, list[datetime]] = defaultdict(list)
    for r in records:
        if r.account_id and r.started_at is not None:
            by_account[r.account_id].append(r.started_at)
    gaps = [
        (later - earlier).total_seconds()
        for starts in by_account.values()
        for earlier, later in zip(sorted(starts), sorted(starts)[1:], strict=False)
    ]
    synced_each_interval = sum(1 for g in gaps if g <= args.interval * 1.25)
    print_table(
        "Per sync of an unchanged account (task records) and how regularly each account was synced",
        ["figure", "value"],
        [
            [
                "sync task duration mean / p95 (started_at → finished_at)",
                joined([mean(durations), percentile(durations, 95)], 1000, 1, " ms"),
            ],
            [
                "sync queue wait p50 / p95 / max (created_at → started_at)",
                joined(
                    [percentile(waits, 50), percentile(waits, 95), max(waits, default=math.nan)],
                    1000,
                    0,
                    " ms",
                ),
            ],
            ["accounts synced by Beat in the window", f"{len(by_account):,} of {args.accounts:,}"],
            [
                "gap between an account's syncs: min / median / max",
                joined(
                    [min(gaps, default=math.nan), percentile(gaps, 50), max(gaps, default=math.nan)],
                    1,
                    1,
                    " s",
                ),
            ],
            [
                f"gaps within 1.25 x interval ({args.interval * 1.25:g} s): synced once per interval",
                f"{synced_each_interval:,} of {len(gaps):,}",
            ],
        ],
    )

    def cpu_of(name: str) -> Callable[[Reading], float]:
        return lambda reading: reading.cpu.get(name, math.nan)

    rows = []
    for name in bb.cpu:
        gross, net = per_sync(cpu_of(name))
        idle_rate = (ib.cpu.get(name, math.nan) - ia.cpu.get(name, math.nan)) / idle_s
        rows.append([name, fmt(gross * 1000, 2), fmt(net * 1000, 2), fmt(idle_rate * 1000, 1)])
    gross_total = sum(per_sync(cpu_of(name))[0] for name in bb.cpu if not name.startswith("Dovecot"))
    rows.append(["Mailroom + PostgreSQL + Redis", fmt(gross_total * 1000, 2), "", ""])
    print_table(
        f"CPU per sync task ({count:,} syncs; busy phase {busy_s:.0f} s incl. drain; "
        f"idle phase {idle_s:.0f} s)",
        ["process tree", "CPU ms/sync", "net of idle", "idle CPU ms/s"],
        rows,
    )
    redis_gross, redis_net = per_sync(lambda r: r.redis_commands)
    pg_gross, pg_net = per_sync(lambda r: r.pg_commits)
    print_table(
        "Data stores per sync task",
        ["figure", "per sync", "net of idle", "idle per s"],
        [
            [
                "Redis commands (INFO stats total_commands_processed)",
                fmt(redis_gross, 1),
                fmt(redis_net, 1),
                fmt((ib.redis_commands - ia.redis_commands) / idle_s, 1),
            ],
            [
                "PostgreSQL transactions (pg_stat_database xact_commit)",
                fmt(pg_gross, 1),
                fmt(pg_net, 1),
                fmt((ib.pg_commits - ia.pg_commits) / idle_s, 1),
            ],
        ],
    )

    ticks = [(float(s), int(q)) for s, q in PERIODIC_RESULT.findall(periodic_log)]
    dispatched = sum(q for _, q in ticks)
    storage_bytes, storage_messages, first_sync_s = storage
    per_message = storage_bytes / storage_messages
    print_table(
        "Beat's side and storage",
        ["figure", "value"],
        [
            [
                "periodic_sync runs: seconds each (accounts queued)",
                ", ".join(f"{s:.2f} ({q})" for s, q in ticks) or "–",
            ],
            [
                "periodic_sync: ms per account queued",
                fmt(ratio(sum(s for s, _ in ticks), dispatched) * 1000, 2),
            ],
            [
                f"first sync of {storage_messages:,} messages (one account)",
                f"{fmt(first_sync_s, 2)} s, {fmt(ratio(storage_messages, first_sync_s), 0)} msg/s",
            ],
            [
                "messages table + indexes + TOAST per 10,000 synced messages",
                f"{fmt(per_message * 10_000 / 2**20, 2)} MiB ({fmt(per_message, 0)} B/message)",
            ],
            [
                f"tasks table + indexes + TOAST per task record ({task_bytes[1]:,} records)",
                f"{fmt(ratio(task_bytes[0], task_bytes[1]), 0)} B",
            ],
            ["errors logged by the sync worker", str(sync_log_errors)],
        ],
    )
    print()
    print(
        f"machine: {os.cpu_count()} CPUs, busy {fmt((bb.machine_busy - ba.machine_busy) / busy_s, 2)} cores "
        "on average "
        f"in the busy phase, {fmt((ib.machine_busy - ia.machine_busy) / idle_s, 2)} in the idle phase, "
        f"{fmt(args.machine_before, 2)} before the bench started (all processes of the machine)"
    )
    print(
        "load on the data stores while Beat ran: Redis "
        f"{fmt((bb.redis_commands - ba.redis_commands) / busy_s, 1)} "
        f"commands/s, PostgreSQL {fmt((bb.pg_commits - ba.pg_commits) / busy_s, 1)} transactions/s"
    )
    print(f"workers: one prefork worker per queue, processes as deploy/: {DEPLOY_CONCURRENCY}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--messages", type=int, default=5, help="messages per account (5)")
    parser.add_argument("--per-tenant", type=int, default=50, help="accounts per tenant (50)")
    parser.add_argument("--interval", type=int, default=60, help="sync_interval and Beat's period, s (60)")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds Beat runs (240)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle baseline (30)")
    parser.add_argument(
        "--storage-messages", type=int, default=10_000, help="messages of the storage account (10,000)"
    )
    args = parser.parse_args(argv)
    if args.interval < 60:
        parser.error("--interval must be at least 60 (the smallest sync_interval an account takes)")
    run(args)


if __name__ == "__main__":
    main()
