"""Re-publishing the messages a broker lost, so every accepted task still ends.

A dispatch commits the record, then publishes its message; from then on the broker holds
the message (in a queue's list, or in the ``unacked`` hash while a worker has it). A Redis
broker that restarts empty (no persistence, a failover to a replica that had not caught
up) loses them all, and their records would wait ``queued`` until the day-old cleanup
failed them.

The sweep is cheap while nothing was lost and exact when something was:

- A marker key (:data:`EPOCH_KEY`) lives in the broker's Redis. While it is there, the
  broker kept its data since the sweep that set it: one ``EXISTS`` and done.
- When it is missing (the broker restarted empty, or this is its first sweep), the sweep
  reads the ids of every message the broker holds (each priority list of each queue and
  the ``unacked`` hash: O(messages), once per broker restart), and re-publishes exactly
  the ``queued`` and ``retrying`` records whose message is not among them, with the same
  task id (a queued send keeps its ``send_at``, a retry its time and its retry count).
  A record younger than :data:`PUBLISH_GRACE` may still be between its commit and its
  publish: it is left for the next sweep, and the marker is only set once no such record
  is missing, so none is forgotten. A message is looked for twice, a second apart, before
  it counts as lost: a worker's fetch moves it from the list to the hash in two steps.

Beat runs the sweep every ``REDISPATCH_SECONDS`` (tasks.celery_app; 60 s): a message lost with the broker is
published again within two sweeps of the broker being back (one if its record was older
than the grace at the first). A worker given a message whose record is finished or
cancelled meanwhile drops it (tasks.lifecycle), so a re-published message never runs a task
twice.

Each sweep also publishes again the webhook deliveries whose publish failed after their
commit (tasks.webhook_tasks.sweep_unpublished: a short index read while there are none).

What it does not cover: a broker that comes back with part of its data (an append-only
file missing its last second, a failover to a replica that lagged) keeps the marker, so
messages lost that way are only ended by the day-old cleanup (tasks.periodic).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from celery import Celery, Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from services import task_records
from services.db import transaction, unrestricted_unsafe_sessions
from services.models import OutboxEntry, TaskRecord, TaskState, utcnow
from tasks.dispatch import publish
from tasks.queues import PRIORITY_STEPS, QUEUES, TASK_TYPES
from tasks.runtime import get_runtime

log = logging.getLogger("mailroom.redispatch")

#: Present while the broker has kept its data since the last sweep that found it missing.
EPOCH_KEY = "mailroom:broker:epoch"
#: Longer than a publish can take after its commit (connect and socket timeouts: 3 + 10 s).
PUBLISH_GRACE = timedelta(seconds=30)
#: Messages read per round trip while scanning a list or the unacked hash.
SCAN_CHUNK = 1000
#: Pause between the two looks for a message.
SECOND_LOOK_SECONDS = 1.0


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


WithId = TypeVar("WithId", bound=_HasId)


@shared_task(name="mailroom.redispatch_lost", bind=True, ignore_result=False)
def redispatch_lost(self: Task) -> dict[str, Any]:
    """Beat's entry point: see the module's docstring."""
    from tasks.webhook_tasks import sweep_unpublished

    runtime = get_runtime(self.app)
    # The sweep reads every tenant's waiting records on purpose.
    sessions = unrestricted_unsafe_sessions(runtime.sessions)
    summary = sweep(self.app, sessions)
    # Webhook deliveries whose publish failed after their commit (no task record to look at).
    summary["webhooks"] = sweep_unpublished(self.app, sessions)
    return summary


def sweep(app: Celery, sessions: sessionmaker[Session], *, now: datetime | None = None) -> dict[str, Any]:
    """One sweep: ``{"checked": False}`` while the marker is there; otherwise how many
    records were waiting, how many were re-published, and how many wait for the next sweep."""
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        if client.exists(EPOCH_KEY):
            return {"checked": False, "waiting": 0, "redispatched": 0, "deferred": 0}
        now = now or utcnow()
        with transaction(sessions) as session:
            waiting = task_records.waiting_for_broker(session, settled_before=now)
            for record in waiting:
                session.expunge(record)
        missing = missing_from_broker(conn.default_channel, waiting)
        lost = [r for r in missing if _settled_at(r) < now - PUBLISH_GRACE]
        deferred = len(missing) - len(lost)
        redispatched = []
        for record in lost:
            outcome = _republish(app, sessions, record)
            if outcome == "published":
                redispatched.append(record.id)
            elif outcome == "failed":
                deferred += 1
        if not deferred:
            client.set(EPOCH_KEY, repr(time.time()))
    if redispatched or deferred:
        log.warning(
            "the broker lost its data: %d records waiting, %d re-published, %d left for the next sweep",
            len(waiting),
            len(redispatched),
            deferred,
        )
    return {
        "checked": True,
        "waiting": len(waiting),
        "redispatched": len(redispatched),
        "deferred": deferred,
        "task_ids": redispatched,
    }


def _settled_at(record: TaskRecord) -> datetime:
    """When the record's message was (or was about to be) published."""
    return record.updated_at if record.state == TaskState.RETRYING.value else record.created_at


