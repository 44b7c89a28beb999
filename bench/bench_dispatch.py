"""Benchmark of the dispatch path: ``POST /api/accounts/{id}/verify`` under load.

The API runs under gunicorn exactly as deploy/api.yaml starts it (2 processes x 4 threads,
access log on; ``mailroom run`` uses the same shape) against a private PostgreSQL and a
private Redis. No Celery worker runs; instead a drain thread marks the bench tenants'
queued records ``succeeded`` every 0.25 s, as workers would, so the per-tenant cap on tasks
in flight (the shipped default, 1,000 per queue) is counted on every dispatch but not hit.
Per-tenant API rate limits are off: they would refuse one tenant's load long before
dispatch is measured.

Each figure is printed beside its reference, measured in the same run:

1. dispatch calls/s through gunicorn ÷ ``GET /healthz`` calls/s through the same gunicorn,
   both with the same closed-loop clients (goal >= 0.6);
2. p99 latency of dispatch at a fixed offered load of 100 requests/s (open loop, latency
   counted from each request's due time), beside ``GET /healthz`` at the same load
   (goal < 25 ms);
3. ``tasks.dispatch.dispatch()`` in-process ÷ raw ``send_task`` of the same message
   (``ignore_result=True``, same queue and priority), both from 8 threads (goal >= 0.5).

The load generator shares the machine's cores with gunicorn, PostgreSQL and Redis; the CPU
each used is printed too.

Run: ``.venv/bin/python bench/bench_dispatch.py [--duration 30] [--clients 50] [--rate 100]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from bench.environment import BenchEnvironment, Owner, fmt, percentile, print_table, ratio  # noqa: E402
from bench.loadgen import (  # noqa: E402
    MACHINE,
    Call,
    CpuMeter,
    Gunicorn,
    Run,
    gunicorn_shape,
    http_call,
    merge,
    postmaster_pid,
    process_with_argument,
    run_fixed_rate,
    run_load,
    sample_windows,
)
from tasks.celery_app import make_celery  # noqa: E402
from tasks.dispatch import KWARGSREPR_MAX, dispatch  # noqa: E402
from tasks.monitoring import get_queue_stats  # noqa: E402
from tasks.queues import TASK_TYPES, broker_priority, logical_priority  # noqa: E402
from tests.servers.api import shipped_gunicorn_argv  # noqa: E402

WARMUP_SECONDS = 3.0
WINDOW_SECONDS = 5.0
REFERENCE_THREADS = 8
DRAIN_SECONDS = 0.25
#: What the bench changes from the defaults (besides the servers' URLs).
BENCH_SETTINGS = {"rate_limit_enabled": False}


# -- the benchmark -----------------------------------------------------------------------


def publish_call(env: BenchEnvironment, owner: Owner) -> Callable[[], Call]:
    """Raw ``send_task`` of the message dispatch() publishes for a verify, without a record:
    the same kwargs (and kwargs text), queue, priority and ``ignore_result=True``."""
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
                kwargsrepr=repr(kwargs)[:KWARGSREPR_MAX],
                task_id=str(uuid.uuid4()),
                queue=kind.queue,
                routing_key=kind.queue,
                priority=priority,
                retry=False,
                ignore_result=True,
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


def drain(env: BenchEnvironment, tenant_ids: list[str], stop: threading.Event) -> None:
    """Stand in for the workers: end the bench tenants' queued records every DRAIN_SECONDS,
    so their tasks in flight stay a fraction of a second's worth, as with live workers."""
    sessions = env.sessions()
    while not stop.wait(DRAIN_SECONDS):
        with sessions() as session:
            session.execute(
                text(
                    "UPDATE tasks SET state = 'succeeded', finished_at = now(), updated_at = now() "
                    "WHERE state = 'queued' AND tenant_id = ANY(:tenants)"
                ),
                {"tenants": tenant_ids},
            )
            session.commit()


