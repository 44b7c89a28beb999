"""Request and response schemas. The API validates with them and the OpenAPI document at
``/openapi.json`` is generated from them, so the two cannot drift apart."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from mailroom.input_guard import ID_PATTERN
from services.task_inputs import EmailAddress

TlsModeField = Literal["ssl", "starttls", "none"]
HostField = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._:\-\[\]]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lenient(BaseModel):
    """Query strings: unknown parameters are ignored, as most HTTP APIs do."""

    model_config = ConfigDict(extra="ignore")


# --- errors ------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. not_found, validation_error.")
    message: str = Field(description="What went wrong, for a person.")
    details: Any = Field(default=None, description="Extra structured information, if any.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ValidationProblem(BaseModel):
    loc: list[str | int] = Field(
        description="Where: the field's path in the body (['imap', 'host']), or ['header', name] "
        "or ['query', name]; empty when the problem is the request as a whole."
    )
    msg: str = Field(description="What is wrong there, for a person.")
    type: str = Field(description="The kind of problem, e.g. missing, extra_forbidden, value_error.")
    ctx: dict[str, Any] | None = Field(
        default=None,
        description="Present on some problems: what the check found (the entries refused, a limit).",
    )


class ValidationErrorBody(BaseModel):
    code: str = Field(description="validation_error")
    message: str = Field(description="The first problem, for a person.")
    details: list[ValidationProblem] = Field(description="One entry per problem found.")


class ValidationErrorResponse(BaseModel):
    error: ValidationErrorBody


# --- paths and pages ---------------------------------------------------------------------


class AccountPath(Strict):
    account_id: str = Field(max_length=64)


class TaskPath(Strict):
    task_id: str = Field(max_length=64)


class MessagePath(Strict):
    message_id: str = Field(max_length=64)


class PageQuery(Lenient):
    limit: int = Field(default=50, ge=1, le=200, description="Items per page (1–200).")
    offset: int = Field(default=0, ge=0, le=1_000_000, description="Items to skip.")


class PageInfo(BaseModel):
    total: int
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page, null on the last page.")


# --- accounts ------------------------------------------------------------------------------


class EndpointIn(Strict):
    host: str = HostField
    port: int = Field(ge=1, le=65535)
    tls: TlsModeField = Field(
        description="ssl = implicit TLS, starttls, or none (plain text: refused unless every "
        "address of the host is loopback or private)."
    )
    username: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=4096, description="Write-only; stored encrypted.")


class EndpointPatch(Strict):
    host: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._:\-\[\]]+$")
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsModeField | None = None
    username: str | None = Field(default=None, min_length=1, max_length=320)
    password: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Required when host, port, tls or username changes, so the stored password "
        "is never sent to a server it was not given for.",
    )


class EndpointOut(BaseModel):
    host: str
    port: int
    tls: str
    username: str


SAVE_SENT_COPY = (
    "File a copy of each sent message in the \\Sent folder (default true); false for servers that "
    "file sent mail themselves. A send's own save_sent overrides it for that message."
)


class AccountCreate(Strict):
    email: EmailAddress
    name: str = Field(default="", max_length=200)
    imap: EndpointIn
    smtp: EndpointIn
    sync_interval: int | None = Field(
        default=None, ge=60, le=7 * 86400, description="Seconds between periodic syncs (default 900)."
    )
    save_sent_copy: StrictBool = Field(default=True, description=SAVE_SENT_COPY)
    spam_auto_scan: StrictBool = Field(
        default=False, description="Check new INBOX mail for spam after each sync."
    )
    spam_move_to_junk: StrictBool = Field(
        default=False, description="Move messages judged spam to the \\Junk folder."
    )


class AccountPatch(Strict):
    email: EmailAddress | None = None
    name: str | None = Field(default=None, max_length=200)
    imap: EndpointPatch | None = None
    smtp: EndpointPatch | None = None
    sync_interval: int | None = Field(default=None, ge=60, le=7 * 86400)
    save_sent_copy: StrictBool | None = Field(default=None, description=SAVE_SENT_COPY)
    spam_auto_scan: StrictBool | None = None
    spam_move_to_junk: StrictBool | None = None


class AccountOut(BaseModel):
    id: str
    email: str
    name: str
    imap: EndpointOut
    smtp: EndpointOut
    sync_interval: int
    last_sync_at: datetime | None
    last_sync_error: str | None
    sync_task_id: str | None = Field(description="The sync in flight, if any.")
    capabilities: list[str] | None = Field(description="IMAP capabilities seen by the last verify.")
    save_sent_copy: bool = Field(description=SAVE_SENT_COPY)
    spam_auto_scan: bool
    spam_move_to_junk: bool
    created_at: datetime
    updated_at: datetime


class AccountPage(PageInfo):
    items: list[AccountOut]


# --- tasks ---------------------------------------------------------------------------------


class TaskAccepted(BaseModel):
    task_id: str
    state: str
    queue: str
    status_url: str
    deduplicated: bool = Field(
        default=False,
        description="True when an equivalent task was already in flight and is returned instead.",
    )


class TaskError(BaseModel):
    code: str | None = Field(description="Stable code, e.g. mail_auth_failed, worker_lost, internal_error.")
    message: str | None = Field(description="What went wrong, for a person.")
    reference: str | None = Field(
        default=None,
        description="For internal errors: names the server's log lines; quote it when reporting.",
    )


class TaskOut(BaseModel):
    id: str
    type: str
    queue: str
    state: Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"]
    progress: int = Field(ge=0, le=100)
    stage: str
    account_id: str | None
    origin: Literal["api", "beat"] | str
    params: dict[str, Any]
    attempts: int
    max_retries: int
    cancel_requested: bool
    result: dict[str, Any] | None
    error: TaskError | None
    estimated_duration: float | None = Field(description="Seconds, from this account's recent history.")
    next_retry_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration: float | None = Field(description="Seconds from first start to finish.")


class TaskPage(PageInfo):
    items: list[TaskOut]


class TaskQuery(PageQuery):
    state: Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"] | None = None
    type: Literal["sync", "verify", "send", "delete", "spam_check"] | None = None
    account_id: str | None = Field(default=None, pattern=ID_PATTERN, description="Only this account's tasks.")


# --- admin ---------------------------------------------------------------------------------


class QueueStat(BaseModel):
    depth: int | None = Field(description="Messages waiting; null when the broker is unreachable.")
    priority: int


class StatsOut(BaseModel):
    queues: dict[str, QueueStat]
    tasks_by_state: dict[str, int]
    average_duration_seconds: dict[str, float]


class ActiveTasksOut(BaseModel):
    items: list[TaskOut]


class CheckOut(BaseModel):
    ok: bool
    error: str | None = None


class BeatOut(BaseModel):
    ok: bool = Field(description="A Beat ticked within the last 45 seconds (it ticks at least every 15).")
    last_tick_at: datetime | None = Field(description="The running Beat's last tick; null if never seen.")
    seconds_ago: float | None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    database: CheckOut
    broker: CheckOut
    result_backend: CheckOut
    workers: dict[str, int] = Field(description="Live workers consuming each queue.")
    beat: BeatOut = Field(description="The one Beat that queues periodic syncs and the cleanup.")


class CancelAllOut(BaseModel):
    cancelled: int = Field(description="Tasks stopped before they ran.")
    stopping: int = Field(description="Running tasks asked to stop at their next step.")


class ProbeOut(BaseModel):
    status: str
    checks: dict[str, CheckOut] | None = None
