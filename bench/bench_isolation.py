"""Benchmark of queue isolation: does one tenant's flood of spam checks delay another
tenant's sync?

Tenant A has an account whose INBOX holds real mail (the SpamAssassin dev corpus when
``../shared/corpora/spamassassin-dev.tar.gz`` is there, else generated messages), synced
once. Tenant B has its own account. A sample is one sync of B: a new message is appended
to B's INBOX, a ``sync`` task is dispatched the way the API does it
(``tasks.dispatch.dispatch``: record, commit, publish), and its queue wait is read from
its task record (``started_at - created_at``); the next sample starts when it has ended.
Cases, in one run:

(a) an idle system: no spam work queued;
(b) 10,000 real ``check_spam`` tasks dispatched by tenant A (records and messages, each
    scoring ``--per-task`` of A's messages, fetched from Dovecot), published while no spam
    consumer runs, then a spam worker busy working through them while B's samples run.

Workers are real subprocesses (``tests.servers.workers``, ``-c 1 --prefetch-multiplier
1``), one per queue as in production (``-Q sync`` and ``-Q spam``). With ``--shared`` the
same is measured with ONE worker consuming both queues, as a contrast. A's cap of tasks
in flight per queue (``MAILROOM_MAX_TASKS_IN_FLIGHT_PER_QUEUE``, 1,000 by default) is
raised for the run, or the backlog could not be queued.

Every sample waits at most ``--cap`` seconds (30) for its task to start; a capped sample
counts as the cap, is shown with "≥", and ends its case.

Run: ``.venv/bin/python bench/bench_isolation.py [--samples 20] [--backlog 10000]
[--per-task 5] [--messages 500] [--cap 30] [--shared] [--embedded]``. Goal: ratio (b)/(a) ≤ 1.5.
With ``--embedded`` the same is measured on the embedded stack as ``mailroom run`` starts
it: ``mailroom worker-host`` (sync, send, delete and periodic workers in one process) and a
solo spam worker.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from bench.environment import (  # noqa: E402
    BenchEnvironment,
    Owner,
    fmt,
    machine_busy_seconds,
    percentile,
    print_table,
    ratio,
)
from mailroom.launcher import EMBEDDED_THREADS  # noqa: E402
from services.models import Message, TaskRecord  # noqa: E402
from tasks.celery_app import make_celery  # noqa: E402
from tasks.dispatch import dispatch  # noqa: E402
from tasks.monitoring import get_queue_stats  # noqa: E402
from tests.servers.mailgen import message  # noqa: E402
from tests.servers.workers import CeleryWorker  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "spamassassin-dev.tar.gz"
FINAL_STATES = {"succeeded", "failed", "cancelled"}
POLL_SECONDS = 0.01
#: Untimed samples after workers start (imports, first connections).
WARMUP_SAMPLES = 2


@dataclass
class Case:
    """The samples of one case."""

    setup: str
    label: str
    waits: list[float] = field(default_factory=list)
    #: Spam messages still queued when each sample was dispatched.
    backlog: list[int] = field(default_factory=list)
    capped: int = 0
    #: Final states other than "succeeded" (the sync itself failed).
    failures: list[str] = field(default_factory=list)
    #: Spam tasks the spam consumer got through per second while the samples ran.
    drain_rate: float = math.nan
    #: Cores the whole machine kept busy on average while the samples ran.
    machine_cores: float = math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.waits) if self.waits else math.nan

    @property
    def p95(self) -> float:
        return percentile(self.waits, 95)


def tenant_a_mail(count: int) -> list[bytes]:
    """``count`` real messages from the corpus (ham and spam, in name order, cycled),
    or generated ones when the corpus is not there."""
    found: list[tuple[str, bytes]] = []
    if CORPUS.exists():
        with tarfile.open(CORPUS) as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".eml"):
                    data = archive.extractfile(member).read()  # type: ignore[union-attr]
                    found.append((member.name, data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")))
        found.sort()
        step = max(1, len(found) // count)
        return [raw for _name, raw in found[::step][:count]]
    return [
        message(f"Notice {i}", "Your statement is ready.", sender="news@letters.example", to="a@example.test")
        for i in range(count)
    ]


class Bench:
    """Tenant A's spam flood and tenant B's sync samples."""

    def __init__(self, env: BenchEnvironment, a: Owner, b: Owner, cap: float) -> None:
        self.env = env
        self.a = a
        self.b = b
        self.cap = cap
        self.celery: Celery = make_celery(env.settings)
        self.sessions: sessionmaker[Session] = env.sessions()
        self.a_ids: list[str] = []

    def worker(self, queues: list[str], name: str) -> CeleryWorker:
        worker = CeleryWorker(
            queues, env=self.env.subprocess_env(), name=f"{name}-{uuid.uuid4().hex[:6]}", cwd=ROOT
        )
        self.env.add_cleanup(worker.cleanup)
        return worker

    def spam_depth(self) -> int:
        return get_queue_stats(self.celery)["spam"]

    def run_task(self, owner: Owner, type: str, params: dict[str, object]) -> TaskRecord:
        result = dispatch(
            self.celery,
            self.sessions,
            type=type,
            tenant_id=owner.tenant_id,
            user_id=owner.user_id,
            account_id=owner.account_id,
            params=params,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with self.sessions() as session:
                record = session.get(TaskRecord, result.record.id)
                assert record is not None
                if record.state in FINAL_STATES:
                    return record
            time.sleep(0.05)
        raise RuntimeError(f"{type} task did not finish within 300 s")

    def seed(self, messages: int) -> None:
        """A's INBOX with real mail, synced; B's INBOX with a few messages, synced."""
        dovecot = self.env.dovecot
        assert dovecot is not None
        mail = tenant_a_mail(messages)
        dovecot.append_messages(self.a.mailbox_user, f"pw-{self.a.mailbox_user[1:]}", "INBOX", mail)
        self.append_b(20)
        for owner in (self.a, self.b):
            record = self.run_task(owner, "sync", {})
            if record.state != "succeeded":
                raise RuntimeError(f"the seeding sync ended {record.state}: {record.last_error}")
        with self.sessions() as session:
            query = select(Message.id).where(Message.account_id == self.a.account_id)
            self.a_ids = list(session.scalars(query))
        # One real check first: the scorer works here, and its model is loaded.
        check = self.run_task(self.a, "spam_check", {"message_ids": self.a_ids[:5]})
        if check.state != "succeeded" or not check.result or check.result.get("scored") != 5:
            raise RuntimeError(f"a spam check of tenant A failed: {check.state} {check.last_error}")

    def append_b(self, count: int) -> None:
        dovecot = self.env.dovecot
        assert dovecot is not None
        now = datetime.now(UTC)
        mail = [
            message(f"B {uuid.uuid4().hex[:8]}", "Hi.", sender="b@b.test", to="b@b.test", date=now)
            for _ in range(count)
        ]
        dovecot.append_messages(self.b.mailbox_user, f"pw-{self.b.mailbox_user[1:]}", "INBOX", mail)

    def flood(self, count: int, per_task: int) -> float:
        """Dispatch ``count`` check_spam tasks of tenant A, each naming ``per_task`` of its
        messages (records committed, messages published); returns tasks/s."""
        started = time.perf_counter()
        ids = self.a_ids
        for i in range(count):
            start = (i * per_task) % len(ids)
            chosen = (ids + ids)[start : start + per_task]
            dispatch(
                self.celery,
                self.sessions,
                type="spam_check",
                tenant_id=self.a.tenant_id,
                user_id=self.a.user_id,
                account_id=self.a.account_id,
                params={"message_ids": chosen},
            )
        return count / (time.perf_counter() - started)

    def purge(self) -> None:
        """Empty the queues (between setups; no worker runs then), and end the records of
        what was purged, so the next setup's flood is not refused by the tenant's cap."""
        with self.celery.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in ("sync", "spam"):
                channel.queue_purge(queue)
        with self.sessions() as session:
            session.execute(
                update(TaskRecord)
                .where(
                    TaskRecord.tenant_id.in_([self.a.tenant_id, self.b.tenant_id]),
                    TaskRecord.state.in_(["queued", "running", "retrying"]),
                )
                .values(state="cancelled")
                .execution_options(synchronize_session=False)
            )
            session.commit()

    def sample(self) -> tuple[float | None, str]:
        """One new message for B, then one sync of B: (queue wait in seconds, or None when
        it did not start within the cap; final state)."""
        self.append_b(1)
        result = dispatch(
            self.celery,
            self.sessions,
            type="sync",
            tenant_id=self.b.tenant_id,
            user_id=self.b.user_id,
            account_id=self.b.account_id,
            params={},
        )
        task_id = result.record.id
        deadline = time.monotonic() + self.cap
        wait: float | None = None
        state = "queued"
        while time.monotonic() < deadline:
            with self.sessions() as session:
                record = session.get(TaskRecord, task_id)
                assert record is not None
                state = record.state
                if wait is None and record.started_at is not None:
                    wait = (record.started_at - record.created_at).total_seconds()
                    deadline = time.monotonic() + self.cap  # only the wait is capped
            if state in FINAL_STATES:
                return wait, state
            time.sleep(POLL_SECONDS)
        return wait, state

    def run_case(self, setup: str, label: str, samples: int) -> Case:
        case = Case(setup, label)
        print(f"  {label}: {samples} samples …", flush=True)
        depth_before = self.spam_depth()
        started = time.perf_counter()
        busy_before = machine_busy_seconds()
        for _ in range(samples):
            case.backlog.append(self.spam_depth())
            wait, state = self.sample()
            if wait is None and state not in FINAL_STATES:
                case.waits.append(self.cap)
                case.capped += 1
                print(f"    a sample waited more than {self.cap:g} s: case ended", flush=True)
                break
            if state != "succeeded":
                case.failures.append(state)
            if wait is not None:
                case.waits.append(wait)
            time.sleep(random.uniform(0.02, 0.08))  # not in step with the spam worker's rhythm
        elapsed = time.perf_counter() - started
        case.machine_cores = (machine_busy_seconds() - busy_before) / elapsed
        if depth_before:
            case.drain_rate = (depth_before - self.spam_depth()) / elapsed
        return case

    def warm_up(self) -> None:
        for _ in range(WARMUP_SAMPLES):
            self.sample()


class EmbeddedHost(CeleryWorker):
    """``mailroom worker-host`` as ``mailroom run`` starts it: one Celery worker per
    I/O-bound queue (threads per queue from the launcher) and Beat's place, in one process.
    Ready once every queue's worker said so."""

    def __init__(self, env: dict[str, str], name: str) -> None:
        super().__init__(list(EMBEDDED_THREADS), env=env, name=name, cwd=ROOT)
        self.ready_pattern = re.compile(r"periodic@\S+ ready\.")

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "mailroom.cli", "worker-host"]
        for queue, threads in EMBEDDED_THREADS.items():
            argv += ["--queue", f"{queue}:{threads}"]
        return argv


