"""The ``webhooks`` queue's task: one attempt of one webhook delivery (services.webhooks).

Deliveries have no task record: the delivery row is their record (state, attempts, the
last attempts' status, latency and error). A failed attempt that may be retried comes back
as a new message after the backoff (a countdown in the broker, never a sleeping worker).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from celery import Task, shared_task

from services import webhooks
from services.db import tenant_sessions
from services.logs import log_context
from tasks.queues import WEBHOOK_TASK
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
