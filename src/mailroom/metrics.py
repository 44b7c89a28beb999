"""Prometheus metrics for the API: request counts and latency (multiprocess-safe under
gunicorn when ``PROMETHEUS_MULTIPROC_DIR`` is set), plus queue depths and task counts
read at scrape time."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from mailroom.context import state
from mailroom.health import run_checks
from services import task_stats
from services.db import unrestricted_unsafe_sessions
from tasks.monitoring import get_queue_details

ACCESS_LOG = logging.getLogger("mailroom.access")
REQUESTS = Counter("mailroom_http_requests_total", "HTTP requests", ["method", "endpoint", "status"])
LATENCY = Histogram(
    "mailroom_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class MailroomCollector(Collector):
    """Queue depths from the broker, and task counts by queue and state (all tenants): in
    flight exactly, successes as a counter, failures and cancellations of the last hour."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        with self.app.app_context():
            st = state()
            depth = GaugeMetricFamily("mailroom_queue_depth", "Messages waiting per queue", labels=["queue"])
            by_priority = GaugeMetricFamily(
                "mailroom_queue_depth_by_priority",
                "Messages waiting per queue and priority (10 = most urgent)",
                labels=["queue", "priority"],
            )
            oldest = GaugeMetricFamily(
                "mailroom_queue_oldest_age_seconds",
                "How long the oldest waiting message of each queue has waited (0 when empty)",
                labels=["queue"],
            )
            try:
                for queue, detail in get_queue_details(st.celery).items():
                    depth.add_metric([queue], detail.depth)
                    for priority, n in sorted(detail.by_priority.items()):
                        by_priority.add_metric([queue, str(priority)], n)
                    oldest.add_metric([queue], detail.oldest_age or 0.0)
            except Exception:  # noqa: BLE001 - a scrape must not fail with the broker
                pass
            yield depth
            yield by_priority
            yield oldest
            up = GaugeMetricFamily(
                "mailroom_dependency_up",
                "Whether the API reaches each store it needs (1) or not (0), as /readyz checks",
                labels=["dependency"],
            )
            for name, outcome in run_checks().items():
                up.add_metric([name], 1.0 if outcome["ok"] else 0.0)
            yield up
            # Counts across all tenants: the scrape is the operator's view. Never the whole
            # task history: in-flight rows through their partial index, successes from the
            # running totals, failures of the last hour through theirs.
            with unrestricted_unsafe_sessions(st.sessions)() as session:
                in_flight, succeeded, ended = task_stats.scrape_counts(session)
            tasks = GaugeMetricFamily(
                "mailroom_tasks", "Task records in flight per queue and state", labels=["queue", "state"]
            )
            for queue, task_state, n in in_flight:
                tasks.add_metric([queue, task_state], n)
            yield tasks
            done = CounterMetricFamily(
                "mailroom_tasks_succeeded", "Tasks that succeeded, per queue", labels=["queue"]
            )
            for queue, n in succeeded.items():
                done.add_metric([queue], n)
            yield done
            recent = GaugeMetricFamily(
                "mailroom_tasks_ended_recently",
                f"Tasks failed or cancelled in the last {int(task_stats.RECENT.total_seconds())} s",
                labels=["queue", "state"],
            )
            for queue, task_state, n in ended:
                recent.add_metric([queue, task_state], n)
            yield recent


def install_metrics(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.metrics_start = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        start = g.get("metrics_start")
        elapsed = time.perf_counter() - start if start is not None else 0.0
        if start is not None:
            LATENCY.labels(request.method, endpoint).observe(elapsed)
        REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
        # The access log (gunicorn's own is off): never the query string or a header.
        who = g.get("principal")
        ACCESS_LOG.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status_code,
            extra={
                "method": request.method,
                "path": request.path,
                "route": endpoint,
                "status": response.status_code,
                "duration_ms": round(elapsed * 1000, 2),
                "tenant_id": who.tenant_id if who is not None else None,
            },
        )
        return response

    app.extensions["mailroom_collector"] = MailroomCollector(app)


def render_metrics() -> tuple[bytes, str]:
    from flask import current_app

    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        registry.register(REQUESTS)
        registry.register(LATENCY)
    registry.register(current_app.extensions["mailroom_collector"])
    return generate_latest(registry), CONTENT_TYPE_LATEST
