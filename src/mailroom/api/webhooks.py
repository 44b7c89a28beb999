"""Webhooks: ``/api/webhooks`` (a tenant's outbound endpoints and their deliveries, admin
only), the account's inbound hook secret, and the signed inbound hook itself
(``POST /api/hooks/inbound/{account_id}``, no API key). services.webhooks has the rules."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from flask import Response, jsonify, request, url_for
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field, StrictBool
from redis.exceptions import RedisError

from mailroom.api.accounts import accepted
from mailroom.api.common import ERRORS, SECURITY, page_info
from mailroom.auth import principal, require_admin
from mailroom.context import db_session, state
from mailroom.schemas import AccountPath, PageInfo, PageQuery, Strict, TaskAccepted
from services import accounts, webhooks
from services.db import bind_tenant
from services.errors import ServiceUnavailable
from services.models import WebhookDelivery, WebhookEndpoint
from services.task_inputs import SyncParams
from services.tenant_slots import broker_redis
from tasks import webhook_tasks
from tasks.dispatch import dispatch

tag = Tag(
    name="webhooks",
    description="Signed event deliveries to a tenant's endpoints, and the signed inbound hook",
)
bp = APIBlueprint("webhooks", __name__, url_prefix="/api", abp_tags=[tag], abp_security=SECURITY)
#: The inbound hook: signed with the account's hook secret instead of an API key.
HOOK_SECURITY: list[dict[str, list[Any]]] = [{"hook_signature": []}]
inbound_bp = APIBlueprint(
    "hooks", __name__, url_prefix="/api/hooks", abp_tags=[tag], abp_security=HOOK_SECURITY
)

Event = Literal[
    "task.succeeded", "task.failed", "message.new", "message.deleted", "message.spam", "account.error"
]


class WebhookPath(Strict):
    webhook_id: str = Field(max_length=64)


class DeliveryPath(Strict):
    webhook_id: str = Field(max_length=64)
    delivery_id: str = Field(max_length=64)


class WebhookCreate(Strict):
    url: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="Where events are POSTed. https, or http to a loopback or private host only; "
        "private and loopback hosts need MAILROOM_ALLOW_PRIVATE_HOSTS, as mail hosts do.",
    )
    events: list[Event] = Field(min_length=1, max_length=6, description="The events this endpoint receives.")
    description: str = Field(default="", max_length=200)
    enabled: StrictBool = True


class WebhookPatch(Strict):
    url: str | None = Field(default=None, min_length=1, max_length=2048, pattern=r"^https?://[^\s]+$")
    events: list[Event] | None = Field(default=None, min_length=1, max_length=6)
    description: str | None = Field(default=None, max_length=200)
    enabled: StrictBool | None = None


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(
        description="Signs every delivery (X-Mailroom-Signature). Shown only in this answer; "
        "stored encrypted."
    )


class WebhookPage(PageInfo):
    items: list[WebhookOut]


class AttemptOut(BaseModel):
    at: datetime
    status_code: int | None = Field(description="The endpoint's HTTP status; null when none came back.")
    latency_ms: float
    error: str | None


class DeliveryOut(BaseModel):
    id: str = Field(description="Also sent as X-Mailroom-Delivery.")
    event: str
    event_id: str = Field(description="The event's id (the body's `id`); the same for every endpoint.")
    state: Literal["pending", "retrying", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None
    last_latency_ms: float | None
    last_error: str | None
    recent_attempts: list[AttemptOut] = Field(description="The last attempts (up to 10), oldest first.")
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, Any] = Field(description="The body that is signed and sent.")


class DeliveryPage(PageInfo):
    items: list[DeliveryOut]


class HookSecretOut(BaseModel):
    account_id: str
    secret: str = Field(
        description="Shown only in this answer; stored encrypted. A new one replaces the old."
    )
    inbound_url: str = Field(description="Where to POST the signed hook.")


class InboundHookBody(Strict):
    folder: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Sync only this folder; all folders when omitted.",
    )


def webhook_out(
    endpoint: WebhookEndpoint, model: type[WebhookOut] = WebhookOut, **extra: Any
) -> dict[str, Any]:
    return model(
        id=endpoint.id,
        url=endpoint.url,
        events=list(endpoint.events),
        description=endpoint.description,
        enabled=endpoint.enabled,
        created_at=endpoint.created_at,
        updated_at=endpoint.updated_at,
        **extra,
    ).model_dump(mode="json")


def delivery_out(delivery: WebhookDelivery) -> dict[str, Any]:
    return DeliveryOut(
        id=delivery.id,
        event=delivery.event,
        event_id=delivery.event_id,
        state=delivery.state,  # type: ignore[arg-type]
        attempts=delivery.attempts,
        last_status_code=delivery.last_status_code,
        last_latency_ms=delivery.last_latency_ms,
        last_error=delivery.last_error,
        recent_attempts=[AttemptOut(**a) for a in delivery.attempt_log or []],
        next_attempt_at=delivery.next_attempt_at,
        delivered_at=delivery.delivered_at,
        created_at=delivery.created_at,
        payload=json.loads(delivery.payload),
    ).model_dump(mode="json")


# --- outbound endpoints --------------------------------------------------------------------


@bp.post("/webhooks", responses={201: WebhookCreated, **ERRORS})
def create_webhook(body: WebhookCreate) -> tuple[Response, int]:
    """Register an endpoint (admin). The answer holds its signing secret, the only time it is shown."""
    who = require_admin()
    st = state()
    endpoint, secret = webhooks.create_endpoint(
        db_session(),
        tenant_id=who.tenant_id,
        user_id=who.user_id,
        url=body.url,
        events=list(body.events),
        description=body.description,
        enabled=body.enabled,
        box=st.box,
        allow_private=st.settings.allow_private_hosts,
    )
    return jsonify(webhook_out(endpoint, WebhookCreated, secret=secret)), 201


@bp.get("/webhooks", responses={200: WebhookPage, **ERRORS})
def list_webhooks(query: PageQuery) -> Response:
    """The tenant's endpoints (admin), oldest first."""
    require_admin()
    rows, total = webhooks.list_endpoints(db_session(), limit=query.limit, offset=query.offset)
    return jsonify({"items": [webhook_out(e) for e in rows], **page_info(total, query.limit, query.offset)})


