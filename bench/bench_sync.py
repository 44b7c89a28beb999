"""Benchmark of IMAP sync against a private Dovecot and a private PostgreSQL.

Measures, in one run:

1. raw imapclient: ``UID FETCH`` of the fields sync asks for, 500 UIDs per command, plus
   parsing the header fields with ``BytesHeaderParser(policy=compat32)`` (msg/s);
2. ``sync_account`` first sync of the same 10,000-message INBOX (msg/s, ratio to 1);
3. incremental syncs, nothing changed and 10 new messages: time and IMAP commands, for the
   10,000-message mailbox and for a 1,000-message one (the cost should not grow with size);
4. peak RSS of this process while the first sync runs.

Run: ``.venv/bin/python bench/bench_sync.py [--messages 10000] [--size 4096] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from cryptography.fernet import Fernet  # noqa: E402

from services.crypto import SecretBox  # noqa: E402
from services.db import make_engine, make_sessionmaker, unrestricted_unsafe_sessions  # noqa: E402
from services.migrate import upgrade  # noqa: E402
from services.settings import load_settings  # noqa: E402
from services.sync.fetch import HEADER_FIELDS, SNIPPET_BYTES  # noqa: E402
from tests.servers import mailgen  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.postgres import PostgresServer  # noqa: E402
from tests.services.mailboxes import BASE_DATE, Mailbox, new_mailbox, new_reader  # noqa: E402

BATCH = 500
RAW_ITEMS = [
    "UID",
    "FLAGS",
    "RFC822.SIZE",
    "INTERNALDATE",
    f"BODY.PEEK[HEADER.FIELDS ({' '.join(HEADER_FIELDS)})]",
    "BODYSTRUCTURE",
    f"BODY.PEEK[1]<0.{SNIPPET_BYTES}>",
]


def seed_messages(count: int, size: int, prefix: str) -> list[bytes]:
    from datetime import timedelta

    return [
        mailgen.message(
            f"{prefix} report {n} — status",
            f"Hello,\n\nhere is report {n}.",
            sender=f"Colleague {n % 50} <colleague{n % 50}@example.com>",
            to=["me@example.com", "team@example.com"],
            cc="boss@example.com" if n % 3 == 0 else None,
            date=BASE_DATE + timedelta(minutes=n),
            message_id=f"<{prefix}-{n}-{uuid.uuid4().hex[:6]}@bench>",
            size_hint=size,
        )
        for n in range(count)
    ]


def raw_fetch(mb: Mailbox) -> tuple[float, int]:
    """imapclient's own fetch of the same items in batches of 500, plus compat32 header
    parsing; returns (seconds, messages)."""
    parser = BytesHeaderParser(policy=compat32)
    started = time.perf_counter()
    count = 0
    with mb.imap() as client:
        client.select_folder("INBOX", readonly=True)
        uids = sorted(client.search(["ALL"]), reverse=True)
        for start in range(0, len(uids), BATCH):
            answer = client.fetch(uids[start : start + BATCH], RAW_ITEMS)
            for data in answer.values():
                header = next(v for k, v in data.items() if k.startswith(b"BODY[HEADER"))
                parsed = parser.parsebytes(header)
                for name in ("subject", "from", "to", "cc", "date", "message-id"):
                    parsed.get(name)
                count += 1
    return time.perf_counter() - started, count


@contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Sample this process's RSS every 5 ms; yields a dict filled with before/peak MB."""
    process = psutil.Process()
    result = {"before": process.memory_info().rss / 2**20, "peak": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], process.memory_info().rss / 2**20)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


def _sync_in_child(database_url: str, key: str, account_id: str, batch: int, results: Any) -> None:
    """Run one first sync in a fresh process; report its RSS before and at its peak (MB).

    Sampled, not ``ru_maxrss``: on Linux that survives fork and exec, so a child would
    inherit the high-water mark of this (seeding) process."""
    from services.sync import SyncOptions, sync_account

    settings = load_settings(
        database_url=database_url, secret_key=key, allow_private_hosts=True, sync_batch_size=batch
    )
    sessions = unrestricted_unsafe_sessions(make_sessionmaker(make_engine(settings)))
    with peak_rss() as rss:
        summary = sync_account(
            sessions,
            account_id,
            box=SecretBox(key),
            settings=settings,
            options=SyncOptions(),
            progress=lambda _p, _s: None,
        )
    results.put((rss["before"], rss["peak"], summary["new"]))


