"""What the tenant guards cost, each beside its reference in the same run (PostgreSQL, Redis):

* a 20-row read of task records in a tenant-bound session against the same read in an
  unrestricted session (the loader criteria on every ORM statement);
* ``GET /api/tasks?limit=5`` through the Flask test client with the rate limiter counting
  in Redis against the same app with the limiter off.

Medians of 5 rounds, rounds interleaved so load on the machine hits both sides alike.

    python bench/bench_guards.py [--reads 2000] [--requests 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from sqlalchemy import select  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from bench.environment import BenchEnvironment  # noqa: E402
from mailroom.app import create_app  # noqa: E402
from services.db import tenant_sessions, unrestricted_unsafe_sessions  # noqa: E402
from services.models import TaskRecord  # noqa: E402
from services.settings import load_settings  # noqa: E402


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with BenchEnvironment(log_level="WARNING") as env:
        sessions = env.sessions()
        owner = env.create_owner(sessions)
        with sessions() as session:
            for _ in range(50):
                session.add(
                    TaskRecord(tenant_id=owner.tenant_id, user_id=owner.user_id, type="sync", queue="sync")
                )
            session.commit()

        def read(factory: sessionmaker[Session]) -> Callable[[], Any]:
            query = select(TaskRecord).where(TaskRecord.tenant_id == owner.tenant_id).limit(20)

            def run() -> Any:
                with factory() as session:
                    return session.scalars(query).all()

            return run

        def get(app: Any) -> Callable[[], Any]:
            client, headers = app.test_client(), {"Authorization": f"Bearer {owner.api_key}"}

            def run() -> Any:
                response = client.get("/api/tasks?limit=5", headers=headers)
                assert response.status_code == 200, response.get_json()

            return run

        bound, free = tenant_sessions(sessions, owner.tenant_id), unrestricted_unsafe_sessions(sessions)
        limited = create_app(load_settings(**env.values))
        unlimited = create_app(load_settings(**{**env.values, "rate_limit_enabled": False}))
        rows: dict[str, list[float]] = {"bound": [], "free": [], "limited": [], "unlimited": []}
        for _ in range(args.rounds):
            rows["bound"].append(per_call_us(read(bound), args.reads))
            rows["free"].append(per_call_us(read(free), args.reads))
            rows["limited"].append(per_call_us(get(limited), args.requests))
            rows["unlimited"].append(per_call_us(get(unlimited), args.requests))
        m = {name: statistics.median(values) for name, values in rows.items()}
        print(f"{'measurement':<48} {'median µs':>10}")
        print(f"{'20-row read, tenant-bound session':<48} {m['bound']:>10.0f}")
        print(f"{'20-row read, unrestricted (reference)':<48} {m['free']:>10.0f}")
        print(f"{'  ratio':<48} {m['bound'] / m['free']:>10.2f}")
        print(f"{'GET /api/tasks, rate limiter on':<48} {m['limited']:>10.0f}")
        print(f"{'GET /api/tasks, rate limiter off (reference)':<48} {m['unlimited']:>10.0f}")
        print(f"{'  ratio':<48} {m['limited'] / m['unlimited']:>10.2f}")


if __name__ == "__main__":
    main()