def latency_cells(run: Run) -> list[str]:
    return [fmt(percentile(run.latencies, p) * 1000, 1) for p in (50, 90, 99)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per HTTP phase (30)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent HTTP clients (50)")
    parser.add_argument("--rate", type=float, default=100.0, help="fixed offered load, requests/s (100)")
    parser.add_argument("--rate-duration", type=float, default=20.0, help="seconds at the fixed load (20)")
    parser.add_argument(
        "--reference-duration", type=float, default=6.0, help="seconds per in-process reference (6)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per figure and reference (3)"
    )
    args = parser.parse_args(argv)

    with (
        BenchEnvironment(**BENCH_SETTINGS) as env,
        tempfile.TemporaryDirectory(prefix="mailroom-bench-") as tmp,
    ):
        sessions = env.sessions()
        http_owner = env.create_owner(sessions)
        reference_owner = env.create_owner(sessions)  # its own tenant: its records stay apart
        stop_drain = threading.Event()
        drainer = threading.Thread(
            target=drain, args=(env, [http_owner.tenant_id, reference_owner.tenant_id], stop_drain)
        )
        drainer.start()
        env.add_cleanup(drainer.join)
        env.add_cleanup(stop_drain.set)
        gunicorn = Gunicorn(env, Path(tmp))
        env.add_cleanup(gunicorn.stop)
        workers, threads = gunicorn_shape(shipped_gunicorn_argv("-"))
        print(
            f"starting gunicorn as deploy/api.yaml does ({workers} workers x {threads} threads) …", flush=True
        )
        gunicorn.start()
        assert env.redis is not None
        roots = {"load generator": psutil.Process().pid}
        roots.update({f"gunicorn w{n}": pid for n, pid in enumerate(gunicorn.worker_pids(), 1)})
        roots["postgres"] = postmaster_pid(env)
        roots["redis"] = process_with_argument(f"{env.redis.host}:{env.redis.port}")
        meter = CpuMeter(roots, alone={"load generator"})

        def phase(label: str, measure: Callable[[], Run], *, http: bool) -> Run:
            print(f"  {label} …", flush=True)
            cpu: dict[str, float] = {}
            connections: list[int] = []
            windows: list[dict[str, float]] = []
            stop = threading.Event()
            snapshot = threading.Timer(
                args.duration / args.rounds / 2, lambda: connections.extend(gunicorn.connections_per_worker())
            )
            sampler = threading.Thread(target=sample_windows, args=(meter, WINDOW_SECONDS, stop, windows))
            if http:
                snapshot.start()
                sampler.start()
            with meter.measure(cpu):
                run = measure()
            snapshot.cancel()
            stop.set()
            if http:
                sampler.join()
            run.cpu, run.connections, run.window_cpu = cpu, connections, windows
            run.label = label
            return run

        def rounds(measures: list[tuple[str, Callable[[], Run]]], *, http: bool) -> list[list[Run]]:
            """Each measurement ``args.rounds`` times, alternating, so a figure and its
            reference see the same background load (other work shares these cores)."""
            done: list[list[Run]] = [[] for _ in measures]
            for _ in range(args.rounds):
                for k, (label, measure) in enumerate(measures):
                    done[k].append(phase(label, measure, http=http))
            return done

        k, n = args.rounds, REFERENCE_THREADS
        seconds = args.reference_duration / k
        print(f"in-process references, {k} alternating rounds (same broker and settings) …", flush=True)
        raw_runs, dispatch_runs = rounds(
            [
                (
                    f"raw send_task, {n} threads",
                    lambda: run_load("raw", publish_call(env, reference_owner), n, seconds),
                ),
                (
                    f"dispatch() in-process, {n} threads",
                    lambda: run_load("dispatch", dispatch_call(env, reference_owner), n, seconds),
                ),
            ],
            http=False,
        )
        auth = {"Authorization": f"Bearer {http_owner.api_key}"}
        verify = http_call("POST", f"{gunicorn.url}/api/accounts/{http_owner.account_id}/verify", 202, auth)
        healthz_call = http_call("GET", gunicorn.url + "/healthz", 200, {})
        print(f"HTTP load, {k} alternating rounds (after a {WARMUP_SECONDS:g} s warm-up) …", flush=True)
        run_load("warm-up", verify, args.clients, WARMUP_SECONDS)
        c, d = args.clients, args.duration / k
        healthz_runs, post_runs = rounds(
            [
                (f"GET /healthz, {c} clients", lambda: run_load("healthz", healthz_call, c, d)),
                (f"POST …/verify, {c} clients", lambda: run_load("verify", verify, c, d)),
            ],
            http=True,
        )
        rate, rd = args.rate, args.rate_duration / k
        healthz_fixed_runs, post_fixed_runs = rounds(
            [
                (f"GET /healthz at {rate:g}/s", lambda: run_fixed_rate("healthz", healthz_call, rate, rd)),
                (f"POST …/verify at {rate:g}/s", lambda: run_fixed_rate("verify", verify, rate, rd)),
            ],
            http=True,
        )
        queued = get_queue_stats(make_celery(env.settings))["sync"]
        gunicorn.stop()
        log = gunicorn.log_text()

    raw, in_process = merge(raw_runs), merge(dispatch_runs)
    healthz, post = merge(healthz_runs), merge(post_runs)
    healthz_fixed, post_fixed = merge(healthz_fixed_runs), merge(post_fixed_runs)
    runs = [raw, in_process, healthz, post, healthz_fixed, post_fixed]
    print_table(
        f"Dispatch path: POST /api/accounts/{{id}}/verify, gunicorn {workers} workers x {threads} threads "
        f"(deploy/api.yaml), {k} alternating rounds per pair; {psutil.cpu_count()} cores shared by all",
        ["measurement", "calls/s", "p50 ms", "p90 ms", "p99 ms", "ok", "errors"],
        [
            [r.label, fmt(r.rate, 0), *latency_cells(r), f"{r.ok:,}", f"{sum(r.errors.values()):,}"]
            for r in runs
        ],
    )

    def per_round(figures: list[Run], references: list[Run]) -> tuple[float, str]:
        values = [ratio(f.rate, r.rate) for f, r in zip(figures, references, strict=True)]
        return statistics.median(values), ", ".join(fmt(v, 2) for v in values)

    http_ratio, http_rounds = per_round(post_runs, healthz_runs)
    local_ratio, local_rounds = per_round(dispatch_runs, raw_runs)
    p99 = percentile(post_fixed.latencies, 99) * 1000
    p99_ref = percentile(healthz_fixed.latencies, 99) * 1000
    print()
    print("figure (median of the rounds)                  value   reference, same run          goal")
    print(
        f"POST verify ÷ GET /healthz, {c} clients       {fmt(http_ratio, 2):>7}   "
        f"{fmt(post.rate, 0)}/s ÷ {fmt(healthz.rate, 0)}/s; rounds {http_rounds}   >= 0.6"
    )
    print(
        f"POST verify p99 at {rate:g}/s offered (ms)       {fmt(p99, 1):>7}   "
        f"GET /healthz p99 {fmt(p99_ref, 1)} ms, same load       < 25"
    )
    print(
        f"dispatch() ÷ raw send_task, {n} threads       {fmt(local_ratio, 2):>7}   "
        f"{fmt(in_process.rate, 0)}/s ÷ {fmt(raw.rate, 0)}/s; rounds {local_rounds}   >= 0.5"
    )
    for label, run in (("GET /healthz", healthz), ("POST verify", post)):
        used = sum(v for name, v in run.cpu.items() if name.startswith("gunicorn"))
        print(f"gunicorn CPU per call, {label}: {fmt(used / max(1, run.ok) * 1000, 2)} ms")
    print(f"messages left on the sync queue (no worker): {queued:,}")
    for run in runs:
        if run.errors:
            details = ", ".join(f"{name} x{count:,}" for name, count in run.errors.most_common())
            print(f"errors in {run.label}: {details}")
    components = list(roots)
    print_table(
        "CPU used during each phase, in cores (CPU seconds / wall seconds; 'rest' = anything "
        "else on the machine), and the client connections each gunicorn worker held half-way",
        ["measurement", *components, "rest", "connections per worker"],
        [
            [
                r.label,
                *[fmt(r.cpu.get(name, 0.0) / r.seconds, 2) for name in components],
                fmt((r.cpu[MACHINE] - sum(r.cpu.get(name, 0.0) for name in components)) / r.seconds, 2),
                " / ".join(str(count) for count in r.connections) or "–",
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
