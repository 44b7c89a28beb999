"""Benchmark of sending: ``POST /api/accounts/{id}/send`` end to end.

The API runs under gunicorn as deployed (deploy/api.yaml); one send worker (prefork,
``--concurrency`` pool children, by default as many as deploy/worker-send.yaml runs) sends
to a private aiosmtpd and files each Sent copy in a private Dovecot; the
account's Sent folder is synced first, so every copy is also stored as a message row.
Each figure is printed beside its reference, measured in the same run:

1. end to end: messages/s from the first request until every outbox row is ``sent``
   (``--messages`` requests from 16 client threads), beside raw aiosmtplib sending the same
   bytes on one reused connection to the same aiosmtpd (goal: >= 100/s on 2 cores). The
   client shares the 2 cores with what it measures, so it is kept light: one keep-alive
   http.client connection per thread sending the bytes ``requests`` would send (same
   headers, JSON bodies serialised before the phase starts), every answer checked to be
   202; its own CPU per message is printed beside the others';
2. the 202's p50 and p99 latency at a fixed offered load (``--rate`` requests/s for
   ``--duration`` s, open loop, latency counted from each request's due time; the same
   light client, one connection per pool thread), beside ``GET /healthz`` at the same load
   (goal: 202 p99 < 25 ms at 50 requests/s). The send
   worker keeps sending meanwhile on the same 2 cores; then with the send worker at
   niceness 5 (as ``mailroom run`` runs its workers beside the API, MAILROOM_WORKER_NICE:
   it sends meanwhile with the CPU the API leaves); then once more with the send
   worker stopped (SIGSTOP, its messages wait in the broker and are sent afterwards): the
   API's own latency, as where API pods have CPU of their own.

Beside them, where the CPU went during the end-to-end phase: PostgreSQL transactions
committed per message (exact, whatever else the machine runs), CPU milliseconds per message
of each part (the API, the send worker, PostgreSQL, Dovecot, the SMTP server, Redis),
their sum, the bench client's own CPU per message (apart from the sum), and how much of
the machine the client and others used meanwhile (and the load average
before and after the run). CPU per message changes
little when the machine is shared, while messages/s does; 2 cores give 2,000 CPU ms per
second, so the sum bounds what the whole stack can reach on this machine.

Run: ``.venv/bin/python bench/bench_send.py [--messages 1000] [--rate 50] [--duration 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib
import psutil
import requests
import yaml
from sqlalchemy import func, select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from bench.environment import (  # noqa: E402
    SMTP_LOGIN,
    BenchEnvironment,
    fmt,
    machine_busy_seconds,
    percentile,
    print_table,
)
from bench.loadgen import Gunicorn, HttpStatusError, KeepAliveClient, run_fixed_rate  # noqa: E402
from mailroom.launcher import WORKERS_NICE  # noqa: E402
from services.models import OutboxEntry  # noqa: E402
from tests.servers.workers import CeleryWorker  # noqa: E402

CLIENT_THREADS = 16
BENCH_SETTINGS = {"rate_limit_enabled": False, "max_tasks_in_flight_per_queue": 100_000}


def body(n: int) -> dict[str, Any]:
    return {
        "to": [{"email": f"rcpt{n % 50}@example.test", "name": f"Recipient {n % 50}"}],
        "subject": f"Bench message {n}",
        "text": "Hello,\n\n" + "This is a benchmark message body line.\n" * 40,
    }


def json_bodies(count: int) -> list[bytes]:
    """The bodies of sends 0 .. ``count - 1``, serialised as ``requests`` serialises them."""
    return [json.dumps(body(n), allow_nan=False).encode() for n in range(count)]


@dataclass
class ClosedLoop:
    """What post_many measured: each request's latency, and the CPU seconds its client
    threads used (the load generator's own share of the machine)."""

    latencies: list[float]
    client_cpu: float


def post_many(url: str, key: str, bodies: list[bytes]) -> ClosedLoop:
    """POST each of ``bodies`` from CLIENT_THREADS threads, each on its own keep-alive
    connection; every answer must be 202."""
    latencies: list[float] = []
    cpu: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    counter = iter(bodies)
    path = urlsplit(url).path

    def worker() -> None:
        cpu_started = time.thread_time()
        client = KeepAliveClient(url, {"Authorization": f"Bearer {key}"})
        mine: list[float] = []
        try:
            for payload in iter(lambda: next(counter, None), None):
                started = time.perf_counter()
                status, answer = client.request("POST", path, payload)
                if status != 202:
                    raise RuntimeError(f"send answered {status}: {answer[:300]!r}")
                mine.append(time.perf_counter() - started)
        except BaseException as exc:
            failures.append(exc)
        finally:
            client.close()
            with lock:
                latencies.extend(mine)
                cpu.append(time.thread_time() - cpu_started)

    threads = [threading.Thread(target=worker) for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return ClosedLoop(latencies, sum(cpu))


def wait_all_sent(env: BenchEnvironment, account_id: str, count: int, timeout: float = 600) -> None:
    sessions = env.sessions()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            done = session.scalar(
                select(func.count()).where(OutboxEntry.account_id == account_id, OutboxEntry.state == "sent")
            )
            failed = session.scalar(
                select(func.count()).where(
                    OutboxEntry.account_id == account_id, OutboxEntry.state == "failed"
                )
            )
        if failed:
            raise RuntimeError(f"{failed} sends failed")
        if done == count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"only {done} of {count} sent within {timeout} s")


def tree_cpu_seconds(roots: list[int | None]) -> float:
    """CPU seconds (user + system) used so far by the processes ``roots`` and their
    descendants (and their reaped children)."""
    seen: set[int] = set()
    total = 0.0
    for root in roots:
        if root is None:
            continue
        try:
            procs = [psutil.Process(root)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


#: PostgreSQL 15 flushes a busy backend's statistics at most every second and an idle one's
#: within 10 s: wait this long before reading pg_stat_database.
PG_STATS_SETTLE_SECONDS = 11.5


def pg_commits(env: BenchEnvironment) -> int:
    """Transactions committed so far in the bench's database (each ``SELECT 1`` a pool
    ping runs in autocommit counts as one)."""
    with env.sessions()() as session:
        query = text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        return int(session.scalar(query) or 0)


def postmaster_pid(env: BenchEnvironment) -> int | None:
    assert env.postgres is not None
    pid_file = env.postgres.data_dir / "postmaster.pid"
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def raw_smtp(port: int, raw: bytes, count: int) -> float:
    """Messages/s of aiosmtplib sending ``raw`` ``count`` times on one connection."""

    async def run() -> float:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False)
        await client.connect()
        await client.login(*SMTP_LOGIN)
        started = time.perf_counter()
        for _ in range(count):
            await client.sendmail("bench@example.test", ["rcpt@example.test"], raw)
        elapsed = time.perf_counter() - started
        await client.quit()
        return count / elapsed

    return asyncio.run(run())


def shipped_send_concurrency() -> int:
    """The send worker's ``--concurrency`` in deploy/worker-send.yaml."""
    for doc in yaml.safe_load_all((ROOT / "deploy" / "worker-send.yaml").read_text()):
        pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            argv = [str(a) for a in container.get("command", [])]
            if "--concurrency" in argv:
                return int(argv[argv.index("--concurrency") + 1])
    raise LookupError("deploy/worker-send.yaml has no worker --concurrency")


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--concurrency", type=int, default=shipped_send_concurrency(), help="send worker pool children"
    )
    args = parser.parse_args()
    load_before = load_average()

    with (
        BenchEnvironment(dovecot=True, smtp=True, **BENCH_SETTINGS) as env,
        tempfile.TemporaryDirectory() as tmp,
    ):
        assert env.smtp is not None
        owner = env.create_owner(env.sessions())
        api = Gunicorn(env, Path(tmp))
        env.add_cleanup(api.stop)
        api.start()
        subprocess_env = env.subprocess_env()
        sync = CeleryWorker(["sync"], env=subprocess_env, name="bench-sync", log_dir=tmp)
        send = CeleryWorker(
            ["send"], env=subprocess_env, concurrency=args.concurrency, name="bench-send", log_dir=tmp
        )
        for worker in (sync, send):
            env.add_cleanup(worker.stop)
            worker.start()
        headers = {"Authorization": f"Bearer {owner.api_key}"}
        base = f"{api.url}/api/accounts/{owner.account_id}"
        task_id = requests.post(f"{base}/sync", headers=headers, timeout=30).json()["task_id"]
        while (
            requests.get(f"{api.url}/api/tasks/{task_id}", headers=headers, timeout=30).json()["state"]
            != "succeeded"
        ):
            time.sleep(0.1)
        # Warm up: pool children, connections, caches.
        post_many(f"{base}/send", owner.api_key, json_bodies(20))
        wait_all_sent(env, owner.account_id, 20)

        env.smtp.clear()
        assert env.dovecot is not None and env.redis is not None and api.proc is not None
        parts: dict[str, list[int | None]] = {
            "API (gunicorn)": [api.proc.pid],
            "send worker": [send.pid],
            "PostgreSQL": [postmaster_pid(env)],
            "Dovecot": [env.dovecot.pid],
            "SMTP server": [env.smtp.pid],
            "Redis": [env.redis.pid],
        }
        time.sleep(PG_STATS_SETTLE_SECONDS)
        commits_before = pg_commits(env)
        cpu_before = {name: tree_cpu_seconds(pids) for name, pids in parts.items()}
        bodies = json_bodies(args.messages)
        busy_before = machine_busy_seconds()
        started = time.perf_counter()
        closed = post_many(f"{base}/send", owner.api_key, bodies)
        latencies = closed.latencies
        accepted_in = time.perf_counter() - started
        wait_all_sent(env, owner.account_id, args.messages + 20)
        elapsed = time.perf_counter() - started
        end_to_end = args.messages / elapsed
        busy = machine_busy_seconds() - busy_before
        cpu_ms = {
            name: (tree_cpu_seconds(pids) - cpu_before[name]) * 1000 / args.messages
            for name, pids in parts.items()
        }
        time.sleep(PG_STATS_SETTLE_SECONDS)
        # The polling of wait_all_sent reads in transactions that roll back: not counted.
        commits_per_message = (pg_commits(env) - commits_before) / args.messages
        received = env.smtp.received()
        assert len(received) == args.messages, len(received)
        raw_rate = raw_smtp(env.smtp.port, received[0]["data"], args.messages)

        fixed = run_fixed_rate(
            "send",
            lambda: _send_call(f"{base}/send", owner.api_key),
            args.rate,
            args.duration,
        )
        health = run_fixed_rate(
            "healthz", lambda: _get_call(f"{api.url}/healthz", 200), args.rate, args.duration
        )
        # The same load with the send worker at niceness 5 (as `mailroom run` runs its
        # workers on the API's machine: MAILROOM_WORKER_NICE): it sends meanwhile with the CPU
        # the API leaves.
        with niced(send.pid, WORKERS_NICE):
            nice = run_fixed_rate(
                f"send, send worker at niceness {WORKERS_NICE}",
                lambda: _send_call(f"{base}/send", owner.api_key),
                args.rate,
                args.duration,
            )
        # The same load with the send worker stopped (SIGSTOP; its messages wait in the
        # broker): the API's own latency, as where API and workers do not share 2 cores.
        with suspended(send.pid):
            alone = run_fixed_rate(
                "send, send worker stopped",
                lambda: _send_call(f"{base}/send", owner.api_key),
                args.rate,
                args.duration,
            )
        wait_all_sent(env, owner.account_id, args.messages + 20 + fixed.ok + nice.ok + alone.ok, timeout=900)

    p50, p99 = (percentile(fixed.latencies, q) * 1000 for q in (50, 99))
    health_p99 = percentile(health.latencies, 99) * 1000
    print_table(
        f"Send, {args.messages} messages (send worker: {args.concurrency} processes)",
        ["measure", "Mailroom", "reference"],
        [
            [
                "messages/s end to end (API → SMTP → Sent)",
                fmt(end_to_end),
                f"raw aiosmtplib, one connection: {fmt(raw_rate)}",
            ],
            ["requests/s accepted (202) by the API", fmt(args.messages / accepted_in), ""],
            [
                "202 p50 / p99 under closed-loop load",
                f"{fmt(percentile(latencies, 50) * 1000)} / {fmt(percentile(latencies, 99) * 1000)} ms",
                "",
            ],
            [
                f"202 p50 / p99 at {args.rate:g} requests/s offered",
                f"{fmt(p50)} / {fmt(p99)} ms",
                f"GET /healthz p99 at the same rate: {fmt(health_p99)} ms (goal: 202 p99 < 25 ms)",
            ],
            [
                f"  the same, send worker at niceness {WORKERS_NICE}",
                f"{fmt(percentile(nice.latencies, 50) * 1000)} / "
                f"{fmt(percentile(nice.latencies, 99) * 1000)} ms",
                "as mailroom run runs its workers beside the API",
            ],
            [
                "  the same, send worker stopped meanwhile",
                f"{fmt(percentile(alone.latencies, 50) * 1000)} / "
                f"{fmt(percentile(alone.latencies, 99) * 1000)} ms",
                "the API alone on the machine's CPU",
            ],
            ["load average (1 / 5 / 15 min) before, after", f"{load_before}, {load_average()}", ""],
        ],
    )
    ours = sum(cpu_ms.values()) * args.messages / 1000
    capacity = elapsed * (psutil.cpu_count() or 1)
    print_table(
        "CPU per message during the end-to-end phase",
        ["part", "CPU ms / message"],
        [
            *[[name, fmt(value, 2)] for name, value in cpu_ms.items()],
            ["sum", fmt(sum(cpu_ms.values()), 2)],
            [
                f"the bench's own client ({CLIENT_THREADS} threads; not in the sum)",
                fmt(closed.client_cpu * 1000 / args.messages, 2),
            ],
            ["PostgreSQL transactions committed per message (API and worker)", fmt(commits_per_message, 2)],
            [
                "machine busy meanwhile (all processes), of which the client, of which others",
                f"{fmt(100 * busy / capacity)} % / {fmt(100 * closed.client_cpu / capacity)} % / "
                f"{fmt(100 * max(0.0, busy - ours - closed.client_cpu) / capacity)} %",
            ],
        ],
    )
    print_table(
        f"Open loop at {args.rate:g} requests/s for {args.duration:g} s",
        ["route", "p50 ms", "p99 ms", "errors"],
        [
            [
                run.label,
                fmt(percentile(run.latencies, 50) * 1000),
                fmt(percentile(run.latencies, 99) * 1000),
                str(sum(run.errors.values())),
            ]
            for run in (fixed, health, nice, alone)
        ],
    )