@bp.get("/webhooks/<webhook_id>", responses={200: WebhookOut, **ERRORS})
def get_webhook(path: WebhookPath) -> Response:
    """One endpoint (admin); its secret is never returned."""
    require_admin()
    return jsonify(webhook_out(webhooks.get_endpoint(db_session(), path.webhook_id)))


@bp.patch("/webhooks/<webhook_id>", responses={200: WebhookOut, **ERRORS})
def update_webhook(path: WebhookPath, body: WebhookPatch) -> Response:
    """Change the URL, events, description or enabled flag (admin)."""
    require_admin()
    endpoint = webhooks.get_endpoint(db_session(), path.webhook_id)
    webhooks.update_endpoint(
        endpoint,
        url=body.url,
        events=list(body.events) if body.events is not None else None,
        description=body.description,
        enabled=body.enabled,
        allow_private=state().settings.allow_private_hosts,
    )
    return jsonify(webhook_out(endpoint))


@bp.delete("/webhooks/<webhook_id>", responses={204: None, **ERRORS})
def delete_webhook(path: WebhookPath) -> tuple[str, int]:
    """Remove an endpoint and its delivery history (admin); its pending deliveries are dropped."""
    require_admin()
    session = db_session()
    session.delete(webhooks.get_endpoint(session, path.webhook_id))
    return "", 204


@bp.post("/webhooks/<webhook_id>/secret", responses={200: WebhookCreated, **ERRORS})
def rotate_webhook_secret(path: WebhookPath) -> Response:
    """Replace the endpoint's signing secret (admin). The answer holds the new secret, the
    only time it is shown; every attempt from now on, retries and redeliveries of older
    events included, is signed with it, and the old secret signs nothing more."""
    require_admin()
    endpoint = webhooks.get_endpoint(db_session(), path.webhook_id)
    secret = webhooks.rotate_secret(endpoint, state().box)
    return jsonify(webhook_out(endpoint, WebhookCreated, secret=secret))