@contextmanager
def running(*workers: CeleryWorker) -> Iterator[None]:
    """Start the workers in parallel and wait until all are ready; stop them afterwards."""
    for worker in workers:
        worker.start(wait_ready=False)
    try:
        for worker in workers:
            worker.wait_ready(timeout=90)
        yield
    finally:
        for worker in workers:
            worker.stop()


def measure_setup(
    bench: Bench, setup: str, queues_per_worker: list[list[str]], args: argparse.Namespace
) -> tuple[list[Case], float]:
    """Cases (a) and (b) with one worker per entry of ``queues_per_worker``. The workers
    that consume ``spam`` are stopped while the flood is dispatched, the others keep
    running. Returns the cases and the dispatch rate."""
    print(f"{setup} …", flush=True)
    if queues_per_worker == EMBEDDED:
        # As `mailroom run` ships it: the shared worker host, and spam in a solo worker.
        host = EmbeddedHost(bench.env.subprocess_env(), f"host-{uuid.uuid4().hex[:6]}")
        bench.env.add_cleanup(host.cleanup)
        spam = CeleryWorker(
            ["spam"],
            env=bench.env.subprocess_env(),
            name=f"spam-{uuid.uuid4().hex[:6]}",
            cwd=ROOT,
            pool="solo",
        )
        bench.env.add_cleanup(spam.cleanup)
        workers = [host, spam]
    else:
        workers = [bench.worker(queues, "-".join(queues)) for queues in queues_per_worker]
    spam_consumers = [w for w in workers if "spam" in w.queues]
    others = [w for w in workers if "spam" not in w.queues]
    with running(*others):
        with running(*spam_consumers):
            if not bench.a_ids:
                bench.seed(args.messages)
            bench.warm_up()
            idle = bench.run_case(setup, "(a) idle system", args.samples)
        print(f"  tenant A dispatches {args.backlog:,} check_spam tasks (no spam worker runs) …", flush=True)
        rate = bench.flood(args.backlog, args.per_task)
        # No warm-up here: it would wait out the backlog where the backlog blocks sync.
        with running(*spam_consumers):
            time.sleep(1.0)  # the spam worker is under way before B's first sample
            loaded = bench.run_case(
                setup, f"(b) {args.backlog:,} check_spam of tenant A queued, spam worker busy", args.samples
            )
    bench.purge()
    return [idle, loaded], rate


