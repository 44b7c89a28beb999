"""The Celery application.

``make_celery(settings)`` builds it; importing this module builds nothing. The module-level
``app`` that ``celery -A tasks.celery_app worker -Q sync`` looks for is created on first
access (PEP 562), from settings read at that moment.
"""

from __future__ import annotations

import gc
import os
import ssl
from typing import Any

from celery import Celery, signals

from services.logs import configure_logging
from services.settings import Settings, load_settings
from tasks import metrics
from tasks.beat import KEY_PREFIX
from tasks.liveness import HeartbeatFile
from tasks.queues import (
    EXCHANGE,
    PERIODIC_TASKS,
    PRIORITY_STEPS,
    broker_priority,
    kombu_queues,
    logical_priority,
    task_routes,
)

TASK_MODULES = ["tasks.mail_tasks", "tasks.periodic", "tasks.redispatch", "tasks.webhook_tasks"]
#: How often Beat runs the sweep that re-publishes messages the broker lost (one
#: ``EXISTS`` while the broker kept its data: tasks.redispatch).
REDISPATCH_SECONDS = 60.0
REDISPATCH_TASK = "mailroom.redispatch_lost"
#: Longest sleep between Beat ticks, and how often a waiting Beat asks for the lock.
BEAT_MAX_LOOP_SECONDS = 15
#: How long a Beat's lock outlives its last tick: a dead Beat is replaced within this plus
#: one loop of the waiting Beat.
BEAT_LOCK_SECONDS = 60


def _ssl_options(enabled: bool, verify: bool) -> dict[str, Any] | None:
    if not enabled:
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED if verify else ssl.CERT_NONE}


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    """What kombu, Celery's result backend and redbeat each need to follow a Sentinel
    master (their URLs stay the sentinel:// ones)."""
    options: dict[str, Any] = {}
    broker = settings.broker_sentinel
    if broker is not None:
        options["broker_transport_options"] = broker.transport_options()
        sentinels = ";".join(f"sentinel://{host}:{port}" for host, port in broker.sentinels)
        options["redbeat_redis_url"] = "redis-sentinel://" + sentinels.removeprefix("sentinel://")
        options["redbeat_redis_options"] = broker.redbeat_options()
    backend = settings.result_backend_sentinel
    if backend is not None:
        options["result_backend_transport_options"] = backend.transport_options()
    return options


def make_celery(settings: Settings) -> Celery:
    """A Celery app wired to ``settings``: six queues, late ack, prefetch 1, limits, Beat."""
    app = Celery("mailroom", include=TASK_MODULES)
    periodic_priority = broker_priority(logical_priority("periodic", from_beat=True))
    app.conf.update(
        broker_url=settings.broker_connection_url,
        result_backend=settings.result_backend_connection_url,
        broker_use_ssl=_ssl_options(settings.broker_tls, settings.broker_tls_verify),
        redis_backend_use_ssl=_ssl_options(settings.result_backend_tls, settings.result_backend_tls_verify),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than the hard limit plus the longest retry delay, so a message still
            # being worked on is never handed to a second worker.
            "visibility_timeout": settings.broker_visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
        },
        result_backend_transport_options={"socket_connect_timeout": 3, "socket_timeout": 10},
        result_expires=settings.result_expires,
        result_extended=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_queues=kombu_queues(),
        task_default_queue="sync",
        task_default_exchange=EXCHANGE.name,
        task_default_routing_key="sync",
        task_routes={
            **task_routes(),
            "mailroom.redispatch_lost": {"queue": "periodic", "routing_key": "periodic"},
        },
        task_create_missing_queues=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_track_started=True,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_hard_time_limit,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        # Exactly one Beat: schedule and lock in the broker's Redis (tasks/beat.py).
        beat_scheduler="tasks.beat:MailroomScheduler",
        beat_max_loop_interval=BEAT_MAX_LOOP_SECONDS,
        redbeat_redis_url=settings.broker_connection_url,
        redbeat_redis_use_ssl=_ssl_options(settings.broker_tls, settings.broker_tls_verify),
        redbeat_redis_options={"socket_connect_timeout": 3, "socket_timeout": 10},
        redbeat_key_prefix=KEY_PREFIX,
        redbeat_lock_timeout=BEAT_LOCK_SECONDS,
        beat_schedule={
            "periodic-sync": {
                "task": PERIODIC_TASKS["periodic_sync"],
                "schedule": settings.periodic_sync_seconds,
                "options": {"queue": "periodic", "priority": periodic_priority},
            },
            # Messages a broker restarted empty lost are published again (tasks.redispatch).
            "redispatch-lost": {
                "task": REDISPATCH_TASK,
                "schedule": REDISPATCH_SECONDS,
                "options": {"queue": "periodic", "priority": periodic_priority},
            },
            "cleanup-stale-results": {
                "task": PERIODIC_TASKS["cleanup_stale_results"],
                "schedule": settings.cleanup_seconds,
                "options": {"queue": "periodic", "priority": periodic_priority},
            },
        },
    )
    sentinel = _sentinel_options(settings)
    for key in ("broker_transport_options", "result_backend_transport_options", "redbeat_redis_options"):
        if key in sentinel:
            app.conf[key] = {**app.conf[key], **sentinel.pop(key)}
    app.conf.update(sentinel)
    app.conf.mailroom_settings = settings
    _watch_worker_processes(settings)
    if settings.worker_heartbeat_file:
        app.steps["worker"].add(HeartbeatFile)
        app.conf.heartbeat_file = settings.worker_heartbeat_file
    return app


def take_niceness(nice: int) -> None:
    """Raise this process's niceness to ``nice`` (never lowers it: that needs privileges)."""
    if nice > 0:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def _watch_worker_processes(settings: Settings) -> None:
    """Worker metrics: the main process serves its children's files when a port is set; a
    child that exits stops counting in the live gauges."""

    def serve(**_: Any) -> None:
        # Before the pool forks: its processes inherit the niceness.
        take_niceness(settings.worker_nice)
        if settings.worker_metrics_port is not None:
            metrics.serve_worker_metrics(settings.worker_metrics_port)

    def forget(pid: int | None = None, **_: Any) -> None:
        metrics.forget_process(pid or os.getpid())

    def own_logging(**_: Any) -> None:
        # Connected, this signal stops Celery from configuring logging: every worker and
        # Beat logs in Mailroom's format, with the task's context (services/logs.py).
        configure_logging(settings.log_level, settings.log_format, force=True)

    def freeze_startup_objects(**_: Any) -> None:
        # Everything loaded so far (modules, mappers, compiled statements) lives as long as
        # the process: the collector need not walk it at every full collection, which
        # otherwise took pauses of a few hundred ms in the middle of tasks.
        gc.freeze()

    signals.worker_init.connect(serve, weak=False, dispatch_uid="mailroom-worker-metrics")
    signals.worker_init.connect(freeze_startup_objects, weak=False, dispatch_uid="mailroom-gc-freeze")
    signals.worker_process_init.connect(
        freeze_startup_objects, weak=False, dispatch_uid="mailroom-gc-freeze-child"
    )
    signals.worker_process_shutdown.connect(forget, weak=False, dispatch_uid="mailroom-forget-process")
    signals.setup_logging.connect(own_logging, weak=False, dispatch_uid="mailroom-logging")


_app: Celery | None = None


def get_app() -> Celery:
    """The process-wide app, built from the environment on first use."""
    global _app
    if _app is None:
        _app = make_celery(load_settings())
        _app.set_default()
    return _app


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        return get_app()
    raise AttributeError(name)
