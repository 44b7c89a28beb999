"""Benchmark of memory: the embedded stack (``mailroom run``) beside the per-queue layout.

Measures, in one run, RSS and PSS (``psutil`` ``memory_full_info``) summed over whole
process trees, the number of processes, and a per-process table:

1. ``mailroom run`` as ``make run`` ships it: a fresh temporary data dir as its working
   directory (so SQLite in ``var/``, its own private Redis, no ``.env``), no MAILROOM_* of
   the caller, no Flower; measured ``--idle-seconds`` after it prints "Mailroom is running".
   Every process of the tree is counted: the launcher, gunicorn, the worker host (a
   consumer per I/O-bound queue, webhooks included, Beat and the watcher), the spam
   worker, redis-server, and any other child the launcher starts. Goal: under 600 MiB RSS.
2. The same stack during a first sync of ``--messages`` (10,000) ~4 KB synthetic messages
   from a private Dovecot: the account is added through the stack's API with the admin key
   it printed, ``POST /api/accounts/{id}/sync``, the task polled until it ends. The tree is
   sampled every 100 ms; printed are its peak RSS and peak PSS and the sync's duration.
   Goal: under 700 MiB RSS.
3. The reference: the one-process-per-queue layout production runs (the commands of
   ``deploy/worker-*.yaml``, ``deploy/beat.yaml``, ``deploy/watcher.yaml`` and
   ``deploy/api.yaml``, read from those files: a prefork ``celery worker -Q <queue>`` per
   queue, here with ``--concurrency 1`` each, ``celery beat``, ``mailroom watcher``,
   gunicorn with 2 workers x 4 threads), with the containers' own
   environment entries (metrics directory, metrics port, heartbeat file), against its own
   private redis-server and a migrated SQLite file; idle, the same figures.
4. A summary: embedded against per-queue.

Both trees include their Redis. Every process is stopped at the end, also on an error,
Ctrl-C or SIGTERM.

Run: ``.venv/bin/python bench/bench_footprint.py [--messages 10000] [--idle-seconds 20]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [path for path in (str(ROOT), str(ROOT / "src")) if path not in sys.path]

from bench.environment import fmt, machine_busy_seconds, print_table  # noqa: E402
from services.db import make_engine  # noqa: E402
from services.migrate import upgrade  # noqa: E402
from services.settings import load_settings  # noqa: E402
from tests.servers import mailgen  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.ports import free_port  # noqa: E402
from tests.servers.processes import terminate_group  # noqa: E402
from tests.servers.redis import RedisServer  # noqa: E402

MIB = 2**20
IDLE_GOAL_MIB = 600
SYNC_GOAL_MIB = 700
SAMPLE_SECONDS = 0.1
START_TIMEOUT = 180.0
SYNC_TIMEOUT = 1800.0
RUNNING_LINE = "Mailroom is running"
KEY_LINE = re.compile(r"Admin key: (mr_[A-Za-z0-9_-]+)")
FINAL_STATES = {"succeeded", "failed", "cancelled"}
DEPLOY = ROOT / "deploy"


# -- measuring a process tree ------------------------------------------------------------


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    label: str
    rss: int
    pss: int


@dataclass
class Snapshot:
    """The memory of a tree at one moment."""

    rows: list[ProcessMemory]

    @property
    def rss(self) -> int:
        return sum(row.rss for row in self.rows)

    @property
    def pss(self) -> int:
        return sum(row.pss for row in self.rows)


def describe(argv: Sequence[str]) -> str:
    """A short name for a process of ours from its command line."""
    words = list(argv)
    if not words:
        return "?"
    words[0] = Path(words[0]).name
    if words[0].startswith("python"):
        words = words[2:] if words[1:2] == ["-m"] else words[1:]
    if not words:
        return "python"
    program = Path(words[0]).name.removesuffix(".cli")
    rest = words[1:]

    def option(name: str) -> str:
        return rest[rest.index(name) + 1] if name in rest[:-1] else ""

    if program == "redis-server":
        return "redis-server"
    if program == "gunicorn":
        return f"gunicorn {option('--workers')}x{option('--threads')} threads"
    if program == "celery":
        command = rest[2] if rest[:1] == ["-A"] and len(rest) > 2 else " ".join(rest[:1])
        queue, pool = option("-Q"), option("--pool") or option("-P")
        return " ".join(filter(None, ["celery", command, queue and f"-Q {queue}", pool and f"--pool {pool}"]))
    if program == "mailroom" and rest[:1] == ["worker-host"]:
        queues = [value.split(":")[0] for name, value in itertools.pairwise(rest) if name == "--queue"]
        extras = [name for flag, name in (("--beat", "Beat"), ("--watcher", "watcher")) if flag in rest]
        return "mailroom worker-host: " + ", ".join(queues) + "".join(f" + {name}" for name in extras)
    if program == "mailroom":
        return f"mailroom {' '.join(rest[:1])}".strip()
    return " ".join([program, *rest])[:60]


class ProcessTree:
    """The processes under some roots (each root and its descendants), remembered as seen,
    so that whatever is left of them can be killed at the end."""

    def __init__(self, roots: Sequence[int]) -> None:
        self.roots = [psutil.Process(pid) for pid in roots]
        self.seen: dict[int, psutil.Process] = {}

    def members(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for root in self.roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                if root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
                    found[root.pid] = root
                for child in root.children(recursive=True):
                    found.setdefault(child.pid, child)
        for pid, proc in found.items():
            self.seen.setdefault(pid, proc)
        return [self.seen[pid] for pid in sorted(found)]

    def snapshot(self) -> Snapshot:
        procs = self.members()
        argv: dict[int, list[str]] = {}
        memory: dict[int, Any] = {}
        parent: dict[int, int] = {}
        for proc in procs:
            try:
                with proc.oneshot():
                    argv[proc.pid] = proc.cmdline()
                    parent[proc.pid] = proc.ppid()
                    memory[proc.pid] = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        rows = []
        for pid, info in memory.items():
            label = describe(argv[pid])
            forked_from_same = argv.get(parent[pid]) == argv[pid]
            forks_same = any(argv.get(p) == argv[pid] and parent.get(p) == pid for p in argv)
            if forked_from_same:
                label += " (worker)" if label.startswith("gunicorn") else " (pool child)"
            elif forks_same:
                label += " (master)" if label.startswith("gunicorn") else " (main)"
            rows.append(ProcessMemory(pid, label, int(info.rss), int(getattr(info, "pss", 0))))
        return Snapshot(rows)

    def kill_leftovers(self) -> None:
        """SIGKILL every process ever seen in the tree that still runs (psutil checks the
        start time, so a pid reused by a stranger is not touched), and the group of each
        that leads one (a pool child forked after the last look is in its parent's group)."""
        for proc in self.seen.values():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.is_running():
                    if os.getpgid(proc.pid) == proc.pid:
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.kill()


@dataclass
class Peak:
    """Peaks of a tree sampled every ``SAMPLE_SECONDS``."""

    samples: int = 0
    rss: int = 0
    pss: int = 0
    processes: int = 0
    per_process: dict[int, ProcessMemory] = field(default_factory=dict)

    def add(self, snap: Snapshot) -> None:
        self.samples += 1
        self.rss, self.pss = max(self.rss, snap.rss), max(self.pss, snap.pss)
        self.processes = max(self.processes, len(snap.rows))
        for row in snap.rows:
            old = self.per_process.get(row.pid)
            if old is None:
                self.per_process[row.pid] = row
            else:
                self.per_process[row.pid] = ProcessMemory(
                    row.pid, row.label, max(old.rss, row.rss), max(old.pss, row.pss)
                )


@contextlib.contextmanager
def sampling(tree: ProcessTree) -> Iterator[Peak]:
    peak = Peak()
    stop = threading.Event()

    def run() -> None:
        while True:
            started = time.monotonic()
            peak.add(tree.snapshot())
            if stop.wait(max(0.0, SAMPLE_SECONDS - (time.monotonic() - started))):
                return

    thread = threading.Thread(target=run, name="memory-sampler", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
    peak.add(tree.snapshot())


def mib(value: int) -> str:
    return fmt(value / MIB, 1)


def print_snapshot(title: str, rows: Sequence[ProcessMemory], rss_header: str = "RSS MiB") -> None:
    ordered = sorted(rows, key=lambda row: row.rss, reverse=True)
    body = [[row.label, str(row.pid), mib(row.rss), mib(row.pss)] for row in ordered]
    body.append(
        [f"total ({len(rows)} processes)", "", mib(sum(r.rss for r in rows)), mib(sum(r.pss for r in rows))]
    )
    print_table(title, ["process", "pid", rss_header, rss_header.replace("RSS", "PSS")], body)


# -- the embedded stack --------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """Ours without any MAILROOM_* or PROMETHEUS_* of the caller."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MAILROOM_", "PROMETHEUS_"))}


class EmbeddedRun:
    """``mailroom run`` as ``make run`` starts it, in ``data_dir`` as working directory (its
    SQLite database goes to ``var/`` there, and no ``.env`` of the checkout is read)."""

    def __init__(self, data_dir: Path, port: int) -> None:
        script = Path(sys.executable).parent / "mailroom"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "mailroom.cli"]
        self.port = port
        self.proc = subprocess.Popen(
            [*command, "run", "--port", str(port)], cwd=data_dir, env=clean_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.tree = ProcessTree([self.proc.pid])
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_running(self) -> str:
        """Wait for the banner; returns the admin key it shows."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.tree.members()  # remember the children as they appear
            if RUNNING_LINE in self.output:
                key = KEY_LINE.search(self.output)
                if key:
                    return key.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"mailroom run did not start (exit {self.proc.poll()}):\n{self.output[-4000:]}")

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; whatever is left after 40 s is killed."""
        self.tree.members()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=40)
        if self.proc.poll() is None:
            print("mailroom run did not stop within 40 s; killing it", flush=True)
        self.tree.kill_leftovers()
        terminate_group(self.proc, timeout=0)  # type: ignore[arg-type]
        self._reader.join(timeout=5)


# -- the per-queue reference ---------------------------------------------------------------


def deploy_container(path: Path) -> dict[str, Any]:
    """The first container of the Deployment in a manifest file (which may hold more)."""
    documents = yaml.safe_load_all(path.read_text())
    deployment = next(doc for doc in documents if doc and doc["kind"] == "Deployment")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


class PerQueueLayout:
    """The processes production runs, one per queue as in ``deploy/``, started here as
    subprocesses (each its own process group) against ``redis_url`` and a SQLite file."""

    def __init__(self, directory: Path, redis: RedisServer) -> None:
        self.dir = directory
        self.port = free_port()
        database = directory / "mailroom.db"
        assert redis.password is not None
        self.env = {
            **clean_env(),
            "PYTHONUNBUFFERED": "1",
            "MAILROOM_DATABASE_URL": f"sqlite:///{database}",
            "MAILROOM_BROKER_URL": f"redis://{redis.host}:{redis.port}/0",
            "MAILROOM_BROKER_PASSWORD": redis.password,
            "MAILROOM_RESULT_BACKEND_URL": f"redis://{redis.host}:{redis.port}/1",
            "MAILROOM_RESULT_BACKEND_PASSWORD": redis.password,
        }
        settings = load_settings(database_url=f"sqlite:///{database}")
        engine = make_engine(settings)
        upgrade(engine)
        engine.dispose()
        settings.encryption_keys()  # the key file, before the processes race to make it
        self.redis = redis
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def _argv(self, command: Sequence[str], role_dir: Path) -> list[str]:
        module = "mailroom.cli" if command[0] == "mailroom" else command[0]  # the console script
        argv = [sys.executable, "-m", module, *command[1:]]
        for position, word in enumerate(argv):
            follows = argv[position - 1]
            if follows == "--concurrency" or follows == "-c":
                argv[position] = "1"
            elif follows == "--bind":
                argv[position] = f"127.0.0.1:{self.port}"
            elif follows == "--schedule":
                argv[position] = str(role_dir / Path(word).name)
        return argv

    def _container_env(self, container: dict[str, Any], role_dir: Path) -> dict[str, str]:
        """The container's own ``env`` entries, its /tmp paths moved into ``role_dir`` and
        its metrics port made a free one (each pod has its own in production)."""
        env: dict[str, str] = {}
        for entry in container.get("env", []):
            value = str(entry.get("value", ""))
            if value.startswith("/tmp/"):
                value = str(role_dir / value.removeprefix("/tmp/"))
                if entry["name"] == "PROMETHEUS_MULTIPROC_DIR":
                    Path(value).mkdir(parents=True, exist_ok=True)
            elif entry["name"].endswith("_PORT"):
                value = str(free_port())
            env[entry["name"]] = value
        return env

    def start(self) -> None:
        manifests = [*sorted(DEPLOY.glob("worker-*.yaml")), DEPLOY / "beat.yaml", DEPLOY / "watcher.yaml"]
        manifests.append(DEPLOY / "api.yaml")
        for path in manifests:
            role = path.stem
            role_dir = self.dir / role
            role_dir.mkdir()
            container = deploy_container(path)
            argv = self._argv(container["command"], role_dir)
            log = role_dir / "output.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    argv, cwd=self.dir, env={**self.env, **self._container_env(container, role_dir)},
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            self.procs.append((role, proc, log))
        self.tree = ProcessTree([self.redis.pid or 0, *(proc.pid for _, proc, _ in self.procs)])
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = {role for role, _, _ in self.procs}
        while pending:
            for role, proc, log in self.procs:
                if role not in pending:
                    continue
                text = log.read_text(errors="replace")
                if proc.poll() is not None:
                    raise RuntimeError(f"{role} exited with {proc.returncode}:\n{text[-3000:]}")
                if role == "api":
                    with contextlib.suppress(requests.RequestException):
                        if requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).ok:
                            pending.discard(role)
                elif (
                    (role == "beat" and "beat: Starting" in text)
                    or (role == "watcher" and re.search(r"watcher \S+ started", text))
                    or re.search(r"@\S+ ready\.", text)
                ):
                    pending.discard(role)
            self.tree.members()
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {START_TIMEOUT:g} s: {', '.join(sorted(pending))}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Warm shutdown of every process (SIGTERM), SIGKILL of each group after 15 s."""
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.procs:
            terminate_group(proc, timeout=15)  # type: ignore[arg-type]
        if hasattr(self, "tree"):
            self.tree.kill_leftovers()


# -- the sync through the embedded stack's API -----------------------------------------------


def seed_messages(count: int, size: int) -> list[bytes]:
    base = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    return [
        mailgen.message(
            f"Weekly report {n} — status",
            f"Hello,\n\nhere is report {n}.",
            sender=f"Colleague {n % 50} <colleague{n % 50}@example.com>",
            to=["me@example.com", "team@example.com"],
            cc="boss@example.com" if n % 3 == 0 else None,
            date=base + timedelta(minutes=n),
            message_id=f"<footprint-{n}-{uuid.uuid4().hex[:6]}@bench>",
            size_hint=size,
        )
        for n in range(count)
    ]


@dataclass
class SyncOutcome:
    task: dict[str, Any]
    wall_seconds: float

    @property
    def worker_seconds(self) -> float:
        """started_at → finished_at of the task record."""
        started, finished = self.task.get("started_at"), self.task.get("finished_at")
        if not started or not finished:
            return float("nan")
        return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()


def first_sync(base: str, key: str, dovecot: DovecotServer, login: tuple[str, str]) -> SyncOutcome:
    """Add the account through the API, queue its sync and poll the task until it ends."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    body: dict[str, Any] = {
        "email": f"{login[0]}@example.test",
        "name": "Footprint mailbox",
        "imap": {"host": "127.0.0.1", "port": dovecot.port, "tls": "none",
                 "username": login[0], "password": login[1]},
        "smtp": {"host": "127.0.0.1", "port": 9, "tls": "none", "username": login[0], "password": login[1]},
    }  # fmt: skip
    created = http.post(f"{base}/api/accounts", json=body, timeout=30)
    created.raise_for_status()
    account_id = created.json()["id"]
    started = time.monotonic()
    queued = http.post(f"{base}/api/accounts/{account_id}/sync", timeout=30)
    queued.raise_for_status()
    task_id = queued.json()["task_id"]
    deadline = started + SYNC_TIMEOUT
    while time.monotonic() < deadline:
        answer = http.get(f"{base}/api/tasks/{task_id}", timeout=30)
        if answer.status_code == 429:  # the rate limiter: wait as it says
            time.sleep(float(answer.headers.get("Retry-After", "1")))
            continue
        answer.raise_for_status()
        task: dict[str, Any] = answer.json()
        if task["state"] in FINAL_STATES:
            return SyncOutcome(task, time.monotonic() - started)
        time.sleep(0.5)
    raise RuntimeError(f"the sync did not end within {SYNC_TIMEOUT:g} s")


