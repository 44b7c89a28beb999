"""Webhooks both ways: signed event deliveries to a tenant's endpoints, and the signed
inbound hook that asks for a sync.

Signing (both directions): ``X-Mailroom-Timestamp`` is Unix seconds, and
``X-Mailroom-Signature`` is ``sha256=`` + hex HMAC-SHA256, keyed with the secret, of the
ASCII timestamp, a ``.``, and the raw body bytes (``f"{timestamp}.".encode() + body``).

**Outbound.** A tenant's admin registers endpoints (URL, events, a secret shown once).
Events are recorded where the task life ends (tasks.lifecycle): in the same transaction
that writes a task's final state, one indexed query reads the tenant's enabled endpoints
(``ix_webhook_endpoints_tenant_id``); a tenant with none pays that one query and nothing
else. When some want the task's events, one delivery row per (event, endpoint) is inserted
in a savepoint of that transaction, so an event exists exactly when what it reports was
committed, and a fault while recording is logged and rolled back alone, never failing the
task. (The endpoints query itself runs outside the savepoint, saving two round trips per
task: it can fail only when the database does, and then the transaction fails anyway.)
After the commit one ``mailroom.deliver_webhook`` message per delivery goes to the
``webhooks`` queue. Events come from the finished task itself: ``task.succeeded`` /
``task.failed`` (every task type), ``message.new`` (a sync that stored new messages:
counts per folder, at most :data:`MAX_FOLDERS` folders), ``message.deleted`` (a delete:
its message ids, at most :data:`MAX_IDS`), ``message.spam`` (a spam check that found spam:
counts, and ids when the check named messages) and ``account.error`` (a sync or verify
that failed).

A delivery is one POST with short timeouts (``MAILROOM_WEBHOOK_TIMEOUT_SECONDS`` to
connect and again for each read, the response body is not read beyond 4 KiB). A 2xx ends
it; anything else (another status, a refused or timed-out connection, a redirect, which is
never followed) is retried with the queues' exponential backoff from
``MAILROOM_RETRY_BASE_SECONDS`` capped at ``MAILROOM_WEBHOOK_RETRY_MAX_SECONDS``, until
``MAILROOM_WEBHOOK_MAX_ATTEMPTS`` attempts or a day after the event, then it fails. Each
attempt's status code, latency and error are kept (the last :data:`ATTEMPT_LOG` of them).
The URL's host is resolved once per attempt and checked against the mail host policy
(services.mail.hosts: no private or loopback address unless
``MAILROOM_ALLOW_PRIVATE_HOSTS``; ``http`` only to such hosts), and the connection goes to
the checked address. Why a slow or dead endpoint does not delay other tenants: each
delivery is its own message; an attempt holds a worker slot for at most about twice the
timeout (per address the host resolves to); a retry waits in the broker (a countdown), not
in a worker; and an endpoint that timed out or refused a connection is marked down in the
broker's Redis for :data:`DOWN_SECONDS`, during which its other deliveries record a failed
attempt without connecting and come back after the window, so a dead endpoint costs one
timeout per window, not one per delivery.

Limits, stated: delivery is at least once (a worker lost mid-attempt sends again;
``X-Mailroom-Delivery`` and the event ``id`` let a receiver drop duplicates); order is not
kept; the queue is FIFO per priority, not fair per tenant, so a burst of one tenant's
events is worked through before later ones of others (each at most the timeout long);
retries waiting in the broker are held by workers as countdown messages. A delivery whose
message could not be published after the commit (or whose publisher died in between)
stays ``pending`` until Beat's minute-level sweep (tasks.webhook_tasks.sweep_unpublished)
finds it untouched for :data:`PUBLISH_GRACE` with no message in the broker and publishes
it again (at most :data:`SWEEP_LIMIT` a sweep); one still pending a day after its event
ends ``failed``. Every task that ends ``failed`` reports ``task.failed``: in the attempt,
at the hard time limit, after its worker was lost too often, when its dispatch found the
broker unreachable (published by that sweep), and when the stale-task sweep
(tasks.periodic) gives it up (:func:`record_swept_failures`). A cancelled task reports
nothing (there is no such event).

**Inbound.** ``POST /api/hooks/inbound/{account_id}`` carries no API key. The account's
hook secret (``POST /api/accounts/{id}/hook-secret``, shown once, stored encrypted) signs
it; the timestamp must be within :data:`HOOK_TOLERANCE_SECONDS` of now, and a signature is
accepted once (remembered in the broker's Redis for twice that window). Any failure,
including an unknown account or one without a secret, is the same 401, and nothing is
queued.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import random
import secrets
import ssl
import time
import typing
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import (
    ColumnElement,
    String,
    Table,
    bindparam,
    delete,
    func,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from services.crypto import SecretBox, SecretDecryptError
from services.db import transaction
from services.errors import NotFound, Unauthorized, ValidationFailed
from services.mail.hosts import PinnedHost, connect_pinned, resolve_host
from services.models import (
    Account,
    TaskRecord,
    WebhookDelivery,
    WebhookEndpoint,
    is_id,
    iso_utc,
    new_id,
    utcnow,
)
from services.retry import backoff_delay
from services.settings import Settings

log = logging.getLogger("mailroom.webhooks")

EVENTS = ("task.succeeded", "task.failed", "message.new", "message.deleted", "message.spam", "account.error")
SIGNATURE_HEADER = "X-Mailroom-Signature"
TIMESTAMP_HEADER = "X-Mailroom-Timestamp"
EVENT_HEADER = "X-Mailroom-Event"
DELIVERY_HEADER = "X-Mailroom-Delivery"
#: How far an inbound hook's timestamp may be from now (seconds, either way).
HOOK_TOLERANCE_SECONDS = 300
#: How long after its event a delivery is still retried.
RETRY_WINDOW = timedelta(days=1)
#: Attempts kept per delivery (the newest).
ATTEMPT_LOG = 10
#: Bounds of what one event carries.
MAX_IDS = 100
MAX_FOLDERS = 50
MAX_RESULT_BYTES = 8192
#: Bytes of a response read (the rest is ignored).
MAX_RESPONSE_BYTES = 4096
USER_AGENT = "Mailroom-Webhooks/1"


# --- signing -----------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, "<timestamp>." + body)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


# --- endpoints ---------------------------------------------------------------------------


def check_url(url: str, *, allow_private: bool) -> PinnedHost:
    """The URL's host resolved once and checked like a mail host; ``http`` only to a
    loopback or private host. Raises :class:`ValidationFailed` naming ``url``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "http://]": an unbalanced IPv6 bracket
        raise ValidationFailed("url: not a valid URL", field="url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed("url: must be an http:// or https:// URL with a host", field="url")
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("url: must not carry a user name or password", field="url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValidationFailed("url: the port is not valid", field="url") from None
    return resolve_host(
        parts.hostname,
        port,
        allow_private=allow_private,
        field="url",
        tls="none" if parts.scheme == "http" else "ssl",
    )


def _check_events(events: list[str]) -> list[str]:
    unknown = sorted(set(events) - set(EVENTS))
    if unknown or not events:
        raise ValidationFailed(
            f"events: must be a non-empty subset of {', '.join(EVENTS)}",
            field="events",
            context={"unknown": unknown},
        )
    return [e for e in EVENTS if e in events]


def create_endpoint(
    session: Session,
    *,
    tenant_id: str,
    user_id: str | None,
    url: str,
    events: list[str],
    description: str,
    enabled: bool,
    box: SecretBox,
    allow_private: bool,
) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its secret (the only time the secret is returned)."""
    check_url(url, allow_private=allow_private)
    secret = new_secret()
    endpoint = WebhookEndpoint(
        tenant_id=tenant_id,
        user_id=user_id,
        url=url,
        events=_check_events(events),
        description=description,
        enabled=enabled,
        secret_enc=box.encrypt(secret),
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def update_endpoint(
    endpoint: WebhookEndpoint,
    *,
    url: str | None,
    events: list[str] | None,
    description: str | None,
    enabled: bool | None,
    allow_private: bool,
) -> WebhookEndpoint:
    if url is not None:
        check_url(url, allow_private=allow_private)
        endpoint.url = url
    if events is not None:
        endpoint.events = _check_events(events)
    if description is not None:
        endpoint.description = description
    if enabled is not None:
        endpoint.enabled = enabled
    endpoint.updated_at = utcnow()
    return endpoint


def rotate_secret(endpoint: WebhookEndpoint, box: SecretBox) -> str:
    """A new signing secret for ``endpoint`` (returned this once); the old one signs
    nothing more: each attempt reads the secret when it signs."""
    secret = new_secret()
    endpoint.secret_enc = box.encrypt(secret)
    endpoint.updated_at = utcnow()
    return secret


def get_endpoint(session: Session, endpoint_id: str) -> WebhookEndpoint:
    """The session's tenant's endpoint (another tenant's is not found)."""
    endpoint = session.get(WebhookEndpoint, endpoint_id) if is_id(endpoint_id) else None
    if endpoint is None:
        raise NotFound("webhook not found")
    return endpoint


def list_endpoints(session: Session, *, limit: int, offset: int) -> tuple[list[WebhookEndpoint], int]:
    total = session.scalar(select(func.count()).select_from(WebhookEndpoint)) or 0
    rows = session.scalars(
        select(WebhookEndpoint)
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def list_deliveries(
    session: Session, endpoint: WebhookEndpoint, *, limit: int, offset: int
) -> tuple[list[WebhookDelivery], int]:
    """The endpoint's deliveries, newest first."""
    where = WebhookDelivery.endpoint_id == endpoint.id
    total = session.scalar(select(func.count()).select_from(WebhookDelivery).where(where)) or 0
    rows = session.scalars(
        select(WebhookDelivery)
        .where(where)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def get_delivery(session: Session, endpoint: WebhookEndpoint, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id) if is_id(delivery_id) else None
    if delivery is None or delivery.endpoint_id != endpoint.id:
        raise NotFound("delivery not found")
    return delivery


# --- events ------------------------------------------------------------------------------


def task_events(record: TaskRecord) -> list[tuple[str, dict[str, Any]]]:
    """The events a task in its final state reports: (event, data)."""
    base: dict[str, Any] = {"task_id": record.id, "type": record.type, "account_id": record.account_id}
    out: list[tuple[str, dict[str, Any]]] = []
    result = record.result or {}
    if record.state == "succeeded":
        data = {**base, "state": "succeeded"}
        if len(json.dumps(result, default=str)) <= MAX_RESULT_BYTES:
            data["result"] = result
        else:
            data["result_truncated"] = True
        out.append(("task.succeeded", data))
        if record.type == "sync" and result.get("new"):
            folders = {
                name: counts.get("new", 0)
                for name, counts in (result.get("folders") or {}).items()
                if counts.get("new")
            }
            out.append(
                (
                    "message.new",
                    {**base, "new": result["new"], "folders": dict(list(folders.items())[:MAX_FOLDERS])},
                )
            )
        elif record.type == "delete":
            ids = list((record.params or {}).get("message_ids") or [])
            out.append(
                (
                    "message.deleted",
                    {
                        **base,
                        "count": len(ids),
                        "message_ids": ids[:MAX_IDS],
                        "permanent": bool((record.params or {}).get("permanent")),
                        "moved": result.get("moved", 0),
                        "deleted": result.get("deleted", 0),
                    },
                )
            )
        elif record.type == "spam_check" and result.get("spam"):
            spam_ids = [m["id"] for m in result.get("messages") or [] if m.get("is_spam")]
            out.append(
                (
                    "message.spam",
                    {
                        **base,
                        "spam": result["spam"],
                        "moved": result.get("moved", 0),
                        "message_ids": spam_ids[:MAX_IDS],
                    },
                )
            )
    elif record.state == "failed":
        error = {"code": record.error_code, "message": record.last_error}
        out.append(("task.failed", {**base, "state": "failed", "error": error}))
        if record.type in ("sync", "verify") and record.account_id is not None:
            out.append(("account.error", {**base, "error": error}))
    return out


_ENDPOINTS = typing.cast(Table, WebhookEndpoint.__table__)
#: A tenant's enabled endpoints: a Core statement built once, filtered by tenant explicitly
#: (every task's last transaction runs it; most tenants have none).
_ENABLED_ENDPOINTS = select(_ENDPOINTS.c.id, _ENDPOINTS.c.events).where(
    _ENDPOINTS.c.tenant_id == bindparam("tenant_id"), _ENDPOINTS.c.enabled.is_(true())
)


def record_task_events(session: Session, tenant_id: str, task_id: str) -> list[str]:
    """Inside the transaction that wrote a task's final state: one delivery row per event
    and endpoint that wants it; their ids (to publish after the commit). One indexed query
    when the tenant has no enabled endpoint; never raises."""
    try:
        endpoints = session.execute(_ENABLED_ENDPOINTS, {"tenant_id": tenant_id}).all()
    except Exception:
        log.warning("webhooks: reading endpoints for task %s failed", task_id, exc_info=True)
        return []
    if not endpoints:
        return []
    try:
        with session.begin_nested():
            record = session.get(TaskRecord, task_id, populate_existing=True)
            if record is None:
                return []
            return _insert_deliveries(session, tenant_id, endpoints, task_events(record))
    except Exception:
        log.warning("webhooks: recording events of task %s failed", task_id, exc_info=True)
        return []


def record_swept_failures(session: Session, failed: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Inside the transaction of the stale-task sweep (tasks.periodic), which failed
    ``failed`` (tenant id, task id) with one UPDATE each: their events (``task.failed``,
    and ``account.error`` for a sync or verify), as :func:`record_task_events` records a
    task's; the delivery ids per tenant, to publish after the commit. One query finds
    which of those tenants have an enabled endpoint; the tasks of the others cost nothing
    more. Never raises."""
    if not failed:
        return {}
    tenants = sorted({tenant_id for tenant_id, _ in failed})
    try:
        rows = session.execute(
            select(WebhookEndpoint.tenant_id, WebhookEndpoint.id, WebhookEndpoint.events)
            .where(WebhookEndpoint.tenant_id.in_(tenants), WebhookEndpoint.enabled.is_(True))
            .execution_options(unrestricted_unsafe=True)
        ).all()
    except Exception:
        log.warning("webhooks: reading endpoints for swept tasks failed", exc_info=True)
        return {}
    by_tenant: dict[str, list[tuple[str, Any]]] = {}
    for tenant_id, endpoint_id, events in rows:
        by_tenant.setdefault(tenant_id, []).append((endpoint_id, events))
    out: dict[str, list[str]] = {}
    for tenant_id, task_id in failed:
        endpoints = by_tenant.get(tenant_id)
        if not endpoints:
            continue
        try:
            with session.begin_nested():
                record = session.get(TaskRecord, task_id, populate_existing=True)
                if record is None:
                    continue
                ids = _insert_deliveries(session, tenant_id, endpoints, task_events(record))
        except Exception:
            log.warning("webhooks: recording events of task %s failed", task_id, exc_info=True)
            continue
        out.setdefault(tenant_id, []).extend(ids)
    return out


def _insert_deliveries(
    session: Session, tenant_id: str, endpoints: Any, events: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    ids: list[str] = []
    now = utcnow()
    for event, data in events:
        wanting = [endpoint_id for endpoint_id, wanted in endpoints if event in (wanted or [])]
        if not wanting:
            continue
        event_id = str(uuid.uuid4())
        body = json.dumps(
            {"id": event_id, "type": event, "created_at": iso_utc(now), "data": data},
            separators=(",", ":"),
            default=str,
        )
        for endpoint_id in wanting:
            delivery = WebhookDelivery(
                id=new_id(),
                tenant_id=tenant_id,
                endpoint_id=endpoint_id,
                event=event,
                event_id=event_id,
                payload=body,
                state="pending",
                attempts=0,
                attempt_log=[],
                created_at=now,
                updated_at=now,
            )
            session.add(delivery)
            ids.append(delivery.id)
    session.flush()
    return ids


# --- delivering --------------------------------------------------------------------------


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the address checked by the host policy, never a second lookup."""

    def __init__(self, pinned: PinnedHost, timeout: float) -> None:
        super().__init__(pinned.name, pinned.port, timeout=timeout)
        self.pinned = pinned

    def connect(self) -> None:
        self.sock = connect_pinned(self.pinned, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, pinned: PinnedHost, timeout: float) -> None:
        super().__init__(pinned.name, pinned.port, timeout=timeout, context=ssl.create_default_context())
        self.pinned = pinned

    def connect(self) -> None:
        sock = connect_pinned(self.pinned, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    latency_ms: float
    error: str | None
    #: Refused before any connection (the host policy): retrying would not help.
    permanent: bool = False
    #: Not sent: the endpoint was down a moment ago (:class:`_DownEndpoints`).
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(url: str, headers: dict[str, str], body: bytes, *, timeout: float, allow_private: bool) -> Attempt:
    """One POST under the host policy. A refused host is an error, not an exception."""
    started = time.monotonic()
    try:
        pinned = check_url(url, allow_private=allow_private)
    except ValidationFailed as exc:
        return Attempt(None, 0.0, exc.message, permanent=True)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection = (
        _PinnedHTTPS(pinned, timeout) if parts.scheme == "https" else _PinnedHTTP(pinned, timeout)
    )
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        status = response.status
        error = None if 200 <= status < 300 else f"the endpoint answered HTTP {status}"
        return Attempt(status, _ms(started), error)
    except (OSError, http.client.HTTPException) as exc:
        return Attempt(None, _ms(started), f"{type(exc).__name__}: {exc}"[:500])
    finally:
        conn.close()


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


@dataclass(frozen=True)
class Outcome:
    state: str
    #: Seconds until the next attempt, when one is due.
    retry_in: float | None = None


FINAL = frozenset({"succeeded", "failed"})


def deliver(
    sessions: sessionmaker[Any],
    delivery_id: str,
    *,
    box: SecretBox,
    settings: Settings,
    manual: bool = False,
    retry_number: int = 0,
) -> Outcome:
    """One attempt of one delivery (``sessions`` bound to its tenant). ``manual`` (a
    redelivery asked for by a client) sends once whatever the state and never retries."""
    with transaction(sessions) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return Outcome("gone")
        if delivery.state in FINAL and not manual:
            return Outcome(delivery.state)
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            _record(delivery, Attempt(None, 0.0, "the webhook is disabled"), "failed", None)
            return Outcome("failed")
        url, secret, body = endpoint.url, box.decrypt(endpoint.secret_enc), delivery.payload.encode()
        endpoint_id = endpoint.id
        event, created_at = delivery.event, delivery.created_at
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    down = _DownEndpoints(settings)
    if not manual and down.is_down(endpoint_id):
        attempt = Attempt(None, 0.0, NOT_SENT, skipped=True)
    else:
        attempt = post(
            url,
            headers,
            body,
            timeout=settings.webhook_timeout_seconds,
            allow_private=settings.allow_private_hosts,
        )
        if attempt.status_code is None and not attempt.permanent:
            down.mark_down(endpoint_id)
    with transaction(sessions) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return Outcome("gone")
        if attempt.ok:
            _record(delivery, attempt, "succeeded", None)
            return Outcome("succeeded")
        delay = backoff_delay(retry_number, base=settings.retry_base_seconds, cap=retry_cap(settings))
        if attempt.skipped:
            # Back when the endpoint may be tried again, spread out so they do not return at once.
            delay = max(delay, round(DOWN_SECONDS * random.uniform(1.0, 1.5), 3))  # noqa: S311 - jitter
        next_at = utcnow() + timedelta(seconds=delay)
        if (
            manual
            or attempt.permanent
            or delivery.attempts + 1 >= settings.webhook_max_attempts
            or next_at > created_at + RETRY_WINDOW
        ):
            _record(delivery, attempt, "failed", None)
            return Outcome("failed")
        _record(delivery, attempt, "retrying", next_at)
        return Outcome("retrying", delay)


#: How long an endpoint that timed out or refused a connection is not tried again.
DOWN_SECONDS = 30
NOT_SENT = f"not sent: the endpoint timed out or refused a connection within the last {DOWN_SECONDS} s"


class _DownEndpoints:
    """Endpoints that timed out or refused a connection lately, in the broker's Redis (for
    :data:`DOWN_SECONDS`): their other deliveries meanwhile count a failed attempt without
    a connection, so a dead endpoint costs one timeout per window, not one per delivery.
    Redis unreachable: every delivery is tried."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _client(self) -> Any:
        from services.tenant_slots import broker_redis

        return broker_redis(self.settings)

    def is_down(self, endpoint_id: str) -> bool:
        try:
            return bool(self._client().exists(f"mailroom:webhook-down:{endpoint_id}"))
        except Exception:  # noqa: BLE001 - never let the breaker stop a delivery
            return False

    def mark_down(self, endpoint_id: str) -> None:
        try:
            self._client().set(f"mailroom:webhook-down:{endpoint_id}", b"1", ex=DOWN_SECONDS)
        except Exception:  # noqa: BLE001
            log.warning("webhooks: could not mark endpoint %s down", endpoint_id)


def retry_cap(settings: Settings) -> float:
    """The longest wait between attempts: the setting, kept below what the broker holds a
    countdown message for (its visibility timeout less an attempt's hard limit)."""
    held = settings.broker_visibility_timeout - settings.task_hard_time_limit
    return max(settings.retry_base_seconds, min(settings.webhook_retry_max_seconds, held))


def _record(delivery: WebhookDelivery, attempt: Attempt, state: str, next_at: Any) -> None:
    now = utcnow()
    delivery.attempts += 1
    delivery.state = state
    delivery.last_status_code = attempt.status_code
    delivery.last_latency_ms = attempt.latency_ms
    delivery.last_error = attempt.error
    delivery.next_attempt_at = next_at
    if state == "succeeded":
        delivery.delivered_at = now
    entry = {
        "at": iso_utc(now),
        "status_code": attempt.status_code,
        "latency_ms": attempt.latency_ms,
        "error": attempt.error,
    }
    delivery.attempt_log = [*(delivery.attempt_log or []), entry][-ATTEMPT_LOG:]
    delivery.updated_at = now


def delete_old_deliveries(session: Session, *, older_than: datetime) -> int:
    """Forget deliveries made before ``older_than`` (the task history's window; by then
    none is retried any more). A plain range delete, run by the hourly cleanup."""
    result = session.execute(
        delete(WebhookDelivery)
        .where(WebhookDelivery.created_at < older_than)
        .execution_options(unrestricted_unsafe=True, synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


#: A ``pending`` delivery untouched for this long had its publish fail (or its publisher
#: die) after the commit, unless its message is still waiting in the broker.
PUBLISH_GRACE = timedelta(minutes=2)
#: Deliveries one sweep publishes again at most (the oldest first; the rest next minute).
SWEEP_LIMIT = 500
_PENDING: ColumnElement[str] = literal_column(
    "'pending'", String
)  # inline, so the partial index always matches


def unpublished_candidates(
    session: Session, *, now: datetime, limit: int = SWEEP_LIMIT
) -> list[WebhookDelivery]:
    """``pending`` deliveries of every tenant untouched for :data:`PUBLISH_GRACE` and
    younger than :data:`RETRY_WINDOW`, oldest first (the partial index
    ``ix_webhook_deliveries_pending``). Whether their message is in the broker is the
    caller's to check."""
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.state == _PENDING,
                WebhookDelivery.created_at >= now - RETRY_WINDOW,
                WebhookDelivery.created_at < now - PUBLISH_GRACE,
                WebhookDelivery.updated_at < now - PUBLISH_GRACE,
            )
            .order_by(WebhookDelivery.created_at)
            .limit(limit)
            .execution_options(unrestricted_unsafe=True)
        )
    )


def claim_unpublished(session: Session, delivery: WebhookDelivery) -> bool:
    """Take the right to publish ``delivery`` again: one conditional UPDATE (moving
    ``updated_at``) that succeeds only while it is still ``pending`` as it was read, so of
    two sweeps at once only one publishes, and one a worker took up meanwhile is left."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery.id,
            WebhookDelivery.state == _PENDING,
            WebhookDelivery.updated_at == delivery.updated_at,
        )
        .values(updated_at=utcnow())
        .execution_options(unrestricted_unsafe=True, synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0) == 1


NEVER_SENT = "never sent: its message could not be queued within a day of the event"


def fail_unpublished(session: Session, *, now: datetime) -> int:
    """``pending`` deliveries older than :data:`RETRY_WINDOW` (never published, never
    attempted) end ``failed``: nothing would retry them any more."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.state == _PENDING, WebhookDelivery.created_at < now - RETRY_WINDOW)
        .values(state="failed", last_error=NEVER_SENT, updated_at=utcnow())
        .execution_options(unrestricted_unsafe=True, synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def prepare_redelivery(delivery: WebhookDelivery) -> None:
    delivery.state = "pending"
    delivery.next_attempt_at = None
    delivery.updated_at = utcnow()


# --- inbound -----------------------------------------------------------------------------

_UNAUTHORIZED = "the hook's signature is missing, wrong, stale or replayed"
#: Checked when the account is unknown, so its answer takes as long as a wrong signature's.
_DUMMY_SECRET = secrets.token_urlsafe(32)


def set_hook_secret(account: Account, box: SecretBox) -> str:
    secret = new_secret()
    account.hook_secret_enc = box.encrypt(secret)
    account.updated_at = utcnow()
    return secret


def verify_inbound(
    session: Session,
    account_id: str,
    *,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    box: SecretBox,
    now: float | None = None,
) -> Account:
    """The account an inbound hook is signed for, or :class:`Unauthorized` (the same for
    every reason). The replay guard is the caller's (it needs Redis)."""
    account = None
    if is_id(account_id):
        account = session.scalar(
            select(Account).where(Account.id == account_id).execution_options(unrestricted_unsafe=True)
        )
    secret = _DUMMY_SECRET
    if account is not None and account.hook_secret_enc is not None:
        try:
            secret = box.decrypt(account.hook_secret_enc)
        except SecretDecryptError:
            log.error("inbound hook: the hook secret of account %s cannot be decrypted", account.id)
            account = None
    ts = (timestamp or "").strip()
    expected = sign(secret, ts, body)
    good = hmac.compare_digest(expected.encode(), (signature or "").strip().encode())
    fresh = ts.isdigit() and abs((now or time.time()) - int(ts)) <= HOOK_TOLERANCE_SECONDS
    if account is None or account.hook_secret_enc is None or not good or not fresh:
        raise Unauthorized(_UNAUTHORIZED)
    return account


def claim_signature(client: Any, account_id: str, signature: str) -> bool:
    """Remember a signature for twice the tolerance; False when it was seen already."""
    key = f"mailroom:hook-seen:{account_id}:{signature.strip()[-64:]}"
    return bool(client.set(key, b"1", nx=True, ex=2 * HOOK_TOLERANCE_SECONDS))


def unauthorized() -> Unauthorized:
    return Unauthorized(_UNAUTHORIZED)
