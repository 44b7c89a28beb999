"""The ``webhooks`` queue's task: one attempt of one webhook delivery (services.webhooks).

Deliveries have no task record: the delivery row is their record (state, attempts, the
last attempts' status, latency and error). A failed attempt that may be retried comes back
as a new message after the backoff (a countdown in the broker, never a sleeping worker).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from celery import Celery, Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from services import webhooks
from services.db import tenant_sessions, transaction
from services.logs import log_context
from services.models import utcnow
from tasks.queues import WEBHOOK_TASK, broker_priority, logical_priority
from tasks.runtime import get_runtime

log = logging.getLogger("mailroom.webhooks")


@shared_task(name=WEBHOOK_TASK, bind=True, max_retries=None, acks_late=True)
def deliver_webhook(self: Task, tenant_id: str, delivery_id: str, manual: bool = False) -> dict[str, object]:
    """POST one event to one endpoint, signed; record the attempt; retry with backoff."""
    shared = get_runtime(self.app)
    runtime = replace(shared, sessions=tenant_sessions(shared.sessions, tenant_id))
    with log_context(task_id=self.request.id, tenant_id=tenant_id):
        outcome = webhooks.deliver(
            runtime.sessions,
            delivery_id,
            box=runtime.box,
            settings=runtime.settings,
            manual=manual,
            retry_number=self.request.retries or 0,
        )
        log.info("webhook delivery %s: %s", delivery_id, outcome.state)
        if outcome.retry_in is not None:
            # A new message after the countdown; this one is acknowledged.
            raise self.retry(countdown=outcome.retry_in, max_retries=None)
    return {"state": outcome.state}


def publish(app: Celery, tenant_id: str, delivery_ids: list[str], *, manual: bool = False) -> int:
    """Queue one delivery message each (after the commit that wrote them); never raises.
    Returns how many were published. The message's task id is the delivery's id, so the
    sweep of unpublished deliveries (:func:`sweep_unpublished`) finds it in the broker."""
    published = 0
    for delivery_id in delivery_ids:
        try:
            app.send_task(
                WEBHOOK_TASK,
                task_id=delivery_id,
                kwargs={"tenant_id": tenant_id, "delivery_id": delivery_id, "manual": manual},
                queue="webhooks",
                routing_key="webhooks",
                priority=broker_priority(logical_priority("webhooks", from_beat=False)),
                retry=False,
                ignore_result=True,
            )
            published += 1
        except Exception:
            log.warning(
                "webhooks: publishing delivery %s failed; it stays pending until the sweep",
                delivery_id,
                exc_info=True,
            )
    return published


def sweep_unpublished(
    app: Celery, sessions: sessionmaker[Session], *, now: datetime | None = None
) -> dict[str, int]:
    """Publish again the deliveries whose message never reached the broker (its publish
    failed after the commit, or the process died between the two), run by Beat's
    minute-level lost-message sweep (tasks.redispatch). One read of the partial index
    ``ix_webhook_deliveries_pending`` finds the ``pending`` ones untouched for
    :data:`services.webhooks.PUBLISH_GRACE` (at most :data:`services.webhooks.SWEEP_LIMIT`,
    oldest first); only when there are some is the broker read (the queues' lists and the
    unacked hash, twice a second apart, as tasks.redispatch does) to leave out those whose
    message is waiting there (a backlog, not a loss). Each is claimed by a conditional
    UPDATE before its publish, so two sweeps publish it once, and a delivery that a worker
    took up meanwhile is left alone. Pending ones older than a day end ``failed``."""
    from tasks.redispatch import missing_from_broker

    now = now or utcnow()
    with transaction(sessions) as session:
        expired = webhooks.fail_unpublished(session, now=now)
        candidates = webhooks.unpublished_candidates(session, now=now)
        for delivery in candidates:
            session.expunge(delivery)
    missing = candidates
    if candidates:
        with app.connection_for_write() as conn:
            missing = missing_from_broker(conn.default_channel, candidates)
    published = 0
    for delivery in missing:
        with transaction(sessions) as session:
            if not webhooks.claim_unpublished(session, delivery):
                continue
        published += publish(app, delivery.tenant_id, [delivery.id])
    if published or expired:
        log.warning(
            "webhooks: %d unpublished deliveries published again, %d failed as too old", published, expired
        )
    return {"pending": len(candidates), "republished": published, "expired": expired}