# -- the run --------------------------------------------------------------------------------


def _stop_on_sigterm() -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    # Also when started from a shell that made SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=4096, help="bytes per synthetic message")
    args = parser.parse_args(argv)
    _stop_on_sigterm()

    print(
        f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"load average {os.getloadavg()[0]:.2f} at the start (the machine is shared: other work "
        "may run meanwhile)",
        flush=True,
    )
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="mailroom-footprint-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)

        dovecot = DovecotServer().start()
        stack.callback(dovecot.cleanup)
        login = (f"u{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex[:10]}")
        dovecot.add_user(*login)
        started = time.perf_counter()
        dovecot.append_messages(*login, "INBOX", seed_messages(args.messages, args.size))
        print(
            f"seeded {args.messages:,} messages of ~{args.size:,} B in {time.perf_counter() - started:.1f} s"
        )

        # 1. the embedded stack, idle
        embedded_dir = work / "embedded"
        embedded_dir.mkdir()
        run = EmbeddedRun(embedded_dir, free_port())
        stack.callback(run.stop)
        print("starting mailroom run …", flush=True)
        started = time.perf_counter()
        key = run.wait_running()
        print(
            f"  running after {time.perf_counter() - started:.1f} s; idle for {args.idle_seconds:g} s",
            flush=True,
        )
        busy = machine_busy_seconds()
        time.sleep(args.idle_seconds)
        embedded_idle = run.tree.snapshot()
        idle_busy = machine_busy_seconds() - busy
        print_snapshot(
            f"1. mailroom run, idle {args.idle_seconds:g} s after it said it is running", embedded_idle.rows
        )
        print(f"machine CPU busy meanwhile: {idle_busy:.1f} CPU-s in {args.idle_seconds:g} s (all processes)")

        # 2. the same stack during a first sync
        print(f"\nfirst sync of {args.messages:,} messages through http://127.0.0.1:{run.port} …", flush=True)
        busy = machine_busy_seconds()
        with sampling(run.tree) as peak:
            outcome = first_sync(f"http://127.0.0.1:{run.port}", key, dovecot, login)
        sync_busy = machine_busy_seconds() - busy
        task = outcome.task
        if task["state"] != "succeeded":
            raise RuntimeError(f"the sync ended {task['state']}: {task.get('error')}")
        new = (task.get("result") or {}).get("new")
        print_snapshot(
            f"2. mailroom run during the first sync: peak of each process ({peak.samples} samples, "
            f"every {SAMPLE_SECONDS * 1000:.0f} ms)",
            list(peak.per_process.values()),
            "peak RSS MiB",
        )
        print(
            f"peak of the tree: RSS {mib(peak.rss)} MiB, PSS {mib(peak.pss)} MiB (sums at one sample; "
            f"the per-process peaks above may fall at different moments)"
        )
        print(
            f"sync: {new} new messages; {outcome.wall_seconds:.1f} s from POST .../sync to the task's "
            f"end as polled, {outcome.worker_seconds:.1f} s started → finished in the task record "
            f"({fmt(args.messages / outcome.worker_seconds, 0)} msg/s); machine CPU busy meanwhile "
            f"{sync_busy:.1f} CPU-s"
        )
        run.stop()

        # 3. the per-queue reference
        redis = RedisServer(password=uuid.uuid4().hex).start()
        stack.callback(redis.cleanup)
        reference_dir = work / "per-queue"
        reference_dir.mkdir()
        layout = PerQueueLayout(reference_dir, redis)
        stack.callback(layout.stop)
        print("\nstarting the per-queue layout of deploy/ …", flush=True)
        started = time.perf_counter()
        layout.start()
        print(
            f"  ready after {time.perf_counter() - started:.1f} s; idle for {args.idle_seconds:g} s",
            flush=True,
        )
        busy = machine_busy_seconds()
        time.sleep(args.idle_seconds)
        reference_idle = layout.tree.snapshot()
        ref_busy = machine_busy_seconds() - busy
        print_snapshot(
            "3. per-queue layout (deploy/: worker-*.yaml with -c 1, beat, watcher, gunicorn 2x4), idle",
            reference_idle.rows,
        )
        print(f"machine CPU busy meanwhile: {ref_busy:.1f} CPU-s in {args.idle_seconds:g} s (all processes)")
        layout.stop()

        # 4. summary
        print_table(
            "4. Summary (MiB; each tree includes its Redis; load average now "
            f"{os.getloadavg()[0]:.2f} on a shared machine)",
            ["layout", "RSS", "PSS", "processes", "goal (RSS)"],
            [
                ["embedded (mailroom run), idle", mib(embedded_idle.rss), mib(embedded_idle.pss),
                 str(len(embedded_idle.rows)), f"< {IDLE_GOAL_MIB}"],
                [f"embedded, peak during a {args.messages:,}-message first sync", mib(peak.rss),
                 mib(peak.pss), str(peak.processes), f"< {SYNC_GOAL_MIB}"],
                ["per-queue (deploy/, -c 1 each), idle", mib(reference_idle.rss), mib(reference_idle.pss),
                 str(len(reference_idle.rows)), ""],
                ["embedded idle / per-queue idle", f"{embedded_idle.rss / reference_idle.rss:.2f}",
                 f"{embedded_idle.pss / reference_idle.pss:.2f}",
                 f"{len(embedded_idle.rows) / len(reference_idle.rows):.2f}", ""],
            ],
        )  # fmt: skip


if __name__ == "__main__":
    main()
