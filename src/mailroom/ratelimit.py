"""Per-tenant API rate limits (flask-limiter, counters in Redis).

What it promises:

* Every request except the probes (``/healthz``, ``/readyz``, ``/metrics``) counts against
  its tenant once the API key is known, and against its client address otherwise (no key,
  a bad key, the docs). The counters live in Redis (the broker's unless
  ``MAILROOM_RATE_LIMIT_STORAGE_URL`` names another), so the limits hold across API
  processes: two processes share one count.
* Two limits apply to every request (a burst per second and a sustained rate per minute),
  and a lower third one to routes that queue work (:data:`QUEUEING_ROUTES`).
* Over a limit the answer is ``429`` in the error shape, with ``Retry-After`` (whole
  seconds) in the header and in ``details``.
* A Redis that is down or slow never fails a request: the limiter falls back to counting in
  the process's memory (logged once), and checks Redis again now and then.
"""

from __future__ import annotations

import math
import time
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask_limiter import ApplicationLimit, Limiter, RequestLimit

from mailroom.errors import error_response
from services.settings import Settings

#: Never limited: an orchestrator's or Prometheus' polling must not depend on the counters.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

#: (method, URL rule) of the routes that put work on a queue. A route added later that
#: answers 202 belongs here (tests/api/test_ratelimit.py checks the OpenAPI document).
QUEUEING_ROUTES = frozenset(
    {
        ("POST", "/api/accounts/<account_id>/verify"),
        ("POST", "/api/accounts/<account_id>/sync"),
        ("POST", "/api/accounts/<account_id>/send"),
        ("POST", "/api/accounts/<account_id>/delete"),
        ("POST", "/api/accounts/<account_id>/spam-check"),
        ("POST", "/api/messages/<message_id>/spam"),
        ("POST", "/api/messages/<message_id>/ham"),
        ("POST", "/api/hooks/inbound/<account_id>"),
    }
)

#: How long one counter operation may wait on Redis before the request goes on without it.
STORAGE_TIMEOUT_SECONDS = 0.5

EXTENSION = "mailroom_limiter"


def rate_key() -> str:
    """The tenant after authentication, the client address before (or without) it."""
    who = g.get("principal")
    if who is not None:
        return f"tenant:{who.tenant_id}"
    return f"addr:{request.remote_addr or 'unknown'}"


def _storage_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": STORAGE_TIMEOUT_SECONDS,
        "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
    }
    sentinel = settings.broker_sentinel
    if settings.rate_limit_storage_url is None and sentinel is not None:
        options["db"] = sentinel.db
        if sentinel.sentinel_password:
            options["sentinel_kwargs"] = {"password": sentinel.sentinel_password}
    return options


def _is_probe() -> bool:
    return request.path in PROBE_PATHS


def queues_work() -> bool:
    rule = request.url_rule.rule if request.url_rule is not None else ""
    return (request.method, rule) in QUEUEING_ROUTES


def _too_many(limit: RequestLimit) -> Response:
    # reset_at is rounded up to the next second; never ask for more than one window.
    retry_after = min(limit.limit.get_expiry(), max(1, math.ceil(limit.reset_at - time.time())))
    response = error_response(
        429,
        "rate_limited",
        f"too many requests (limit {limit.limit}); retry after {retry_after} s",
        {"retry_after": retry_after, "limit": str(limit.limit)},
    )
    response.headers["Retry-After"] = str(retry_after)
    return response


def install_rate_limits(app: Flask, settings: Settings) -> Limiter:
    """Attach the limiter. Register it after authentication, so the tenant is known when it
    counts (its check is a ``before_request`` that runs in registration order)."""
    general = f"{settings.rate_limit_per_second}/second;{settings.rate_limit_per_minute}/minute"
    limiter = Limiter(
        rate_key,
        app=app,
        application_limits=[
            ApplicationLimit(general, key_function=rate_key, scope="api", exempt_when=_is_probe),
            ApplicationLimit(
                f"{settings.rate_limit_queue_per_minute}/minute",
                key_function=rate_key,
                scope="queue",
                exempt_when=lambda: not queues_work(),
            ),
        ],
        storage_uri=settings.rate_limit_storage,
        storage_options=_storage_options(settings),
        strategy="sliding-window-counter",
        key_prefix="mailroom",
        # Headers would cost a second Redis round trip on every response; 429s carry
        # Retry-After themselves.
        headers_enabled=False,
        # Fail open: when Redis is unreachable, count in this process's memory (logged),
        # and swallow anything else the limiter raises rather than fail the request.
        in_memory_fallback_enabled=True,
        swallow_errors=True,
        on_breach=_too_many,
        enabled=settings.rate_limit_enabled,
    )
    app.extensions[EXTENSION] = limiter
    return limiter


def count_unauthenticated() -> None:
    """Count a request whose key was refused, by client address, before its 401 goes out:
    a flood of bad keys gets 429s too. Raises the 429 when over the limit."""
    limiter: Limiter | None = current_app.extensions.get(EXTENSION)
    if limiter is not None and limiter.enabled:
        # The limiter's own before_request does not run once authentication has raised.
        limiter._check_request_limit()
