"""Benchmark of deleting messages against a private Dovecot and a private PostgreSQL (the
Deployments' database) or, with ``--database sqlite``, a SQLite file (``mailroom run``'s).

Deletes 5,000 synced INBOX messages, moved to Trash and permanently, with the delete
worker's service (``services.mail_delete.delete_messages``: plan from the rows, STATUS and
SELECT checks, batches of ``delete_batch_size`` (2,000 as shipped) each one command, each
batch's rows and counts committed) beside raw
imapclient doing the same IMAP work on the same number of messages in the same run, with
QRESYNC enabled as Mailroom's delete enables it (expunges are then reported as one
``VANISHED`` line of UID ranges, not one ``EXPUNGE`` line per message; 8 % faster for raw
here): (a) ``UID MOVE`` / ``UID STORE +FLAGS.SILENT (\\Deleted)`` + ``UID EXPUNGE``, as many UIDs
per command as our batches; (b) the same as one command for all 5,000 UIDs. Rounds alternate
Mailroom and raw on fresh mailboxes; medians are reported. Raw works on synced mailboxes
too, so Dovecot's side is the same: a mailbox whose messages were fetched has their
fields in its cache file, which a MOVE copies and an EXPUNGE drops (on this machine raw
was about 10-20 % slower on a synced mailbox than on one never fetched).

Also end to end: ``POST /api/accounts/{id}/delete`` with the 5,000 ids (the app in this
process) until the task's record says ``succeeded``, run by a real ``celery worker`` on the
delete queue (polled every 10 ms). Where that time goes is printed too, from the record's
own times: the ``202`` answer, pickup (the answer until the worker marked the record
``running``), the attempt (``running`` until the final state was written) and the rest
until the poll saw it.

Run: ``.venv/bin/python bench/bench_delete.py [--messages 5000] [--repeat 3]
[--database postgresql|sqlite]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from sqlalchemy import select  # noqa: E402

from bench.environment import BenchEnvironment, fmt, machine_busy_seconds, print_table, ratio  # noqa: E402
from mailroom.app import create_app  # noqa: E402
from services import mail_delete  # noqa: E402
from services.crypto import SecretBox  # noqa: E402
from services.models import TaskRecord  # noqa: E402
from services.sync import SyncOptions, sync_account  # noqa: E402
from services.tenancy import Principal  # noqa: E402
from tests.servers.workers import CeleryWorker  # noqa: E402
from tests.services.mailboxes import Mailbox, make_messages, new_mailbox  # noqa: E402

BATCH = mail_delete.BATCH_SIZE


def fresh_mailbox(env: BenchEnvironment, count: int, *, synced: bool) -> Mailbox:
    assert env.dovecot is not None
    mb = new_mailbox(env.dovecot, env.sessions(), env.settings, SecretBox(env.settings.encryption_keys()))
    mb.append("INBOX", make_messages(count, prefix="del"))
    if synced:
        sync_account(
            mb.sessions,
            mb.account_id,
            box=mb.box,
            settings=mb.settings,
            options=SyncOptions(),
            progress=lambda percent, stage: None,
        )
    return mb


def mailroom_delete(mb: Mailbox, *, permanent: bool) -> tuple[float, dict[str, Any]]:
    ids = [m.id for m in mb.messages("INBOX")]
    started = time.perf_counter()
    result = mb.delete(ids, permanent=permanent)
    return time.perf_counter() - started, result


def api_delete(env: BenchEnvironment, client: Any, n: int, *, permanent: bool) -> tuple[float, list[float]]:
    """A fresh owner's 5,000 synced messages deleted through the API and the worker."""
    assert env.dovecot is not None
    owner = env.create_owner(env.sessions())
    user = (owner.mailbox_user, "pw-" + owner.mailbox_user.removeprefix("u"))
    env.dovecot.append_messages(*user, "INBOX", make_messages(n, prefix="api"))
    who = Principal(tenant_id=owner.tenant_id, user_id=owner.user_id, role="admin")
    mb = Mailbox(env.dovecot, *user, owner.account_id, who, env.sessions(), env.settings, box(env))
    sync_account(
        mb.sessions,
        mb.account_id,
        box=mb.box,
        settings=mb.settings,
        options=SyncOptions(),
        progress=lambda percent, stage: None,
    )
    ids = [m.id for m in mb.messages("INBOX")]
    headers = {"Authorization": f"Bearer {owner.api_key}"}
    body = {"message_ids": ids, "permanent": permanent}
    wall = datetime.now(UTC)
    started = time.perf_counter()
    response = client.post(f"/api/accounts/{owner.account_id}/delete", json=body, headers=headers)
    answered = time.perf_counter() - started
    assert response.status_code == 202, response.get_json()
    task_id = response.get_json()["task_id"]
    # Only the state: the record also holds the 5,000 ids, and loading them every 10 ms
    # took a good part of a core from the worker on a 2-core machine.
    poll = select(TaskRecord.state).where(TaskRecord.id == task_id)
    while True:
        with mb.sessions() as session:
            state = session.scalar(poll)
        if state in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.01)
    seconds = time.perf_counter() - started
    assert state == "succeeded" and mb.server_uids("INBOX") == [], state
    with mb.sessions() as session:
        record = session.get(TaskRecord, task_id)
        assert record is not None and record.started_at and record.finished_at
        running = (record.started_at - wall).total_seconds()
        finished = (record.finished_at - wall).total_seconds()
    return seconds, [answered, running - answered, finished - running, seconds - finished]


