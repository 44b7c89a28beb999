"""Probes, metrics and docs: no API key needed (``/metrics`` may ask for a token)."""

from __future__ import annotations

import hmac

from flask import Response, jsonify, redirect, request
from flask_openapi3 import APIBlueprint, Tag

from mailroom.context import state
from mailroom.docs import render_docs
from mailroom.health import readiness
from mailroom.metrics import render_metrics
from mailroom.schemas import ErrorResponse, ProbeOut
from services.errors import Unauthorized

tag = Tag(name="probes", description="Liveness, readiness, metrics and this document")
bp = APIBlueprint("probes", __name__, abp_tags=[tag])


@bp.get("/healthz", responses={200: ProbeOut})
def healthz() -> Response:
    """The process is alive (checks nothing else)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz", responses={200: ProbeOut, 503: ProbeOut})
def readyz() -> tuple[Response, int]:
    """The database, the broker and the result backend are reachable: ready to accept work.
    Says which check failed, never why (no hosts, no error texts); the log has the details."""
    ready, checks = readiness()
    return jsonify({"status": "ready" if ready else "unavailable", "checks": checks}), 200 if ready else 503


@bp.get("/metrics", responses={200: None, 401: ErrorResponse})
def metrics() -> Response:
    """Prometheus metrics (text format). Needs ``Bearer <MAILROOM_METRICS_TOKEN>`` when set."""
    token = state().settings.metrics_token
    if token:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("metrics need 'Authorization: Bearer <metrics token>'")
    body, content_type = render_metrics()
    return Response(body, content_type=content_type)


@bp.get("/docs", responses={200: None})
def docs() -> Response:
    """The API reference, rendered from /openapi.json."""
    return Response(render_docs(), content_type="text/html; charset=utf-8")


@bp.get("/", responses={302: None}, doc_ui=False)
def root() -> Response:
    return redirect("/docs")  # type: ignore[return-value]
