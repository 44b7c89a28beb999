"""Benchmark of queue isolation: does a spam backlog delay a sync-queue task?

A ``verify`` task (it runs on the ``sync`` queue: a real IMAP login to a private Dovecot and
an SMTP login to a private aiosmtpd) is dispatched the way the API does it
(``tasks.dispatch.dispatch``: record, commit, publish), one at a time, and its queue wait
is read from its task record: ``started_at - created_at``. Cases:

(a) an empty system;
(b) 10,000 ``mailroom.check_spam`` messages queued on ``spam`` (published by one producer
    while no spam consumer runs) and a spam worker busy working through them. They have no
    task record, so the worker drops each quickly: the point is the backlog, not the work.

Each setup runs both cases. Workers are real subprocesses (``tests.servers.workers``, each
``-c 1 --prefetch-multiplier 1``); the ones consuming ``spam`` are stopped while the backlog
is published, the others keep running:

1. one worker per queue, as in production: ``-Q sync`` and ``-Q spam``;
2. as a contrast, ONE worker consuming both queues, ``-Q sync,spam``;
3. the same with the queues named the other way round, ``-Q spam,sync``. Mailroom's
   broker option ``queue_order_strategy="priority"`` makes a worker poll its queues in the
   order it was given them, so 2 and 3 differ.

Every sample waits at most ``--cap`` seconds (30) for its task to start; a capped sample
counts as the cap, is shown with "≥", and ends its case (the following ones would only
wait longer).

Run: ``.venv/bin/python bench/bench_isolation.py [--samples 20] [--backlog 10000] [--cap 30]``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
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
from services.models import TaskRecord  # noqa: E402
from tasks.celery_app import make_celery  # noqa: E402
from tasks.dispatch import dispatch  # noqa: E402
from tasks.monitoring import get_queue_stats  # noqa: E402
from tests.servers.workers import CeleryWorker  # noqa: E402

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
    #: Final states other than "succeeded" (the verify itself failed).
    failures: list[str] = field(default_factory=list)
    #: Spam messages the spam consumer got through per second while the samples ran.
    drain_rate: float = math.nan
    #: Cores the whole machine kept busy on average while the samples ran.
    machine_cores: float = math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.waits) if self.waits else math.nan

    @property
    def p95(self) -> float:
        return percentile(self.waits, 95)


class Bench:
    """Dispatching verify tasks and reading their records; publishing the spam backlog."""

    def __init__(self, env: BenchEnvironment, owner: Owner, cap: float) -> None:
        self.env = env
        self.owner = owner
        self.cap = cap
        self.celery: Celery = make_celery(env.settings)
        self.sessions: sessionmaker[Session] = env.sessions()

    def worker(self, queues: list[str], name: str) -> CeleryWorker:
        worker = CeleryWorker(
            queues, env=self.env.subprocess_env(), name=f"{name}-{uuid.uuid4().hex[:6]}", cwd=ROOT
        )
        self.env.add_cleanup(worker.cleanup)
        return worker

    def spam_depth(self) -> int:
        return get_queue_stats(self.celery)["spam"]

    def publish_spam(self, count: int) -> float:
        """Queue ``count`` check_spam messages (no records) from one producer; returns msg/s."""
        kwargs = {"tenant_id": self.owner.tenant_id, "params": {"folder": "INBOX"}}
        started = time.perf_counter()
        for _ in range(count):
            self.celery.send_task("mailroom.check_spam", kwargs=kwargs, queue="spam", routing_key="spam")
        return count / (time.perf_counter() - started)

    def purge(self) -> None:
        """Empty every queue (between setups; no worker runs then)."""
        with self.celery.connection_for_write() as conn:
            channel = conn.default_channel
            for queue in ("sync", "spam"):
                channel.queue_purge(queue)

    def sample(self) -> tuple[float | None, str]:
        """Dispatch one verify, wait for it to start and to finish; returns (queue wait in
        seconds, or None when it did not start within the cap; final state)."""
        result = dispatch(
            self.celery,
            self.sessions,
            type="verify",
            tenant_id=self.owner.tenant_id,
            user_id=self.owner.user_id,
            account_id=self.owner.account_id,
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
                    # The rest of the attempt gets its own budget: only the wait is capped.
                    deadline = time.monotonic() + self.cap
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
    that consume ``spam`` are stopped while the backlog is published, the others keep
    running. Returns the cases and the publish rate."""
    print(f"{setup} …", flush=True)
    workers = [bench.worker(queues, "-".join(queues)) for queues in queues_per_worker]
    spam_consumers = [w for w in workers if "spam" in w.queues]
    others = [w for w in workers if "spam" not in w.queues]
    with running(*others):
        with running(*spam_consumers):
            bench.warm_up()
            empty = bench.run_case(setup, "(a) empty system", args.samples)
        print(f"  publishing {args.backlog:,} check_spam messages (no spam consumer runs) …", flush=True)
        rate = bench.publish_spam(args.backlog)
        # No warm-up here: it would wait out the backlog where the backlog blocks sync.
        with running(*spam_consumers):
            loaded = bench.run_case(
                setup, f"(b) {args.backlog:,} spam queued, spam consumer busy", args.samples
            )
    bench.purge()
    return [empty, loaded], rate


