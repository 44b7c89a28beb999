"""What recording webhook events costs at the end of each task.

A task's final transaction (``mark_succeeded`` + the duration statistics, as
tasks.lifecycle commits it) is timed against a private PostgreSQL three ways, interleaved
in rounds so that the machine's other load hits each alike:

1. the reference: the final transaction alone, as before webhooks;
2. plus ``services.webhooks.record_task_events`` for a tenant with no endpoint (the common
   case: one indexed query);
3. plus the same for a tenant whose one endpoint wants ``task.succeeded`` (a savepoint,
   the record read again, one delivery row inserted; publishing is not timed).

Printed: the median ms per task of each, each one's extra over the reference, and, as the
unit that extra is made of, one ``SELECT 1`` round trip inside an open transaction (on a
busy shared machine a round trip costs milliseconds, not the ~0.1 ms of an idle one).

Run: ``.venv/bin/python bench/bench_webhooks.py [--tasks 400] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from sqlalchemy import text  # noqa: E402

from bench.environment import BenchEnvironment, fmt, print_table  # noqa: E402
from services import task_records, task_stats, webhooks  # noqa: E402
from services.crypto import SecretBox  # noqa: E402
from services.db import make_engine, make_sessionmaker, tenant_sessions, transaction  # noqa: E402
from services.models import TaskRecord, TaskState, new_id, utcnow  # noqa: E402


def make_records(sessions, owner, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    ids = [new_id() for _ in range(count)]
    with transaction(sessions) as session:
        for task_id in ids:
            session.add(
                TaskRecord(
                    id=task_id,
                    tenant_id=owner.tenant_id,
                    user_id=owner.user_id,
                    account_id=owner.account_id,
                    type="verify",
                    queue="sync",
                    state=TaskState.RUNNING.value,
                    started_at=utcnow(),
                    params={},
                )
            )
    return ids


def finish(bound, tenant_id: str, task_ids: list[str], *, events: bool) -> float:  # type: ignore[no-untyped-def]
    """Seconds per task of the final transaction, with or without event recording."""
    started = time.perf_counter()
    for task_id in task_ids:
        with transaction(bound) as session:
            task_records.mark_succeeded(session, task_id, {"imap": {"capabilities": ["IMAP4rev1"]}})
            task_stats.record_success(session, task_id)
            if events:
                webhooks.record_task_events(session, tenant_id, task_id)
    return (time.perf_counter() - started) / len(task_ids)


def round_trip(bound, count: int) -> float:  # type: ignore[no-untyped-def]
    with transaction(bound) as session:
        started = time.perf_counter()
        for _ in range(count):
            session.execute(text("SELECT 1")).all()
        return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=400, help="tasks per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with BenchEnvironment(allow_private_hosts=True) as env:
        sessions = env.sessions()
        factory = make_sessionmaker(make_engine(env.settings))
        quiet, busy = env.create_owner(sessions), env.create_owner(sessions)
        with transaction(tenant_sessions(factory, busy.tenant_id)) as session:
            webhooks.create_endpoint(
                session,
                tenant_id=busy.tenant_id,
                user_id=busy.user_id,
                url="http://127.0.0.1:9/hook",
                events=["task.succeeded"],
                description="bench",
                enabled=True,
                box=SecretBox(env.settings.encryption_keys()),
                allow_private=True,
            )
        results: dict[str, list[float]] = {"reference": [], "no endpoint": [], "one endpoint": []}
        trips: list[float] = []
        for _ in range(args.rounds):
            trips.append(round_trip(tenant_sessions(factory, quiet.tenant_id), args.tasks))
            for name, owner, events in (
                ("reference", quiet, False),
                ("no endpoint", quiet, True),
                ("one endpoint", busy, True),
            ):
                ids = make_records(sessions, owner, args.tasks)
                bound = tenant_sessions(factory, owner.tenant_id)
                results[name].append(finish(bound, owner.tenant_id, ids, events=events))
        reference = statistics.median(results["reference"]) * 1000
        rows = []
        for name, values in results.items():
            ms = statistics.median(values) * 1000
            rows.append([name, fmt(ms, 3), fmt(ms - reference, 3), fmt(ms / reference, 2)])
        rows.append(["(one SELECT 1 round trip)", fmt(statistics.median(trips) * 1000, 3), "", ""])
        print_table(
            f"final task transaction, median of {args.rounds} rounds x {args.tasks} tasks (PostgreSQL)",
            ["variant", "ms/task", "extra ms", "x reference"],
            rows,
        )


if __name__ == "__main__":
    main()
