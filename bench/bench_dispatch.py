"""Benchmark of the dispatch path: ``POST /api/accounts/{id}/verify`` under concurrent load.

The API runs under gunicorn (2 workers x 8 threads) against a private PostgreSQL and a
private Redis; no Celery worker runs, so every accepted task just stays queued. Each request
goes through authentication (API key lookup), the ownership check of the account, writing
the task record, commit, and publishing the message.

References measured in the same run, with the same settings and broker:

1. raw ``send_task`` of the same task (same kwargs, queue, priority) from one thread, and
   from 8 threads of one process: the broker's publish floor;
2. ``tasks.dispatch.dispatch()`` called in-process from 8 threads: record + commit +
   publish without HTTP, auth or the ownership check;
3. ``GET /healthz`` under the same load: the floor of HTTP + gunicorn + Flask + requests.

The load generator (threads with ``requests.Session``) runs in this process and shares
the machine's cores with gunicorn, PostgreSQL and Redis; the CPU each used is printed too.

Run: ``.venv/bin/python bench/bench_dispatch.py [--duration 30] [--clients 50]``.
"""

from __future__ import annotations

import argparse
import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

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
from tasks.celery_app import make_celery  # noqa: E402
from tasks.dispatch import dispatch  # noqa: E402
from tasks.monitoring import get_queue_stats  # noqa: E402
from tasks.queues import TASK_TYPES, broker_priority, logical_priority  # noqa: E402
from tests.servers.ports import free_port  # noqa: E402
from tests.servers.processes import kill_group  # noqa: E402