def child_peak_rss(database_url: str, key: str, account_id: str) -> tuple[float, float, int]:
    """(MB before the sync, peak MB, messages) of a first sync in a process of its own."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_sync_in_child, args=(database_url, key, account_id, BATCH, results))
    child.start()
    before, peak, count = results.get(timeout=600)
    child.join()
    return before, peak, count


def timed_sync(mb: Mailbox) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    summary = mb.sync()
    return time.perf_counter() - started, summary


def commands_text(summary: dict[str, Any]) -> str:
    by = summary["imap_commands"]["by_command"]
    return f"{summary['imap_commands']['total']} ({', '.join(f'{k} {v}' for k, v in sorted(by.items()))})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    key = Fernet.generate_key().decode()
    with PostgresServer() as pg, DovecotServer() as dovecot:
        url = pg.create_database("bench_sync")
        settings = load_settings(
            database_url=url, secret_key=key, allow_private_hosts=True, sync_batch_size=BATCH
        )
        engine = make_engine(settings)
        upgrade(engine)
        sessions = unrestricted_unsafe_sessions(make_sessionmaker(engine))
        box = SecretBox(key)

        print(f"seeding {args.messages:,} + {args.small:,} messages of ~{args.size:,} bytes …", flush=True)
        big = new_mailbox(dovecot, sessions, settings, box)
        small = new_mailbox(dovecot, sessions, settings, box)
        started = time.perf_counter()
        big.append("INBOX", seed_messages(args.messages, args.size, "big"))
        small.append("INBOX", seed_messages(args.small, args.size, "small"))
        print(f"  seeded in {time.perf_counter() - started:.1f} s", flush=True)

        raw_fetch(big)  # warm Dovecot's index cache, as for a mailbox being synced again
        load_before = os.getloadavg()[0]
        # The very first sync writes into a brand-new table and index; a production
        # database is not empty, so that run is shown apart, not measured with the rest.
        cold_seconds, _ = timed_sync(new_reader(dovecot, sessions, settings, box, big.user, big.password))

        # Raw and sync runs alternate, so a change of machine load hits both alike.
        raw_runs: list[tuple[float, float]] = []
        sync_runs: list[tuple[float, float]] = []
        memory: dict[str, float] = {}
        first_summary: dict[str, Any] = {}
        for run in range(args.repeat):
            cpu = time.process_time()
            seconds, count = raw_fetch(big)
            raw_runs.append((count / seconds, (time.process_time() - cpu) / count))
            reader = new_reader(dovecot, sessions, settings, box, big.user, big.password)
            cpu = time.process_time()
            with peak_rss() as rss:
                seconds, summary = timed_sync(reader)
            sync_runs.append((summary["new"] / seconds, (time.process_time() - cpu) / summary["new"]))
            if run == 0:
                memory, first_summary = rss, summary
        timed_sync(small)
        fresh = new_reader(dovecot, sessions, settings, box, big.user, big.password)
        child_before, child_peak, child_count = child_peak_rss(url, key, fresh.account_id)

        incremental: list[tuple[str, int, str, float, str]] = []
        for label, mb, size in (("big", reader, args.messages), ("small", small, args.small)):
            seconds, summary = timed_sync(mb)
            incremental.append((label, size, "nothing changed", seconds, commands_text(summary)))
            mb.append("INBOX", seed_messages(10, args.size, f"new-{label}"))
            seconds, summary = timed_sync(mb)
            assert summary["new"] == 10, summary
            incremental.append((label, size, "10 new messages", seconds, commands_text(summary)))

        raw_rates, sync_rates = [r for r, _ in raw_runs], [r for r, _ in sync_runs]
        raw, synced = statistics.median(raw_rates), statistics.median(sync_rates)
        print()
        print(
            f"First sync of {args.messages:,} messages (~{args.size:,} B), batches of {BATCH}, "
            f"{args.repeat} alternating runs (load average {load_before:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs)"
        )
        print(f"  {'':<46} {'median':>8} {'best':>8}  {'CPU/msg':>8}  runs (msg/s)")
        for label, rates, runs in (
            ("raw imapclient UID FETCH + compat32 header parse", raw_rates, raw_runs),
            ("sync_account first sync (PostgreSQL)", sync_rates, sync_runs),
        ):
            cpu_us = statistics.median(c for _, c in runs) * 1e6
            print(
                f"  {label:<46} {statistics.median(rates):>8,.0f} {max(rates):>8,.0f}  {cpu_us:>6.0f} µs"
                f"  {', '.join(f'{r:,.0f}' for r in rates)}"
            )
        print(
            f"  {'ratio sync / raw':<46} {synced / raw:>8.2f} {max(sync_rates) / max(raw_rates):>8.2f}"
            "  (target >= 0.70)"
        )
        print(
            f"  {'first sync into an empty database (cold)':<46} {args.messages / cold_seconds:>8,.0f} msg/s"
        )
        print(f"  {'IMAP commands of the first sync':<46} {commands_text(first_summary)}")
        print(
            f"  {'peak RSS during first sync (this process)':<46} {memory['peak']:>8.1f} MB "
            f"(before: {memory['before']:.1f} MB, +{memory['peak'] - memory['before']:.1f} MB)"
        )
        print(
            f"  {'peak RSS of a process doing only a first sync':<46} {child_peak:>8.1f} MB "
            f"(RSS before the sync: {child_before:.1f} MB; {child_count:,} messages)"
        )
        print()
        print("Incremental sync (6 folders; INBOX holds the messages)")
        print(f"  {'mailbox':<8} {'messages':>9}  {'change':<16} {'time':>9}  IMAP commands")
        for label, size, change, seconds, text in incremental:
            print(f"  {label:<8} {size:>9,}  {change:<16} {seconds * 1000:>7.1f} ms  {text}")


if __name__ == "__main__":
    main()