def missing_from_broker(channel: Any, items: list[WithId]) -> list[WithId]:
    """The items (task records, webhook deliveries: their ``id`` is their message's task id)
    whose message the broker holds nowhere. Looked for twice, :data:`SECOND_LOOK_SECONDS`
    apart: a worker's fetch moves a message from its list to the unacked hash in two steps."""
    missing = items
    for look in range(2):
        if not missing:
            break
        if look:
            time.sleep(SECOND_LOOK_SECONDS)
        present = set(_message_ids(channel))
        missing = [item for item in missing if item.id not in present]
    return missing


def _message_ids(channel: Any) -> Iterator[str]:
    """The task id of every message the Redis broker holds: waiting in any queue's
    priority lists, or delivered and not yet acknowledged (kombu's ``unacked`` hash)."""
    client = channel.client
    for name in QUEUES:
        for step in PRIORITY_STEPS:
            key = channel._q_for_pri(name, step)
            start = 0
            while True:
                chunk = client.lrange(key, start, start + SCAN_CHUNK - 1)
                for raw in chunk:
                    task_id = _task_id(raw)
                    if task_id:
                        yield task_id
                if len(chunk) < SCAN_CHUNK:
                    break
                start += SCAN_CHUNK
    for _, raw in client.hscan_iter(channel.unacked_key, count=SCAN_CHUNK):
        try:
            message = json.loads(raw)[0]
        except (ValueError, TypeError, IndexError, KeyError):
            continue
        task_id = _task_id(message)
        if task_id:
            yield task_id


def _task_id(message: Any) -> str | None:
    try:
        if isinstance(message, (bytes, str)):
            message = json.loads(message)
        task_id = message["headers"]["id"]
    except (ValueError, TypeError, KeyError):
        return None
    return task_id if isinstance(task_id, str) else None


def _republish(app: Celery, sessions: sessionmaker[Session], record: TaskRecord) -> str:
    """Publish the record's message again if it is still waiting as it was when found lost
    (a cancel or a finish meanwhile needs no message, and of two sweeps at once only one
    publishes: :func:`services.task_records.claim_for_republish`): ``published``,
    ``skipped`` or ``failed`` (the broker refused: the next sweep tries again)."""
    if record.type not in TASK_TYPES:
        log.error("task %s: unknown type %r, not published again", record.id, record.type)
        return "skipped"
    with transaction(sessions) as session:
        if not task_records.claim_for_republish(session, record):
            return "skipped"
        eta, retries = None, 0
        if record.state == TaskState.RETRYING.value:
            eta, retries = record.next_retry_at, record.attempts
        elif record.type == "send":
            eta = _send_at(session, record)
    try:
        publish(app, record, eta=eta, retries=retries)
    except Exception:
        log.exception("re-publishing task %s failed; the next sweep tries again", record.id)
        return "failed"
    log.warning("task %s: its message was lost by the broker; published again", record.id)
    return "published"


def _send_at(session: Session, record: TaskRecord) -> datetime | None:
    """A queued send's scheduled time, if it is still ahead."""
    outbox_id = (record.params or {}).get("outbox_id")
    if not outbox_id:
        return None
    row = session.get(OutboxEntry, outbox_id)
    if row is None or row.send_at is None or row.send_at <= utcnow():
        return None
    return row.send_at
