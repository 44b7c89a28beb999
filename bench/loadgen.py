"""Load generation for the HTTP benchmarks: closed-loop phases (N threads calling as fast
as they can), open-loop phases at a fixed offered rate, CPU accounting per component, and
gunicorn started exactly as the shipped configuration starts it (deploy/api.yaml).
"""

from __future__ import annotations

import http.client
import math
import select
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [path for path in (str(ROOT), str(ROOT / "src")) if path not in sys.path]

from bench.environment import BenchEnvironment, machine_busy_seconds  # noqa: E402
from tests.servers.api import ApiServer  # noqa: E402

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


def merge(runs: list[Run]) -> Run:
    """Rounds of one measurement as one: calls, errors, seconds and CPU added up."""
    merged = Run(runs[0].label)
    for run in runs:
        merged.seconds += run.seconds
        merged.latencies.extend(run.latencies)
        merged.errors.update(run.errors)
        merged.connections.extend(run.connections)
        merged.window_cpu.extend(run.window_cpu)
        for name, value in run.cpu.items():
            merged.cpu[name] = merged.cpu.get(name, 0.0) + value
    return merged


def run_fixed_rate(label: str, make_call: Callable[[], Call], rate: float, seconds: float) -> Run:
    """Offer ``rate`` calls per second for ``seconds``, open loop: call k is due at
    ``k / rate`` whether or not earlier ones finished, and its latency counts from that due
    time, so a server that falls behind shows it (no coordinated omission). Calls run on a
    pool of threads, each with its own ``make_call()``."""
    run = Run(label)
    local = threading.local()
    lock = threading.Lock()
    count = int(rate * seconds)

    def one(due: float, started: float) -> None:
        if not hasattr(local, "call"):
            local.call = make_call()
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            local.call()
        except Exception as exc:
            with lock:
                run.errors[_error_name(exc)] += 1
            return
        done = time.perf_counter()
        with lock:
            run.latencies.append(done - due)
            run.done_at.append(done - started)

    with ThreadPoolExecutor(max_workers=FIXED_RATE_THREADS) as pool:
        started = time.perf_counter() + 0.2
        for k in range(count):
            due = started + k / rate
            # Hand each call over shortly before it is due, from this one scheduling thread.
            wait = due - 0.05 - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            pool.submit(one, due, started)
    run.seconds = time.perf_counter() - started
    return run


#: Threads that carry the open-loop calls: enough that none waits for a free thread at the
#: rates measured here, so a late call means a slow server.
FIXED_RATE_THREADS = 64


def gunicorn_shape(argv: list[str]) -> tuple[int, int]:
    """(workers, threads) of a gunicorn command line."""
    return int(argv[argv.index("--workers") + 1]), int(argv[argv.index("--threads") + 1])


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


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection (http.client) sending what a ``requests.Session``
    sends: the same request line, headers (requests' defaults first, in its order) and body
    bytes. For load generators that share the machine with what they measure: a request
    costs a fraction of the CPU ``requests`` spends on it. Bodies are bytes, serialised by the
    caller (ahead of the measured phase where it can)."""

    def __init__(self, url: str, headers: dict[str, str], *, timeout: float = 30) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http://host:port URL: {url}")
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.headers = {**requests.utils.default_headers(), **headers}

    def request(self, method: str, path: str, json_body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of ``method path``, with ``json_body`` as application/json."""
        sock = self.connection.sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            # Readable while idle: the server closed it (its keep-alive timeout) - reconnect,
            # as requests does, rather than send on a dead connection.
            self.connection.close()
        if json_body is None:
            self.connection.request(method, path, headers=self.headers)
        else:
            headers = {
                **self.headers,
                "Content-Length": str(len(json_body)),
                "Content-Type": "application/json",
            }
            self.connection.request(method, path, json_body, headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.connection.close()


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


class Gunicorn(ApiServer):
    """The shipped API (tests.servers.api) with a benchmark environment's settings."""

    def __init__(self, env: BenchEnvironment, directory: Path) -> None:
        super().__init__(env.subprocess_env(), directory)

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