#: Marks the embedded setup (``mailroom run``'s worker host plus a solo spam worker).
EMBEDDED: list[list[str]] = [["embedded"]]

SETUPS: list[tuple[str, list[list[str]]]] = [
    ("separate workers (-Q sync, -Q spam)", [["sync"], ["spam"]]),
    ("one shared worker (-Q sync,spam)", [["sync", "spam"]]),
    ("embedded stack (mailroom run: worker host + solo spam)", EMBEDDED),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20, help="syncs of tenant B per case (20)")
    parser.add_argument("--backlog", type=int, default=10_000, help="check_spam tasks of tenant A (10,000)")
    parser.add_argument("--per-task", type=int, default=5, help="messages each check_spam scores (5)")
    parser.add_argument("--messages", type=int, default=500, help="messages in tenant A's INBOX (500)")
    parser.add_argument("--cap", type=float, default=30.0, help="longest wait per sample, seconds (30)")
    parser.add_argument("--shared", action="store_true", help="also measure one shared worker, as a contrast")
    parser.add_argument(
        "--embedded", action="store_true", help="also measure the embedded stack as `mailroom run` starts it"
    )
    args = parser.parse_args(argv)

    with BenchEnvironment(dovecot=True, smtp=True, max_tasks_in_flight_per_queue=args.backlog + 1000) as env:
        sessions = env.sessions()
        bench = Bench(env, env.create_owner(sessions), env.create_owner(sessions), args.cap)
        cases: list[Case] = []
        rates: list[float] = []
        chosen = [SETUPS[0]] + ([SETUPS[1]] if args.shared else []) + ([SETUPS[2]] if args.embedded else [])
        for setup, queues_per_worker in chosen:
            measured, rate = measure_setup(bench, setup, queues_per_worker, args)
            cases += measured
            rates.append(rate)
    report(args, cases, rates)