@bp.get("/webhooks/<webhook_id>/deliveries", responses={200: DeliveryPage, **ERRORS})
def list_deliveries(path: WebhookPath, query: PageQuery) -> Response:
    """The endpoint's deliveries, newest first, with their last attempts (admin)."""
    require_admin()
    session = db_session()
    endpoint = webhooks.get_endpoint(session, path.webhook_id)
    rows, total = webhooks.list_deliveries(session, endpoint, limit=query.limit, offset=query.offset)
    return jsonify({"items": [delivery_out(d) for d in rows], **page_info(total, query.limit, query.offset)})


@bp.post("/webhooks/<webhook_id>/deliveries/<delivery_id>/redeliver", responses={202: DeliveryOut, **ERRORS})
def redeliver(path: DeliveryPath) -> tuple[Response, int]:
    """Send a delivery once more, now, with a fresh timestamp and signature (admin). The
    attempt is recorded like any other; a failed redelivery is not retried."""
    who = require_admin()
    session = db_session()
    delivery = webhooks.get_delivery(
        session, webhooks.get_endpoint(session, path.webhook_id), path.delivery_id
    )
    webhooks.prepare_redelivery(delivery)
    session.commit()
    if not webhook_tasks.publish(state().celery, who.tenant_id, [delivery.id], manual=True):
        raise ServiceUnavailable("the task queue is unavailable; try again shortly")
    return jsonify(delivery_out(delivery)), 202


# --- inbound -------------------------------------------------------------------------------


@bp.post("/accounts/<account_id>/hook-secret", responses={201: HookSecretOut, **ERRORS})
def create_hook_secret(path: AccountPath) -> tuple[Response, int]:
    """Make (or replace) the account's inbound hook secret; the answer is the only time it
    is shown. The old secret stops working at once."""
    account = accounts.get_account(db_session(), path.account_id, principal())
    secret = webhooks.set_hook_secret(account, state().box)
    inbound_url = url_for("hooks.inbound_hook", account_id=account.id, _external=True)
    return jsonify(
        HookSecretOut(account_id=account.id, secret=secret, inbound_url=inbound_url).model_dump()
    ), 201


@bp.delete("/accounts/<account_id>/hook-secret", responses={204: None, **ERRORS})
def delete_hook_secret(path: AccountPath) -> tuple[str, int]:
    """Remove the account's hook secret: inbound hooks for it are refused (401) from now on."""
    account = accounts.get_account(db_session(), path.account_id, principal())
    account.hook_secret_enc = None
    return "", 204


@inbound_bp.post("/inbound/<account_id>", responses={202: TaskAccepted, **ERRORS})
def inbound_hook(path: AccountPath, body: InboundHookBody) -> tuple[Response, int]:
    """ "New mail for this account": queue a sync of ``folder`` (all folders when omitted).
    No API key: ``X-Mailroom-Timestamp`` (Unix seconds, within 300 s of now) and
    ``X-Mailroom-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + raw body, keyed
    with the account's hook secret>``; each signature is accepted once. Any failure, an
    unknown account included, is the same 401, and nothing is queued."""
    st = state()
    session = db_session()
    signature = request.headers.get(webhooks.SIGNATURE_HEADER)
    account = webhooks.verify_inbound(
        session,
        path.account_id,
        timestamp=request.headers.get(webhooks.TIMESTAMP_HEADER),
        signature=signature,
        body=request.get_data(cache=True),
        box=st.box,
    )
    try:
        fresh = webhooks.claim_signature(broker_redis(st.settings), account.id, signature or "")
    except (RedisError, OSError):
        raise ServiceUnavailable(
            "the replay guard is unavailable; nothing was queued, try again shortly"
        ) from None
    if not fresh:
        raise webhooks.unauthorized()
    bind_tenant(session, account.tenant_id)
    params = SyncParams(folders=[body.folder] if body.folder else None).model_dump(exclude_defaults=True)
    result = dispatch(
        st.celery,
        session,
        type="sync",
        tenant_id=account.tenant_id,
        user_id=account.user_id,
        account_id=account.id,
        params=params,
        origin="hook",
    )
    return accepted(result.record, created=result.created)