@contextmanager
def niced(pid: int | None, niceness: int) -> Iterator[None]:
    """The process ``pid`` and its children at ``niceness`` for the block (as before after)."""
    before: list[tuple[psutil.Process, int]] = []
    if pid is not None:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            before.append((proc, proc.nice()))
            proc.nice(niceness)
    try:
        yield
    finally:
        for proc, value in before:
            with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.nice(value)


@contextmanager
def suspended(pid: int | None) -> Iterator[None]:
    """The process ``pid`` and its children stopped (SIGSTOP) for the block."""
    procs = []
    if pid is not None:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    for proc in procs:
        proc.suspend()
    try:
        yield
    finally:
        for proc in procs:
            try:
                proc.resume()
            except psutil.NoSuchProcess:
                pass


def _send_call(url: str, key: str):  # type: ignore[no-untyped-def]
    client = KeepAliveClient(url, {"Authorization": f"Bearer {key}"})
    path = urlsplit(url).path
    counter = iter(range(10**9))

    def call() -> None:
        status, _ = client.request("POST", path, json.dumps(body(next(counter)), allow_nan=False).encode())
        if status != 202:
            raise RuntimeError(f"send answered {status}")

    return call


def _get_call(url: str, expected: int):  # type: ignore[no-untyped-def]
    client = KeepAliveClient(url, {})
    path = urlsplit(url).path

    def call() -> None:
        status, _ = client.request("GET", path)
        if status != expected:
            raise HttpStatusError(status)

    return call


if __name__ == "__main__":
    main()
