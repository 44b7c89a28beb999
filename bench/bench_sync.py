"""Benchmark of IMAP sync against a private Dovecot and a private PostgreSQL.

Measures, in one run, on two mailboxes: a synthetic INBOX (10,000 messages of ~4 KB) and
the SpamAssassin dev corpus (all 3,598 real messages, read in place from
shared/corpora/spamassassin-dev.tar.gz; ``--no-corpus`` skips it):

1. the first sync (``sync_account`` into PostgreSQL) beside two references of the same
   run: (a) raw imapclient ``UID FETCH`` of the same fields, 500 UIDs per command, read by
   imapclient's own response parser, plus ``BytesHeaderParser(policy=compat32)`` of the
   headers; (b) the sync's own fetch and parser with no database (EXAMINE, UID SEARCH, our
   FETCH reader, ``message_row``). Sync against (a) is the end-to-end ratio; sync against
   (b) is what storing costs; (b) against (a) is what our parser saves;
2. incremental syncs, nothing changed and 10 new messages: time and IMAP commands, for the
   10,000-message mailbox and for a 1,000-message one (the cost should not grow with size);
3. peak RSS while a first sync runs (this process, and a process doing only that).

Run: ``.venv/bin/python bench/bench_sync.py [--messages 10000] [--size 4096] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tarfile
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

from bench.environment import DURABLE_POSTGRES  # noqa: E402
from services.crypto import SecretBox  # noqa: E402
from services.db import make_engine, make_sessionmaker, unrestricted_unsafe_sessions  # noqa: E402
from services.migrate import upgrade  # noqa: E402
from services.settings import load_settings  # noqa: E402
from services.sync.commands import examine, prepare, uid_search, uid_set  # noqa: E402
from services.sync.fetch import HEADER_FIELDS, SNIPPET_BYTES, fetch_messages, message_row  # noqa: E402
from tests.servers import mailgen  # noqa: E402
from tests.servers.dovecot import DovecotServer  # noqa: E402
from tests.servers.postgres import PostgresServer  # noqa: E402
from tests.services.mailboxes import BASE_DATE, Mailbox, new_mailbox, new_reader  # noqa: E402

BATCH = 500
CORPUS = ROOT.parent / "shared" / "corpora" / "spamassassin-dev.tar.gz"
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


def own_fetch(mb: Mailbox) -> tuple[float, int]:
    """What the first sync does on the wire and in Python, without the database: EXAMINE,
    UID SEARCH, then our UID FETCH of 500 UIDs at a time, newest first, each answer read
    by our parser and turned into row dicts; returns (seconds, messages)."""
    started = time.perf_counter()
    count = 0
    with mb.imap() as client:
        caps, _ = prepare(client)
        examine(client, "INBOX")
        uids = sorted(uid_search(client, "1:*"), reverse=True)
        for start in range(0, len(uids), BATCH):
            batch = uids[start : start + BATCH]
            data = fetch_messages(client, uid_set(batch), condstore=caps.condstore)
            count += len([message_row(uid, data[uid]) for uid in batch if uid in data])
    return time.perf_counter() - started, count


def corpus_messages(path: Path) -> list[bytes]:
    """Every message of the corpus archive, read in place (CRLF line ends, as IMAP stores
    them), in name order."""
    found: list[tuple[str, bytes]] = []
    with tarfile.open(path) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".eml"):
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                found.append((member.name, data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")))
    return [data for _, data in sorted(found)]


Runs = dict[str, list[tuple[float, float]]]


def compare_first_sync(
    mb: Mailbox, sessions: Any, settings: Any, box: SecretBox, repeat: int
) -> tuple[Runs, Mailbox, dict[str, Any], dict[str, float]]:
    """``repeat`` rounds of (a) raw imapclient, (b) our fetch without the database and
    the first sync of a fresh account reading the same mailbox, alternating so that a
    change of machine load hits all three alike. Per method: (msg/s, CPU s per message)."""
    runs: Runs = {"raw": [], "own": [], "sync": []}
    memory: dict[str, float] = {}
    first_summary: dict[str, Any] = {}
    reader = mb
    for run in range(repeat):
        for name, measure in (("raw", raw_fetch), ("own", own_fetch)):
            cpu = time.process_time()
            seconds, count = measure(mb)
            runs[name].append((count / seconds, (time.process_time() - cpu) / count))
        reader = new_reader(mb.server, sessions, settings, box, mb.user, mb.password)
        cpu = time.process_time()
        with peak_rss() as rss:
            seconds, summary = timed_sync(reader)
        runs["sync"].append((summary["new"] / seconds, (time.process_time() - cpu) / summary["new"]))
        if run == 0:
            memory, first_summary = rss, summary
    return runs, reader, first_summary, memory


WIDTH = 52


def print_first_sync(title: str, runs: Runs, summary: dict[str, Any]) -> None:
    rates = {name: [r for r, _ in values] for name, values in runs.items()}
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(title)
    print(f"  {'':<{WIDTH}} {'median':>8} {'best':>8}  {'CPU/msg':>8}  runs (msg/s)")
    for name, label in (
        ("raw", "(a) raw imapclient UID FETCH, its parser, compat32"),
        ("own", "(b) sync's own fetch and parser, no database"),
        ("sync", "sync_account first sync (PostgreSQL)"),
    ):
        cpu_us = statistics.median(c for _, c in runs[name]) * 1e6
        print(
            f"  {label:<{WIDTH}} {median[name]:>8,.0f} {max(rates[name]):>8,.0f}  {cpu_us:>6.0f} µs"
            f"  {', '.join(f'{r:,.0f}' for r in rates[name])}"
        )
    print(
        f"  {'ratio sync / (a) raw imapclient':<{WIDTH}} {median['sync'] / median['raw']:>8.2f}"
        "  (target >= 0.70)"
    )
    print(f"  {'ratio sync / (b) own fetch, no database':<{WIDTH}} {median['sync'] / median['own']:>8.2f}")
    print(
        f"  {'ratio (b) / (a): our parser against imapclient':<{WIDTH}} {median['own'] / median['raw']:>8.2f}"
    )
    print(f"  {'IMAP commands of one first sync':<{WIDTH}} {commands_text(summary)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-corpus", action="store_true", help="skip the SpamAssassin corpus")
    args = parser.parse_args(argv)

    key = Fernet.generate_key().decode()
    with PostgresServer(extra_settings=DURABLE_POSTGRES) as pg, DovecotServer() as dovecot:
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
        corpus: list[bytes] = []
        real: Mailbox | None = None
        if CORPUS.exists() and not args.no_corpus:
            corpus = corpus_messages(CORPUS)
            real = new_mailbox(dovecot, sessions, settings, box)
            real.append("INBOX", corpus)
        print(f"  seeded in {time.perf_counter() - started:.1f} s", flush=True)

        raw_fetch(big)  # warm Dovecot's index cache, as for a mailbox being synced again
        load_before = os.getloadavg()[0]
        # The very first sync writes into a brand-new table and index; a production
        # database is not empty, so that run is shown apart, not measured with the rest.
        cold_seconds, _ = timed_sync(new_reader(dovecot, sessions, settings, box, big.user, big.password))
        runs, reader, first_summary, memory = compare_first_sync(big, sessions, settings, box, args.repeat)
        corpus_runs: Runs | None = None
        corpus_summary: dict[str, Any] = {}
        if real is not None:
            raw_fetch(real)
            corpus_runs, _, corpus_summary, _ = compare_first_sync(real, sessions, settings, box, args.repeat)
        load_after = os.getloadavg()[0]

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

        print()
        print(
            f"First sync, batches of {BATCH}, {args.repeat} alternating runs of each method "
            f"(load average {load_before:.1f} before, {load_after:.1f} after, {os.cpu_count()} CPUs)"
        )
        print()
        print_first_sync(
            f"Synthetic INBOX: {args.messages:,} messages of ~{args.size:,} B", runs, first_summary
        )
        print(
            f"  {'first sync into an empty database (cold)':<{WIDTH}} "
            f"{args.messages / cold_seconds:>8,.0f} msg/s"
        )
        print(
            f"  {'peak RSS during first sync (this process)':<{WIDTH}} {memory['peak']:>8.1f} MB "
            f"(before: {memory['before']:.1f} MB, +{memory['peak'] - memory['before']:.1f} MB)"
        )
        print(
            f"  {'peak RSS of a process doing only a first sync':<{WIDTH}} {child_peak:>8.1f} MB "
            f"(RSS before the sync: {child_before:.1f} MB; {child_count:,} messages)"
        )
        if corpus_runs is not None:
            print()
            average = sum(len(m) for m in corpus) / len(corpus)
            print_first_sync(
                f"SpamAssassin dev corpus: {len(corpus):,} real messages, {average:,.0f} B on average",
                corpus_runs,
                corpus_summary,
            )
        print()
        print("Incremental sync (6 folders; INBOX holds the messages)")
        print(f"  {'mailbox':<8} {'messages':>9}  {'change':<16} {'time':>9}  IMAP commands")
        for label, size, change, seconds, text in incremental:
            print(f"  {label:<8} {size:>9,}  {change:<16} {seconds * 1000:>7.1f} ms  {text}")


if __name__ == "__main__":
    main()
