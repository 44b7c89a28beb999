"""The six queues, their priorities and retry budgets, and how a task type maps onto them.

Separate queues served by separate workers are the primary isolation: a backlog on ``spam``
never delays ``sync``. Inside a queue, message priority orders the work. The table speaks
of priorities 10 (highest) .. 0; the Redis transport serves priority 0 first, so
:func:`broker_priority` turns one into the other explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kombu import Exchange, Queue

EXCHANGE = Exchange("mailroom", type="direct", durable=True)

#: Priority steps the Redis transport keeps a list for (0 served first).
PRIORITY_STEPS = list(range(11))

#: How far below a user-triggered task of the same queue a Beat-triggered one runs.
BEAT_PRIORITY_DROP = 5


@dataclass(frozen=True)
class QueueSpec:
    name: str
    priority: int  # 10 = most urgent
    max_retries: int


QUEUES: dict[str, QueueSpec] = {
    spec.name: spec
    for spec in (
        QueueSpec("sync", priority=10, max_retries=5),
        QueueSpec("send", priority=8, max_retries=3),
        QueueSpec("delete", priority=5, max_retries=5),
        QueueSpec("spam", priority=3, max_retries=3),
        QueueSpec("periodic", priority=10, max_retries=0),
        # Outbound webhook deliveries: no task records; attempts are bounded by
        # MAILROOM_WEBHOOK_MAX_ATTEMPTS and a day (services.webhooks).
        QueueSpec("webhooks", priority=2, max_retries=0),
    )
}


@dataclass(frozen=True)
class TaskType:
    """A kind of work the API can ask for: its Celery task name and the queue it runs on."""

    type: str
    task_name: str
    queue: str
    #: A first guess at the duration (seconds) until this account has history of its own.
    default_estimate: float

    @property
    def spec(self) -> QueueSpec:
        return QUEUES[self.queue]


TASK_TYPES: dict[str, TaskType] = {
    t.type: t
    for t in (
        TaskType("sync", "mailroom.sync_emails", "sync", 30.0),
        TaskType("verify", "mailroom.verify_account", "sync", 3.0),
        TaskType("send", "mailroom.send_email", "send", 2.0),
        TaskType("delete", "mailroom.delete_emails", "delete", 2.0),
        TaskType("spam_check", "mailroom.check_spam", "spam", 5.0),
    )
}

PERIODIC_TASKS = {
    "periodic_sync": "mailroom.periodic_sync",
    "cleanup_stale_results": "mailroom.cleanup_stale_results",
}


#: The one task of the webhooks queue (tasks.webhook_tasks): one message per delivery.
WEBHOOK_TASK = "mailroom.deliver_webhook"


def logical_priority(queue: str, *, from_beat: bool) -> int:
    """0..10, higher first: the queue's priority, lowered for work Beat started."""
    base = QUEUES[queue].priority
    return max(0, base - BEAT_PRIORITY_DROP) if from_beat else base


def broker_priority(logical: int) -> int:
    """The Redis transport's priority for a 0..10 (10 = most urgent) priority."""
    return 10 - max(0, min(10, logical))


def logical_from_broker(step: int) -> int:
    """The 0..10 priority (10 = most urgent) of a Redis transport priority step."""
    return 10 - step


def kombu_queues() -> list[Queue]:
    return [Queue(spec.name, EXCHANGE, routing_key=spec.name, durable=True) for spec in QUEUES.values()]


def task_routes() -> dict[str, dict[str, str]]:
    routes = {t.task_name: {"queue": t.queue, "routing_key": t.queue} for t in TASK_TYPES.values()}
    for name in PERIODIC_TASKS.values():
        routes[name] = {"queue": "periodic", "routing_key": "periodic"}
    routes[WEBHOOK_TASK] = {"queue": "webhooks", "routing_key": "webhooks"}
    return routes