def box(env: BenchEnvironment) -> SecretBox:
    return SecretBox(env.settings.encryption_keys())


def raw_delete(mb: Mailbox, *, permanent: bool, batch: int | None) -> float:
    """Raw imapclient: log in, ENABLE QRESYNC (the server then reports expunges as UID ranges,
    as it does to Mailroom), SELECT, then MOVE or STORE + UID EXPUNGE of every UID."""
    started = time.perf_counter()
    with mb.imap() as client:
        client.enable("QRESYNC")
        client.select_folder("INBOX")
        uids = sorted(client.search(["ALL"]))
        size = batch or len(uids)
        for start in range(0, len(uids), size):
            chunk = uids[start : start + size]
            if permanent:
                client.add_flags(chunk, [b"\\Deleted"], silent=True)
                client.uid_expunge(chunk)
            else:
                client.move(chunk, "Trash")
            client._imap.untagged_responses.clear()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--database",
        choices=("postgresql", "sqlite"),
        default="postgresql",
        help="the Deployments' PostgreSQL, or SQLite as `mailroom run` ships it",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-delete-") as tmp:
        overrides: dict[str, Any] = (
            {"database_url": f"sqlite:///{tmp}/mailroom.db"} if args.database == "sqlite" else {}
        )
        with BenchEnvironment(dovecot=True, **overrides) as env:
            run(env, args)


def run(env: BenchEnvironment, args: argparse.Namespace) -> None:
    n = args.messages
    worker = CeleryWorker(["delete"], env=env.subprocess_env(), name="bench-delete", cwd=ROOT)
    env.add_cleanup(worker.cleanup)
    worker.start()
    client = create_app(env.settings).test_client()
    rows = []
    parts: list[list[str]] = []
    for permanent in (False, True):
        ours: list[float] = []
        end_to_end: list[float] = []
        phases: list[list[float]] = []
        raw_batched: list[float] = []
        raw_one: list[float] = []
        busy = machine_busy_seconds()
        for _ in range(args.repeat):
            mb = fresh_mailbox(env, n, synced=True)
            seconds, result = mailroom_delete(mb, permanent=permanent)
            done = result["deleted"] if permanent else result["moved"]
            assert done == n and not result["gone"], result
            assert mb.server_uids("INBOX") == [] and not mb.messages("INBOX")
            ours.append(seconds)
            seconds, phase = api_delete(env, client, n, permanent=permanent)
            end_to_end.append(seconds)
            phases.append(phase)
            raw_batched.append(
                raw_delete(fresh_mailbox(env, n, synced=True), permanent=permanent, batch=BATCH)
            )
            raw_one.append(raw_delete(fresh_mailbox(env, n, synced=True), permanent=permanent, batch=None))
        mode = "permanent (UID EXPUNGE)" if permanent else "move to Trash (UID MOVE)"
        parts.append(
            [mode, fmt(statistics.median(end_to_end) * 1000, 0)]
            + [fmt(statistics.median(p[i] for p in phases) * 1000, 0) for i in range(4)]
            + [fmt(statistics.median(ours) * 1000, 0), fmt(statistics.median(raw_batched) * 1000, 0)]
        )
        rate = n / statistics.median(ours)
        rate_api = n / statistics.median(end_to_end)
        rate_b = n / statistics.median(raw_batched)
        rate_one = n / statistics.median(raw_one)
        rows.append(
            [
                mode,
                fmt(rate, 0),
                fmt(rate_api, 0),
                fmt(rate_b, 0),
                fmt(rate_one, 0),
                fmt(ratio(rate, rate_b), 2),
                fmt(ratio(rate, rate_one), 2),
                fmt(ratio(rate_api, rate_b), 2),
                fmt(ratio(rate_api, rate_one), 2),
                fmt(machine_busy_seconds() - busy, 1),
            ]
        )
    print_table(
        f"Delete {n:,} synced messages on {args.database}: messages/s, median of {args.repeat} "
        "alternating rounds (Mailroom = the delete task's service with its database writes; "
        "raw = imapclient)",
        [
            "mode",
            "Mailroom",
            "API + worker",
            f"raw, {mail_delete.BATCH_SIZE}/command",
            "raw, 1 command",
            f"÷ raw {mail_delete.BATCH_SIZE}",
            "÷ raw 1 cmd",
            f"API ÷ raw {mail_delete.BATCH_SIZE}",
            "API ÷ raw 1 cmd",
            "busy CPU s",
        ],
        rows,
    )
    print_table(
        "Where the end-to-end time goes (ms, medians): the 202, the worker's pickup, the "
        "attempt (marked running to final state), the poll; beside the task code alone and raw",
        ["mode", "end to end", "202", "pickup", "attempt", "poll", "task code", f"raw {BATCH}/cmd"],
        parts,
    )


if __name__ == "__main__":
    main()
