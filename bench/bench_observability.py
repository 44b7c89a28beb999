"""What metrics and JSON logs cost: dispatch and task throughput with them on and off, in
one run, alternating on and off rounds (the order flips every round), medians.

"on" is how deploy/ runs Mailroom: ``PROMETHEUS_MULTIPROC_DIR`` set to a fresh directory
(every process writes its metrics to memory-mapped files there), ``MAILROOM_LOG_FORMAT=json``
at ``MAILROOM_LOG_LEVEL=INFO`` (the API writes one access-log line per request; a worker
writes Celery's received/succeeded lines and Mailroom's "task attempt ended" line per
task); workers also serve their metrics on ``MAILROOM_WORKER_METRICS_PORT``.
"off": no ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client keeps the same counters and
histograms in each process's memory: the calls still happen, no file is written, and
nothing serves the workers' metrics) and ``MAILROOM_LOG_LEVEL=WARNING`` (no access-log or
per-task lines). Logs go to a file on local disk, as a container's stderr would go to its
runtime's log file.

1. Dispatch: ``POST /api/accounts/{id}/verify`` through gunicorn as deploy/api.yaml starts
   it (2 workers x 4 threads), closed-loop clients (bench/loadgen.py), requests/s. Two
   gunicorns run side by side, one "on", one "off"; each phase loads one of them. As in
   bench_dispatch.py no worker runs: a drain thread ends the queued records every 0.25 s,
   so the tenant's cap of tasks in flight is counted on every dispatch but never hit.
2. Tasks: N ``verify_account`` tasks queued first, then one prefork worker started as
   deploy/worker-sync.yaml starts it (``-Q sync``, its concurrency) runs them; tasks/s from
   the first task's start to the last one's end (records' timestamps). Each verify is real
   work: an IMAP login and CAPABILITY against Dovecot, an SMTP login against aiosmtpd, and
   the task record's writes in PostgreSQL (running, progress, succeeded, duration stats).

3. The pieces alone: CPU microseconds per call, in one process per mode and round, of
   exactly what "on" adds — a Flask app with only Mailroom's metrics hooks and one route
   (per request), and a worker's per-attempt metrics and log lines (per task) — set beside
   the whole CPU per request and per task measured in 1 and 2. Throughput on a shared
   2-core machine varies from round to round far more than 5 %; this share does not.

Each figure is printed with its on/off ratio, each round's ratio, and the goal (on within
5 % of off). CPU per request / per task of the measured processes is printed too: on a
shared machine it is steadier than throughput. "other" is CPU used meanwhile by processes
that are not this benchmark's.

Run: ``.venv/bin/python bench/bench_observability.py [--rounds 4] [--duration 8] [--tasks 300]
[--iterations 10000]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
import yaml
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
# "off" must mean off: nothing of the caller's multiprocess directory reaches a subprocess.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from bench.bench_dispatch import BENCH_SETTINGS, drain  # noqa: E402
from bench.environment import BenchEnvironment, Owner, fmt, print_table  # noqa: E402
from bench.loadgen import (  # noqa: E402
    MACHINE,
    CpuMeter,
    Gunicorn,
    Run,
    gunicorn_shape,
    http_call,
    postmaster_pid,
    process_with_argument,
    run_load,
)
from tasks.celery_app import make_celery  # noqa: E402
from tasks.dispatch import dispatch  # noqa: E402
from tests.servers.api import shipped_gunicorn_argv  # noqa: E402
from tests.servers.ports import free_port  # noqa: E402
from tests.servers.workers import CeleryWorker  # noqa: E402

MODES = ("on", "off")
GOAL = 0.05
WARMUP_SECONDS = 3.0
TASK_TIMEOUT = 300.0
POLL_SECONDS = 0.1
PIECES_CHILD = "--pieces-child"


def mode_env(base: dict[str, str], mode: str, metrics_dir: Path | None) -> dict[str, str]:
    """A Mailroom subprocess's environment with metrics files and INFO JSON logs ("on"), or
    with neither ("off")."""
    env = {k: v for k, v in base.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["MAILROOM_LOG_FORMAT"] = "json"
    if mode == "on":
        assert metrics_dir is not None
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env["MAILROOM_LOG_LEVEL"] = "INFO"
    else:
        env["MAILROOM_LOG_LEVEL"] = "WARNING"
    return env


def sync_worker_concurrency() -> int:
    """``--concurrency`` of the worker container in deploy/worker-sync.yaml."""
    for doc in yaml.safe_load_all((ROOT / "deploy" / "worker-sync.yaml").read_text()):
        pod = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            argv = container.get("command", [])
            if "--concurrency" in argv:
                return int(argv[argv.index("--concurrency") + 1])
    raise LookupError("deploy/worker-sync.yaml has no --concurrency")


def metric_total(exposition: str, name: str, *parts: str) -> float:
    """Sum of the samples of ``name`` whose line contains every one of ``parts``."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(name + "{") and all(part in line for part in parts):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Phase:
    """One measured phase: a mode, its rate, and the CPU it took."""

    mode: str
    round: int
    rate: float
    count: int
    #: CPU seconds of the measured Mailroom processes (gunicorn's tree, or the worker's).
    cpu: float
    #: Cores used by processes outside this benchmark, on average over the phase.
    other_cores: float
    log_lines: int
    failures: int = 0
    #: Tasks/s from the worker's start (import, fork, connect) to the last task's end.
    rate_with_start: float = float("nan")


def ours(sample: dict[str, float]) -> float:
    return sum(value for name, value in sample.items() if name != MACHINE)


def server_roots(env: BenchEnvironment) -> dict[str, int]:
    """This process (the load generator, the poller) and the servers' process trees: what
    the machine's CPU is compared with to show the load of other work."""
    assert env.redis is not None and env.dovecot is not None and env.smtp is not None
    assert env.dovecot.pid is not None and env.smtp.pid is not None
    return {
        "bench": psutil.Process().pid,
        "postgres": postmaster_pid(env),
        "redis": process_with_argument(f"{env.redis.host}:{env.redis.port}"),
        "dovecot": env.dovecot.pid,
        "smtp": env.smtp.pid,
    }


# -- the pieces alone, in one process ------------------------------------------------------


def pieces_child(iterations: int) -> None:
    """In a subprocess whose environment is one mode's: CPU microseconds per request of a
    Flask app with only Mailroom's metrics hooks (``install_metrics``: latency, count,
    access log) and one route; then per task of a worker's per-attempt observability
    (``AttemptMetrics`` inside the task's log context, and Celery's own received and
    succeeded INFO lines with the same loggers, messages and arguments). Prints JSON."""
    from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS
    from flask import Flask

    from mailroom.metrics import install_metrics
    from services.logs import configure_logging, log_context
    from services.models import utcnow
    from tasks.metrics import AttemptMetrics

    configure_logging(os.environ["MAILROOM_LOG_LEVEL"], "json")
    app = Flask("pieces")
    install_metrics(app)

    @app.post("/api/accounts/<account_id>/verify")
    def verify(account_id: str) -> tuple[dict[str, str], int]:
        return {"task_id": account_id}, 202

    client = app.test_client()
    path = f"/api/accounts/{uuid.uuid4()}/verify"
    received, traced = logging.getLogger("celery.worker.strategy"), logging.getLogger("celery.app.trace")
    result = {"imap": {"ok": True, "capabilities": ["IMAP4REV1", "IDLE", "MOVE"]}, "smtp": {"ok": True}}
    kwargs = repr({"tenant_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4()), "params": {}})

    def task() -> None:
        task_id = str(uuid.uuid4())
        context = {
            "id": task_id,
            "name": "mailroom.verify_account",
            "args": "()",
            "kwargs": kwargs,
            "eta": None,
        }
        received.info(LOG_RECEIVED, context, extra={"data": context})
        with log_context(task_id=task_id, tenant_id="t"):
            observed = AttemptMetrics("verify", "sync", utcnow())
            with log_context(queue="sync", task_type="verify", attempt=1):
                observed.end("succeeded", result)
        traced.info(
            LOG_SUCCESS,
            {
                "id": task_id,
                "name": "mailroom.verify_account",
                "return_value": repr(result),
                "runtime": 0.05,
                "args": "()",
                "kwargs": kwargs,
            },
        )

    def per_call(call: Callable[[], object]) -> float:
        for _ in range(iterations // 10):  # warm-up: first files, first label children
            call()
        started = time.process_time()
        for _ in range(iterations):
            call()
        return (time.process_time() - started) / iterations * 1e6

    print(json.dumps({"request": per_call(lambda: client.post(path)), "task": per_call(task)}))


def pieces(tmp: Path, rounds: int, iterations: int) -> dict[str, dict[str, list[float]]]:
    """``pieces_child`` in alternating on/off subprocesses; their logs go to files."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "src"), base.get("PYTHONPATH")]))
    found: dict[str, dict[str, list[float]]] = {mode: {"request": [], "task": []} for mode in MODES}
    print(f"pieces alone: {rounds} rounds of {iterations:,} requests and tasks per mode, one process …")
    for n in range(rounds):
        for mode in MODES if n % 2 == 0 else MODES[::-1]:
            directory = tmp / f"pieces-{mode}-{n}"
            directory.mkdir()
            env = mode_env(base, mode, directory / "prometheus")
            with open(directory / "log", "wb") as log:
                out = subprocess.run(
                    [sys.executable, __file__, PIECES_CHILD, str(iterations)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    check=True,
                    cwd=ROOT,
                ).stdout
            for key, value in json.loads(out).items():
                found[mode][key].append(value)
    return found


# -- dispatch ----------------------------------------------------------------------------


def dispatch_phases(
    env: BenchEnvironment, owner: Owner, tmp: Path, args: argparse.Namespace
) -> tuple[list[Phase], dict[str, float]]:
    gunicorns: dict[str, Gunicorn] = {}
    for mode in MODES:
        directory = tmp / f"gunicorn-{mode}"
        directory.mkdir()
        server = Gunicorn(env, directory)
        server._env = mode_env(env.subprocess_env(), mode, directory / "prometheus")
        env.add_cleanup(server.stop)
        gunicorns[mode] = server
    workers, threads = gunicorn_shape(shipped_gunicorn_argv("-"))
    print(f"starting two gunicorns as deploy/api.yaml does ({workers} workers x {threads} threads) …")
    for server in gunicorns.values():
        server.start()
    assert env.redis is not None and gunicorns["on"].proc and gunicorns["off"].proc
    roots = {"gunicorn on": gunicorns["on"].proc.pid, "gunicorn off": gunicorns["off"].proc.pid}
    meter = CpuMeter({**roots, **server_roots(env)}, alone={"bench"})
    auth = {"Authorization": f"Bearer {owner.api_key}"}
    path = f"/api/accounts/{owner.account_id}/verify"
    calls = {mode: http_call("POST", server.url + path, 202, auth) for mode, server in gunicorns.items()}
    served = dict.fromkeys(MODES, 0)
    for mode in MODES:
        served[mode] += run_load("warm-up", calls[mode], args.clients, WARMUP_SECONDS).ok

    phases: list[Phase] = []
    print(f"dispatch: {args.rounds} rounds of {args.duration:g} s per mode, {args.clients} clients …")
    for n in range(args.rounds):
        for mode in MODES if n % 2 == 0 else MODES[::-1]:
            log_before = len(gunicorns[mode].log_text().splitlines())
            cpu: dict[str, float] = {}
            with meter.measure(cpu):
                run: Run = run_load(mode, calls[mode], args.clients, args.duration)
            served[mode] += run.ok
            access = [
                line
                for line in gunicorns[mode].log_text().splitlines()[log_before:]
                if "mailroom.access" in line
            ]
            phase = Phase(
                mode,
                n + 1,
                run.rate,
                run.ok,
                cpu[f"gunicorn {mode}"],
                (cpu[MACHINE] - ours(cpu)) / run.seconds,
                len(access),
                sum(run.errors.values()),
            )
            phases.append(phase)
            print(
                f"  round {n + 1} {mode:>3}: {fmt(phase.rate, 0)} requests/s, "
                f"{phase.log_lines:,} access-log lines, other load {fmt(phase.other_cores, 2)} cores",
                flush=True,
            )
    # The "on" gunicorn's /metrics sees both processes' counts through the files.
    exposition = requests.get(gunicorns["on"].url + "/metrics", timeout=30).text
    counted = metric_total(
        exposition, "mailroom_http_requests_total", 'method="POST"', '/verify"', 'status="202"'
    )
    check = {"served": float(served["on"]), "counted": counted}
    for server in gunicorns.values():
        server.stop()
    return phases, check


# -- tasks -------------------------------------------------------------------------------


class TaskBench:
    """Queue N verify tasks, start a worker, wait until all ended, stop the worker."""

    def __init__(self, env: BenchEnvironment, owner: Owner, tmp: Path) -> None:
        self.env = env
        self.owner = owner
        self.tmp = tmp
        self.celery = make_celery(env.settings)
        self.sessions = env.sessions()
        self.concurrency = sync_worker_concurrency()
        self.workers: dict[str, CeleryWorker] = {}
        for mode in MODES:
            worker = CeleryWorker(
                ["sync"],
                env=env.subprocess_env(),
                concurrency=self.concurrency,
                name=f"sync-{mode}-{uuid.uuid4().hex[:6]}",
                cwd=ROOT,
                log_dir=tmp / f"worker-{mode}",
            )
            env.add_cleanup(worker.cleanup)
            self.workers[mode] = worker
        self.scraped: dict[str, float] = {}

    def purge(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.default_channel.queue_purge("sync")

    def queue(self, count: int) -> list[str]:
        return [
            dispatch(
                self.celery,
                self.sessions,
                type="verify",
                tenant_id=self.owner.tenant_id,
                user_id=self.owner.user_id,
                account_id=self.owner.account_id,
                params={},
            ).record.id
            for _ in range(count)
        ]

    def progress(self, ids: list[str]) -> tuple[int, int, int, float | None, float | None]:
        """(ended, succeeded, started, first start, last end) of the records ``ids``; times as
        POSIX seconds."""
        with self.sessions() as session:
            row = session.execute(
                text(
                    "SELECT count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'cancelled')), "
                    "count(*) FILTER (WHERE state = 'succeeded'), count(started_at), "
                    "extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at)) "
                    "FROM tasks WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            ).one()
        first = float(row[3]) if row[3] is not None else None
        last = float(row[4]) if row[4] is not None else None
        return int(row[0]), int(row[1]), int(row[2]), first, last

    def phase(self, mode: str, round_: int, count: int) -> Phase:
        ids = self.queue(count)
        worker = self.workers[mode]
        metrics_dir = self.tmp / f"worker-{mode}-prometheus-{round_}"
        worker.env = mode_env(self.env.subprocess_env(), mode, metrics_dir if mode == "on" else None)
        port = free_port()
        if mode == "on":
            worker.env["MAILROOM_WORKER_METRICS_PORT"] = str(port)
        log_before = len(worker.log_text().splitlines())
        launched = time.time()
        worker.start(wait_ready=False)
        assert worker.pid is not None
        meter = CpuMeter({"worker": worker.pid, **server_roots(self.env)}, alone={"bench"})
        first_cpu: dict[str, float] | None = None
        deadline = time.monotonic() + TASK_TIMEOUT
        while True:
            ended, succeeded, started, first, last = self.progress(ids)
            if first_cpu is None and started:
                # From the first task on: the worker's start-up is not the tasks' cost.
                first_cpu = meter.sample()
            if ended == count:
                break
            if not worker.is_running() or time.monotonic() > deadline:
                raise RuntimeError(f"{ended}/{count} tasks ended; worker log:\n{worker.log_text()[-3000:]}")
            time.sleep(POLL_SECONDS)
        last_cpu = meter.sample()
        if mode == "on":
            exposition = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
            self.scraped[f"round {round_}"] = metric_total(
                exposition, "mailroom_worker_tasks_total", 'type="verify"', 'outcome="succeeded"'
            )
        worker.stop()
        assert first is not None and last is not None and first_cpu is not None
        lines = [line for line in worker.log_text().splitlines()[log_before:] if "task attempt ended" in line]
        span = last - first
        return Phase(
            mode,
            round_,
            count / span,
            count,
            last_cpu["worker"] - first_cpu["worker"],
            ((last_cpu[MACHINE] - ours(last_cpu)) - (first_cpu[MACHINE] - ours(first_cpu))) / span,
            len(lines),
            count - succeeded,
            rate_with_start=count / (last - launched),
        )


def task_phases(bench: TaskBench, args: argparse.Namespace) -> list[Phase]:
    print(
        f"tasks: {args.rounds} rounds of {args.tasks} verify tasks per mode, "
        f"prefork worker -c {bench.concurrency} …"
    )
    bench.purge()  # the dispatch phases' messages (their records already ended)
    phases: list[Phase] = []
    for n in range(args.rounds):
        for mode in MODES[::-1] if n % 2 == 0 else MODES:
            phase = bench.phase(mode, n + 1, args.tasks)
            phases.append(phase)
            print(
                f"  round {n + 1} {mode:>3}: {fmt(phase.rate, 1)} tasks/s, {phase.failures} not succeeded, "
                f"{phase.log_lines:,} attempt-ended lines, other load {fmt(phase.other_cores, 2)} cores",
                flush=True,
            )
    return phases


# -- report ------------------------------------------------------------------------------


def summary_row(label: str, phases: list[Phase], cpu_unit: str) -> list[str]:
    by_mode = {mode: [p for p in phases if p.mode == mode] for mode in MODES}
    on = statistics.median(p.rate for p in by_mode["on"])
    off = statistics.median(p.rate for p in by_mode["off"])
    rounds = sorted({p.round for p in phases})
    per_round = [
        next(p.rate for p in by_mode["on"] if p.round == r)
        / next(p.rate for p in by_mode["off"] if p.round == r)
        for r in rounds
    ]
    cpu_on = statistics.median(p.cpu / p.count * 1000 for p in by_mode["on"])
    cpu_off = statistics.median(p.cpu / p.count * 1000 for p in by_mode["off"])
    ratio = on / off
    verdict = "met" if ratio >= 1 - GOAL else "NOT met"
    spread = {
        m: f"{fmt(min(p.rate for p in by_mode[m]), 1)}–{fmt(max(p.rate for p in by_mode[m]), 1)}"
        for m in MODES
    }
    return [
        label,
        f"{fmt(on, 1)} ({spread['on']})",
        f"{fmt(off, 1)} ({spread['off']})",
        fmt(ratio, 3),
        ", ".join(fmt(v, 3) for v in per_round),
        f"{fmt(cpu_on, 2)} / {fmt(cpu_off, 2)} {cpu_unit}",
        f"on/off >= {1 - GOAL:.2f}: {verdict}",
    ]


def report(
    dispatch_runs: list[Phase],
    task_runs: list[Phase],
    alone: dict[str, dict[str, list[float]]],
    checks: list[str],
    args: argparse.Namespace,
) -> None:
    for title, phases, unit in (
        ("Dispatch: POST …/verify through gunicorn, each phase", dispatch_runs, "requests/s"),
        ("Tasks: verify through a prefork sync worker, each phase", task_runs, "tasks/s"),
    ):
        print_table(
            title,
            ["round", "mode", unit, "CPU ms each", "log lines", "not OK", "other cores"],
            [
                [
                    str(p.round),
                    p.mode,
                    fmt(p.rate, 1),
                    fmt(p.cpu / p.count * 1000, 2),
                    f"{p.log_lines:,}",
                    str(p.failures),
                    fmt(p.other_cores, 2),
                ]
                for p in phases
            ],
        )
    print_table(
        f"Metrics + JSON INFO logs on vs off: medians of {args.rounds} alternating rounds per mode "
        f"(min–max in brackets); {psutil.cpu_count()} cores shared with other work",
        ["figure", "on", "off", "on/off", "per round", "CPU ms on / off", "goal (difference < 5 %)"],
        [
            summary_row(f"dispatch requests/s, {args.clients} clients", dispatch_runs, "per request"),
            summary_row(f"verify tasks/s, {args.tasks} per phase", task_runs, "per task"),
        ],
    )
    rows = []
    for key, label, phases in (
        ("request", "per request: metrics hooks + access log", dispatch_runs),
        ("task", "per task: AttemptMetrics + 3 INFO lines", task_runs),
    ):
        on, off = statistics.median(alone["on"][key]), statistics.median(alone["off"][key])
        whole = statistics.median(p.cpu / p.count * 1e6 for p in phases if p.mode == "off")
        rows.append(
            [
                label,
                f"{fmt(on, 1)} ({', '.join(fmt(v, 1) for v in alone['on'][key])})",
                f"{fmt(off, 1)} ({', '.join(fmt(v, 1) for v in alone['off'][key])})",
                fmt(on - off, 1),
                f"{fmt(whole, 0)} µs",
                f"{fmt((on - off) / whole * 100, 2)} %",
            ]
        )
    print_table(
        f"The pieces alone: CPU µs per call in one process, median of {args.rounds} alternating "
        "subprocesses per mode (each value in brackets), beside the whole CPU per request / task "
        "of the processes measured above ('off' median)",
        ["what", "on µs", "off µs", "on - off", "whole, above", "share"],
        rows,
    )
    with_start = {m: statistics.median(p.rate_with_start for p in task_runs if p.mode == m) for m in MODES}
    print(
        f"tasks/s counted from the worker's launch (start-up included): on {fmt(with_start['on'], 1)}, "
        f"off {fmt(with_start['off'], 1)}, on/off {fmt(with_start['on'] / with_start['off'], 3)}"
    )
    for line in checks:
        print(line)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({psutil.cpu_count()} cores)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per mode (4; at least 3)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per dispatch phase (8)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent HTTP clients (50)")
    parser.add_argument("--tasks", type=int, default=300, help="verify tasks per task phase (300)")
    parser.add_argument(
        "--iterations", type=int, default=10_000, help="calls per mode and round of the pieces alone (10,000)"
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PIECES_CHILD]:
        pieces_child(int(argv[1]))
        return
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    load = os.getloadavg()
    print(
        f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({psutil.cpu_count()} cores)"
    )

    with (
        BenchEnvironment(dovecot=True, smtp=True, **BENCH_SETTINGS) as env,
        tempfile.TemporaryDirectory(prefix="mailroom-bench-obs-") as tmp_name,
    ):
        tmp = Path(tmp_name)
        alone = pieces(tmp, args.rounds, args.iterations)
        sessions = env.sessions()
        http_owner = env.create_owner(sessions)
        task_owner = env.create_owner(sessions)  # its own tenant: the drain never touches it
        stop_drain = threading.Event()
        drainer = threading.Thread(target=drain, args=(env, [http_owner.tenant_id], stop_drain))
        drainer.start()
        env.add_cleanup(drainer.join)
        env.add_cleanup(stop_drain.set)
        dispatch_runs, http_check = dispatch_phases(env, http_owner, tmp, args)
        stop_drain.set()
        bench = TaskBench(env, task_owner, tmp)
        task_runs = task_phases(bench, args)

    checks = [
        f"check, dispatch 'on': /metrics counts {http_check['counted']:,.0f} verify requests with 202 over "
        f"both gunicorn processes; the 'on' gunicorn answered {http_check['served']:,.0f} (warm-up included)",
        "check, tasks 'on': each worker's metrics port counted succeeded verify attempts "
        + ", ".join(f"{k}: {v:,.0f}" for k, v in bench.scraped.items())
        + f" (of {args.tasks} each)",
    ]
    report(dispatch_runs, task_runs, alone, checks, args)


if __name__ == "__main__":
    main()