GUNICORN_WORKERS = 2
GUNICORN_THREADS = 8
WARMUP_SECONDS = 3.0
WINDOW_SECONDS = 5.0


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Run:
    """What one load phase measured."""

    label: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    #: Completion times (seconds since the phase started) of successful calls.
    done_at: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: CPU seconds used during the phase, by component.
    cpu: dict[str, float] = field(default_factory=dict)
    #: Client connections each gunicorn worker held half-way through (HTTP phases).
    connections: list[int] = field(default_factory=list)
    #: CPU seconds by component in consecutive windows of WINDOW_SECONDS (HTTP phases).
    window_cpu: list[dict[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else math.nan

    def window_rates(self, width: float) -> list[float]:
        """Successful calls per second in consecutive windows of ``width`` seconds."""
        count = max(1, int(self.seconds // width))
        bins = [0] * count
        for t in self.done_at:
            index = int(t // width)
            if index < count:
                bins[index] += 1
        return [n / width for n in bins]


Call = Callable[[], None]


def run_load(label: str, make_call: Callable[[], Call], threads: int, seconds: float) -> Run:
    """Run ``threads`` threads, each calling its own ``make_call()`` in a loop for
    ``seconds``; a call that raises counts as an error named by its exception."""
    run = Run(label)
    lock = threading.Lock()
    start_barrier = threading.Barrier(threads + 1)
    started = 0.0
    deadline = 0.0

    def worker() -> None:
        call = make_call()
        latencies: list[float] = []
        done_at: list[float] = []
        errors: Counter[str] = Counter()
        start_barrier.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            try:
                call()
            except Exception as exc:
                errors[_error_name(exc)] += 1
                continue
            t1 = time.perf_counter()
            latencies.append(t1 - t0)
            done_at.append(t1 - started)
        with lock:
            run.latencies.extend(latencies)
            run.done_at.extend(done_at)
            run.errors.update(errors)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    started = time.perf_counter()
    deadline = started + seconds
    start_barrier.wait()
    for thread in pool:
        thread.join()
    run.seconds = time.perf_counter() - started
    return run


class HttpStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _error_name(exc: Exception) -> str:
    if isinstance(exc, HttpStatusError):
        return f"HTTP {exc.status}"
    return type(exc).__name__


def http_call(method: str, url: str, expected: int, headers: dict[str, str]) -> Callable[[], Call]:
    """A factory of calls, one ``requests.Session`` (keep-alive connection) per thread."""

    def make() -> Call:
        session = requests.Session()
        session.headers.update(headers)

        def call() -> None:
            response = session.request(method, url, timeout=30)
            if response.status_code != expected:
                raise HttpStatusError(response.status_code)

        return call

    return make


# -- CPU accounting --------------------------------------------------------------------


#: The key under which CpuMeter reports the whole machine's busy CPU seconds.
MACHINE = "machine"


class CpuMeter:
    """CPU seconds (user + system) of processes: this one alone (the load generator; its
    children gunicorn and Redis are counted apart), and the trees of gunicorn, PostgreSQL
    and Redis. Trees are re-read at every sample, so new backends and workers count. Also
    the whole machine's busy time, to show what else ran meanwhile (e.g. another test run).
    """

    def __init__(self, roots: dict[str, int], *, alone: set[str]) -> None:
        self.roots = roots
        self.alone = alone

    @staticmethod
    def _seconds(proc: psutil.Process) -> float:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return float(times.user + times.system)

    def _total(self, name: str) -> float:
        try:
            root = psutil.Process(self.roots[name])
            members = [root] if name in self.alone else [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        return sum(self._seconds(proc) for proc in members)

    def sample(self) -> dict[str, float]:
        return {MACHINE: machine_busy_seconds(), **{name: self._total(name) for name in self.roots}}

    @contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        before = self.sample()
        yield
        after = self.sample()
        into.update({name: after[name] - before[name] for name in after})


def sample_windows(
    meter: CpuMeter, width: float, stop: threading.Event, into: list[dict[str, float]]
) -> None:
    """Append the CPU seconds of every ``width``-second window to ``into`` until ``stop``."""
    last = meter.sample()
    while not stop.wait(width):
        now = meter.sample()
        into.append({name: now[name] - last[name] for name in now})
        last = now


def postmaster_pid(env: BenchEnvironment) -> int:
    assert env.postgres is not None
    return int((env.postgres.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def process_with_argument(text: str) -> int:
    """The pid of the process whose command line mentions ``text`` (redis-server shows
    ``redis-server HOST:PORT`` as its title)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(text in part for part in proc.info["cmdline"] or []):
            return int(proc.info["pid"])
    raise LookupError(f"no process mentions {text}")


# -- gunicorn ----------------------------------------------------------------------------


class Gunicorn:
    """``python -m gunicorn`` serving the API in its own process group."""

    def __init__(self, env: BenchEnvironment, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "gunicorn.log"
        self._env = env.subprocess_env()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(GUNICORN_WORKERS),
            "--threads",
            str(GUNICORN_THREADS),
            "--bind",
            f"127.0.0.1:{self.port}",
            # As in deploy/api.yaml; else gunicorn 27 listens on ~/.gunicorn/gunicorn.ctl,
            # one path shared by every gunicorn of this user.
            "--no-control-socket",
            "mailroom.app:create_app()",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gunicorn did not answer /healthz within 60 s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return sorted(child.pid for child in psutil.Process(self.proc.pid).children())

    def connections_per_worker(self) -> list[int]:
        """Established client connections on our port, per worker process."""
        counts = []
        for pid in self.worker_pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                conns = []
            counts.append(
                sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port)
            )
        return counts

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# -- the benchmark -----------------------------------------------------------------------


def publish_call(env: BenchEnvironment, owner: Owner) -> Callable[[], Call]:
    """Raw ``send_task`` of the message dispatch() publishes for a verify, without a record."""
    app = make_celery(env.settings)
    kind = TASK_TYPES["verify"]
    priority = broker_priority(logical_priority(kind.queue, from_beat=False))
    kwargs = {
        "tenant_id": owner.tenant_id,
        "user_id": owner.user_id,
        "account_id": owner.account_id,
        "params": {},
    }

    def make() -> Call:
        def call() -> None:
            app.send_task(
                kind.task_name,
                kwargs=kwargs,
                task_id=str(uuid.uuid4()),
                queue=kind.queue,
                routing_key=kind.queue,
                priority=priority,
                retry=False,
            )

        return call

    return make


def dispatch_call(env: BenchEnvironment, owner: Owner) -> Callable[[], Call]:
    """``tasks.dispatch.dispatch()`` of a verify, in this process (record + commit + publish)."""
    app = make_celery(env.settings)
    sessions = env.sessions()

    def make() -> Call:
        def call() -> None:
            dispatch(
                app,
                sessions,
                type="verify",
                tenant_id=owner.tenant_id,
                user_id=owner.user_id,
                account_id=owner.account_id,
                params={},
            )

        return call

    return make


def latency_cells(run: Run) -> list[str]:
    return [fmt(percentile(run.latencies, p) * 1000, 1) for p in (50, 90, 99)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per HTTP phase (30)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent HTTP clients (50)")
    parser.add_argument(
        "--reference-duration", type=float, default=5.0, help="seconds per in-process reference (5)"
    )
    parser.add_argument("--no-healthz", action="store_true", help="skip the GET /healthz reference")
    args = parser.parse_args(argv)

    with BenchEnvironment() as env, tempfile.TemporaryDirectory(prefix="mailroom-bench-") as tmp:
        sessions = env.sessions()
        http_owner = env.create_owner(sessions)
        reference_owner = env.create_owner(sessions)  # its own account: its records stay apart
        gunicorn = Gunicorn(env, Path(tmp))
        env.add_cleanup(gunicorn.stop)
        print(f"starting gunicorn ({GUNICORN_WORKERS} workers x {GUNICORN_THREADS} threads) …", flush=True)
        gunicorn.start()
        assert env.redis is not None
        roots = {"load generator": psutil.Process().pid}
        roots.update({f"gunicorn w{n}": pid for n, pid in enumerate(gunicorn.worker_pids(), 1)})
        roots["postgres"] = postmaster_pid(env)
        roots["redis"] = process_with_argument(f"{env.redis.host}:{env.redis.port}")
        meter = CpuMeter(roots, alone={"load generator"})
        runs: list[Run] = []

        def phase(
            label: str, make_call: Callable[[], Call], threads: int, seconds: float, *, http: bool
        ) -> Run:
            print(f"  {label}: {threads} threads for {seconds:g} s …", flush=True)
            cpu: dict[str, float] = {}
            connections: list[int] = []
            windows: list[dict[str, float]] = []
            stop = threading.Event()
            snapshot = threading.Timer(
                seconds / 2, lambda: connections.extend(gunicorn.connections_per_worker())
            )
            sampler = threading.Thread(target=sample_windows, args=(meter, WINDOW_SECONDS, stop, windows))
            if http:
                snapshot.start()
                sampler.start()
            with meter.measure(cpu):
                run = run_load(label, make_call, threads, seconds)
            snapshot.cancel()
            stop.set()
            if http:
                sampler.join()
            run.cpu, run.connections, run.window_cpu = cpu, connections, windows
            runs.append(run)
            return run

        print("in-process references (same broker and settings) …", flush=True)
        seconds = args.reference_duration
        raw_one = phase("raw send_task, 1 thread", publish_call(env, reference_owner), 1, seconds, http=False)
        raw_eight = phase(
            "raw send_task, 8 threads", publish_call(env, reference_owner), 8, seconds, http=False
        )
        phase("dispatch() in-process, 8 threads", dispatch_call(env, reference_owner), 8, seconds, http=False)

        auth = {"Authorization": f"Bearer {http_owner.api_key}"}
        verify = http_call("POST", f"{gunicorn.url}/api/accounts/{http_owner.account_id}/verify", 202, auth)
        print(f"HTTP load, {args.clients} clients (after a {WARMUP_SECONDS:g} s warm-up) …", flush=True)
        run_load("warm-up", verify, args.clients, WARMUP_SECONDS)
        healthz: Run | None = None
        if not args.no_healthz:
            healthz = phase(
                f"GET /healthz, {args.clients} clients",
                http_call("GET", gunicorn.url + "/healthz", 200, {}),
                args.clients,
                args.duration,
                http=True,
            )
        post = phase(f"POST …/verify, {args.clients} clients", verify, args.clients, args.duration, http=True)
        queued = get_queue_stats(make_celery(env.settings))["sync"]
        gunicorn.stop()
        log = gunicorn.log_text()

    report(args, runs, raw_one, raw_eight, healthz, post, queued, list(roots), log)


def report(
    args: argparse.Namespace,
    runs: list[Run],
    raw_one: Run,
    raw_eight: Run,
    healthz: Run | None,
    post: Run,
    queued: int,
    components: list[str],
    log: str,
) -> None:
    print_table(
        f"Dispatch path: POST /api/accounts/{{id}}/verify, gunicorn {GUNICORN_WORKERS} workers x "
        f"{GUNICORN_THREADS} threads, {args.clients} clients x {args.duration:g} s "
        f"(in-process references {args.reference_duration:g} s); {psutil.cpu_count()} cores shared by all",
        ["measurement", "calls/s", "p50 ms", "p90 ms", "p99 ms", "ok", "errors", "÷ raw 1 thread"],
        [
            [
                r.label,
                fmt(r.rate, 0),
                *latency_cells(r),
                f"{r.ok:,}",
                f"{sum(r.errors.values()):,}",
                fmt(ratio(r.rate, raw_one.rate), 2),
            ]
            for r in runs
        ],
    )
    print()
    print(f"POST verify ÷ raw send_task, 8 threads        {fmt(ratio(post.rate, raw_eight.rate), 2)}")
    if healthz is not None:
        print(f"POST verify ÷ GET /healthz (HTTP floor)       {fmt(ratio(post.rate, healthz.rate), 2)}")
    windows = ", ".join(fmt(rate, 0) for rate in post.window_rates(WINDOW_SECONDS))
    print(f"POST verify calls/s per {WINDOW_SECONDS:g} s window:       {windows}")
    rest = ", ".join(
        fmt((w[MACHINE] - sum(w.get(name, 0.0) for name in components)) / WINDOW_SECONDS, 2)
        for w in post.window_cpu
    )
    print(f"  cores used by the rest of the machine:      {rest}")
    print(f"messages left on the sync queue (no worker):  {queued:,}")
    for run in runs:
        if run.errors:
            details = ", ".join(f"{name} x{n:,}" for name, n in run.errors.most_common())
            print(f"errors in {run.label}: {details}")
    print_table(
        "CPU used during each phase, in cores (CPU seconds / wall seconds; 'rest' = anything "
        "else on the machine), and the client connections each gunicorn worker held half-way",
        ["measurement", *components, "rest", "connections per worker"],
        [
            [
                r.label,
                *[fmt(r.cpu.get(name, 0.0) / r.seconds, 2) for name in components],
                fmt((r.cpu[MACHINE] - sum(r.cpu.get(name, 0.0) for name in components)) / r.seconds, 2),
                " / ".join(str(n) for n in r.connections) or "–",
            ]
            for r in runs
        ],
    )
    problems = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
    print()
    print(f"gunicorn log: {len(log.splitlines()):,} lines, {len(problems):,} with ERROR or Traceback")
    for line in problems[:10]:
        print(f"  {line}")


if __name__ == "__main__":
    main()
