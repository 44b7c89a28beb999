"""Benchmark of a backlog of sends drained by ``mailroom run``'s worker host, beside the
Deployment's worker and raw aiosmtplib, in one run.

``--messages`` sends are queued through the API (the Flask app in this process) while no
send worker runs; then a worker starts and the time until every outbox row is ``sent`` is
measured: messages/s from the first message marked ``sent`` to the last (the worker's
start-up left out). Each send goes to a private aiosmtpd and
files its Sent copy in a private Dovecot, as in ``bench_send.py``. Workers, each on a fresh
backlog:

(a) ``mailroom worker-host --queue send:4``: the send worker ``mailroom run`` starts (four
    threads in one process; ``launcher.EMBEDDED_THREADS``);
(b) the same host with Celery's own synchronous consumer loop instead of the one in
    ``tasks/embedded.py``: while its four threads are busy, kombu's Redis transport sleeps
    up to a second before it looks for the next message;
(c) ``celery worker -Q send`` with deploy/worker-send.yaml's prefork children, as the
    Deployment runs it (its event loop learns at once that a child is free);

beside raw aiosmtplib sending the same number of messages on one reused connection (no
database, no Sent copy: what the SMTP server alone allows).

The database is SQLite in a file, as ``mailroom run`` ships it, or, with ``--database
postgresql``, a private PostgreSQL as the Deployments use.

Run: ``.venv/bin/python bench/bench_backlog.py [--messages 300] [--database sqlite|postgresql]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from sqlalchemy import func, select  # noqa: E402

from bench.bench_send import body, raw_smtp, shipped_send_concurrency, wait_all_sent  # noqa: E402
from bench.environment import BenchEnvironment, fmt, print_table  # noqa: E402
from mailroom.app import create_app  # noqa: E402
from mailroom.launcher import EMBEDDED_THREADS  # noqa: E402
from services.models import OutboxEntry  # noqa: E402
from tests.servers.workers import CeleryWorker, WorkerHostProcess  # noqa: E402

BENCH_SETTINGS = {"rate_limit_enabled": False, "max_tasks_in_flight_per_queue": 100_000}
#: (b): the worker host with Celery's own loop, set before the host's command runs.
CELERY_LOOP = (
    "import tasks.embedded as e; from celery.worker import loops; "
    "e._PromptConsumer.loop = staticmethod(loops.synloop)"
)


def queue_sends(env: BenchEnvironment, client: Any, count: int) -> str:
    """A fresh owner whose ``count`` sends wait in the broker; returns its account id."""
    owner = env.create_owner(env.sessions())
    headers = {"Authorization": f"Bearer {owner.api_key}"}
    for n in range(count):
        answer = client.post(f"/api/accounts/{owner.account_id}/send", json=body(n), headers=headers)
        assert answer.status_code == 202, answer.get_json()
    return owner.account_id


def drain(env: BenchEnvironment, client: Any, count: int, worker: Any) -> float:
    """Messages/s of ``worker`` (not started) working through ``count`` queued sends: from
    the first send marked ``sent`` to the last (the worker's start-up left out)."""
    account_id = queue_sends(env, client, count)
    worker.start()
    try:
        wait_all_sent(env, account_id, count)
    finally:
        worker.stop()
    with env.sessions()() as session:
        first, last = session.execute(
            select(func.min(OutboxEntry.sent_at), func.max(OutboxEntry.sent_at)).where(
                OutboxEntry.account_id == account_id
            )
        ).one()
    assert first is not None and last is not None
    return (count - 1) / (last - first).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        overrides: dict[str, Any] = dict(BENCH_SETTINGS)
        if args.database == "sqlite":
            overrides["database_url"] = f"sqlite:///{tmp}/mailroom.db"
        with BenchEnvironment(dovecot=True, smtp=True, **overrides) as env:
            assert env.smtp is not None
            client = create_app(env.settings).test_client()
            subprocess_env = env.subprocess_env()
            threads = EMBEDDED_THREADS["send"]
            children = shipped_send_concurrency()

            def host(prelude: str = "") -> WorkerHostProcess:
                return WorkerHostProcess({"send": threads}, env=subprocess_env, log_dir=tmp, prelude=prelude)

            # Warm-up: Dovecot's Sent folder and the SMTP server's first connections.
            drain(env, client, 10, host())
            rows = [
                (f"(a) mailroom worker-host, send:{threads} (mailroom run's)", drain(env, client, n, host())),
                ("(b) the same with Celery's own loop", drain(env, client, n, host(CELERY_LOOP))),
                (
                    f"(c) celery worker -Q send, {children} prefork children (the Deployment's)",
                    drain(
                        env,
                        client,
                        n,
                        CeleryWorker(["send"], env=subprocess_env, concurrency=children, log_dir=tmp),
                    ),
                ),
            ]
            # The bytes the API built for one of the sends, as the SMTP server received them.
            raw = raw_smtp(env.smtp.port, env.smtp.received()[-1]["data"], n)
    print_table(
        f"A backlog of {n:,} sends (SMTP + Sent copy) drained, {args.database}: messages/s, first "
        "to last marked sent",
        ["worker", "messages/s", "÷ raw"],
        [[name, fmt(rate), f"{rate / raw:.2f}"] for name, rate in rows]
        + [["raw aiosmtplib, one connection (reference)", fmt(raw), "1.00"]],
    )


if __name__ == "__main__":
    main()
