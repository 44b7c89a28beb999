"""Beat's work: keep due accounts synced, and clean up old results and stuck records."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from itertools import zip_longest
from typing import Any

from celery import Celery, Task, shared_task
from sqlalchemy.exc import IntegrityError

from services import accounts, task_records, webhooks
from services.db import tenant_sessions, transaction, unrestricted_unsafe_sessions
from services.errors import NotFound, ServiceUnavailable
from services.models import utcnow
from services.send.retention import sweep_outbox
from tasks import webhook_tasks
from tasks.dispatch import dispatch
from tasks.runtime import Runtime, get_runtime

log = logging.getLogger("mailroom.periodic")

#: A queued message older than this was lost by the broker, not merely waiting.
UNDELIVERED_AFTER = timedelta(days=1)


#: Syncs of one tenant queued per session (one connection, one transaction each) in a round.
DISPATCH_CHUNK = 50


@shared_task(name="mailroom.periodic_sync", bind=True, ignore_result=False)
def periodic_sync(self: Task) -> dict[str, Any]:
    """Queue a Beat-priority sync for every account that is due (its place in its interval,
    services.accounts.next_sync_at, is before the middle of the next tick) and that has no
    sync in flight. Two Beats running at once cannot double a sync: each sync claims the
    account's lock with one conditional UPDATE, and only one claim wins.

    One query reads the due accounts with their tenant and user; they are queued in chunks
    of one tenant's accounts, up to :data:`DISPATCH_CHUNK` in one session, each in its own
    short transaction (the record, the lock claim, the publish). The chunks take turns
    between tenants (a chunk of each tenant, then the next of each), so a tenant with many
    accounts does not put all of its syncs ahead of everyone else's in the queue."""
    return queue_due_syncs(self.app, get_runtime(self.app))


def queue_due_syncs(app: Celery, runtime: Runtime) -> dict[str, Any]:
    """periodic_sync's round (also timed by bench/bench_beat.py)."""
    # Beat reads across tenants on purpose; each dispatch then runs bound to its tenant.
    with transaction(unrestricted_unsafe_sessions(runtime.sessions)) as session:
        due = accounts.due_accounts(session, utcnow(), tick_seconds=runtime.settings.periodic_sync_seconds)
    by_tenant: dict[str, list[accounts.DueAccount]] = defaultdict(list)
    for account in due:
        by_tenant[account.tenant_id].append(account)
    chunks = [
        [
            (tenant_id, members[start : start + DISPATCH_CHUNK])
            for start in range(0, len(members), DISPATCH_CHUNK)
        ]
        for tenant_id, members in by_tenant.items()
    ]
    queued: list[str] = []
    skipped = 0
    for turn in zip_longest(*chunks):
        for chunk in turn:
            if chunk is None:
                continue
            try:
                outcome = _dispatch_chunk(app, runtime, *chunk)
            except ServiceUnavailable:
                log.warning("periodic sync: broker unavailable, stopping this round")
                return _summary(due, queued, skipped)
            queued += outcome[0]
            skipped += outcome[1]
    return _summary(due, queued, skipped)


def _dispatch_chunk(
    app: Celery, runtime: Runtime, tenant_id: str, chunk: list[accounts.DueAccount]
) -> tuple[list[str], int]:
    """Queue one tenant's chunk of due accounts in one session: (task ids queued, accounts
    skipped because a sync was in flight already)."""
    queued: list[str] = []
    skipped = 0
    session = tenant_sessions(runtime.sessions, tenant_id)()
    try:
        for account in chunk:
            try:
                result = dispatch(
                    app,
                    session,
                    type="sync",
                    tenant_id=tenant_id,
                    user_id=account.user_id,
                    account_id=account.id,
                    params={},
                    origin="beat",
                )
            except (NotFound, IntegrityError):
                session.rollback()  # the account was deleted since the due query
                continue
            if result.created:
                queued.append(result.record.id)
            else:
                skipped += 1
    finally:
        session.close()
    return queued, skipped


def _summary(due: list[accounts.DueAccount], queued: list[str], skipped: int) -> dict[str, Any]:
    return {"due": len(due), "queued": len(queued), "already_running": skipped, "task_ids": queued}


@shared_task(name="mailroom.cleanup_stale_results", bind=True)
def cleanup_stale_results(self: Task) -> dict[str, int]:
    """Fail records no worker can still be working on, fail queued records the broker lost,
    settle the outbox (drop message bytes no attempt can need, delete final rows older than
    the outbox retention: services.send.retention), and forget finished records and webhook
    deliveries older than the kept history. Celery's own results in Redis expire by themselves
    (``result_expires``)."""
    runtime = get_runtime(self.app)
    s = runtime.settings
    now = utcnow()
    # The windows, and which one decides. A worker that dies (SIGKILL, a lost pod) leaves
    # its message unacknowledged; the broker hands it out again once the visibility timeout
    # has passed since delivery, and the task resumes. So the broker's visibility timeout
    # decides when a lost attempt is retried, and this sweep only gives a record up once
    # that chance has passed: silent (no progress write, or past its retry time) for longer
    # than the visibility timeout plus a grace period. The sync lock has no clock of its
    # own: it is free once its holder's record is final. Settings check that the visibility
    # timeout exceeds the hard time limit plus the longest retry delay, so a message that
    # is still being worked on (or held for its retry) is never handed to a second worker.
    silent_for = timedelta(seconds=s.broker_visibility_timeout + s.stuck_task_grace_seconds)
    with transaction(unrestricted_unsafe_sessions(runtime.sessions)) as session:
        stuck = task_records.fail_stuck(session, older_than=now - silent_for)
        lost = task_records.fail_undelivered(session, older_than=now - max(UNDELIVERED_AFTER, silent_for))
        # Before the history goes: a row whose task ended takes its final state from the record.
        outbox = sweep_outbox(session, now=now, retention=timedelta(hours=s.outbox_retention_hours))
        forgotten = task_records.delete_history(session, older_than=now - timedelta(days=s.task_history_days))
        deliveries = webhooks.delete_old_deliveries(
            session, older_than=now - timedelta(days=s.task_history_days)
        )
        # Their task.failed (and account.error) events, committed with the failures.
        events = webhooks.record_swept_failures(session, stuck + lost)
    for tenant_id, delivery_ids in events.items():
        webhook_tasks.publish(self.app, tenant_id, delivery_ids)
    log.info(
        "cleanup: %d stuck, %d undelivered, %d forgotten; outbox: %d settled, %d bytes dropped, %d deleted",
        len(stuck),
        len(lost),
        forgotten,
        outbox.settled,
        outbox.bytes_dropped,
        outbox.deleted,
    )
    return {
        "stuck_failed": len(stuck),
        "undelivered_failed": len(lost),
        "history_deleted": forgotten,
        "webhook_deliveries_deleted": deliveries,
        **outbox.as_dict(),
    }