SETUPS: list[tuple[str, list[list[str]]]] = [
    ("separate workers (-Q sync, -Q spam)", [["sync"], ["spam"]]),
    ("one shared worker (-Q sync,spam)", [["sync", "spam"]]),
    ("one shared worker (-Q spam,sync)", [["spam", "sync"]]),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20, help="verify tasks per case (20)")
    parser.add_argument("--backlog", type=int, default=10_000, help="spam messages queued in (b) (10,000)")
    parser.add_argument("--cap", type=float, default=30.0, help="longest wait per sample, seconds (30)")
    parser.add_argument("--no-shared", action="store_true", help="skip the shared-worker contrasts")
    args = parser.parse_args(argv)

    with BenchEnvironment(dovecot=True, smtp=True) as env:
        bench = Bench(env, env.create_owner(env.sessions()), args.cap)
        cases: list[Case] = []
        publish_rates: list[float] = []
        for setup, queues_per_worker in SETUPS[:1] if args.no_shared else SETUPS:
            measured, rate = measure_setup(bench, setup, queues_per_worker, args)
            cases += measured
            publish_rates.append(rate)
    report(args, cases, publish_rates)


def wait_cell(case: Case, seconds: float, cap: float) -> str:
    """Milliseconds; "≥" when the value is a capped sample's (the real wait was longer)."""
    return ("≥ " if case.capped and seconds >= cap else "") + fmt(seconds * 1000, 1)


def report(args: argparse.Namespace, cases: list[Case], publish_rates: list[float]) -> None:
    rows: list[list[str]] = []
    for empty, loaded in zip(cases[::2], cases[1::2], strict=True):
        for case in (empty, loaded):
            backlog = f"{max(case.backlog):,} → {min(case.backlog):,}" if any(case.backlog) else "0"
            rows.append(
                [
                    case.setup if case is empty else "",
                    case.label,
                    str(len(case.waits)) + (f" ({case.capped} capped)" if case.capped else ""),
                    wait_cell(case, case.median, args.cap),
                    wait_cell(case, case.p95, args.cap),
                    wait_cell(case, max(case.waits, default=math.nan), args.cap),
                    backlog,
                    fmt(case.drain_rate, 0),
                    fmt(case.machine_cores, 2),
                ]
            )
        capped = "≥ " if loaded.capped else ""
        rows.append(
            [
                "",
                "ratio (b) / (a)",
                "",
                capped + fmt(ratio(loaded.median, empty.median), 2),
                capped + fmt(ratio(loaded.p95, empty.p95), 2),
                *[""] * 4,
            ]
        )
    print_table(
        "Queue wait of a sync-queue task (verify): task record started_at − created_at, one task "
        f"at a time; waits capped at {args.cap:g} s (a capped sample ends its case)",
        [
            "setup",
            "case",
            "samples",
            "median ms",
            "p95 ms",
            "max ms",
            "spam backlog",
            "spam drained/s",
            "machine busy (cores)",
        ],
        rows,
        left=2,
    )
    print()
    rates = ", ".join(f"{rate:,.0f}" for rate in publish_rates)
    print(f"spam backlog published by one producer (send_task) at {rates} msg/s")
    print("goal: ratio (b)/(a) near 1 with separate workers")
    for case in cases:
        if case.failures:
            states = ", ".join(sorted(set(case.failures)))
            print(f"{case.setup} {case.label}: verify ended {states} in {len(case.failures)} samples")
        if case.capped:
            print(
                f"{case.setup} {case.label}: {case.capped} sample(s) did not start within "
                f"{args.cap:g} s and count as {args.cap:g} s"
            )


if __name__ == "__main__":
    main()