def wait_cell(case: Case, seconds: float, cap: float) -> str:
    """Milliseconds; "≥" when the value is a capped sample's (the real wait was longer)."""
    return ("≥ " if case.capped and seconds >= cap else "") + fmt(seconds * 1000, 1)


def report(args: argparse.Namespace, cases: list[Case], rates: list[float]) -> None:
    rows: list[list[str]] = []
    for idle, loaded in zip(cases[::2], cases[1::2], strict=True):
        for case in (idle, loaded):
            backlog = f"{max(case.backlog):,} → {min(case.backlog):,}" if any(case.backlog) else "0"
            rows.append(
                [
                    case.setup if case is idle else "",
                    case.label,
                    str(len(case.waits)) + (f" ({case.capped} capped)" if case.capped else ""),
                    wait_cell(case, case.median, args.cap),
                    wait_cell(case, case.p95, args.cap),
                    wait_cell(case, max(case.waits, default=math.nan), args.cap),
                    backlog,
                    fmt(case.drain_rate, 1),
                    fmt(case.machine_cores, 2),
                ]
            )
        capped = "≥ " if loaded.capped else ""
        rows.append(
            [
                "",
                "ratio (b) / (a)",
                "",
                capped + fmt(ratio(loaded.median, idle.median), 2),
                capped + fmt(ratio(loaded.p95, idle.p95), 2),
                *[""] * 4,
            ]
        )
    print_table(
        "Queue wait of tenant B's sync: task record started_at − created_at, one sync at a time; "
        f"waits capped at {args.cap:g} s (a capped sample ends its case)",
        [
            "setup",
            "case",
            "samples",
            "median ms",
            "p95 ms",
            "max ms",
            "spam tasks queued",
            "spam tasks done/s",
            "machine busy (cores)",
        ],
        rows,
        left=2,
    )
    print()
    shown = ", ".join(f"{rate:,.0f}" for rate in rates)
    print(f"tenant A's check_spam tasks dispatched (record + publish) at {shown} tasks/s")
    print(f"each scores {args.per_task} of {args.messages} real messages of tenant A, fetched from Dovecot")
    print("goal: ratio (b)/(a) ≤ 1.5 with separate workers, and on the embedded stack")
    for case in cases:
        if case.failures:
            states = ", ".join(sorted(set(case.failures)))
            print(f"{case.setup} {case.label}: the sync ended {states} in {len(case.failures)} samples")


if __name__ == "__main__":
    main()
