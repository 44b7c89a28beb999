"""Mailroom's tables (SQLAlchemy 2, typed). Every row that belongs to a tenant carries
``tenant_id``; reads go through :mod:`services.tenancy`, which scopes them by default."""

from __future__ import annotations

import enum
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    desc,
    false,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_utc(when: datetime) -> str:
    """``when`` as the API writes every time: ISO 8601 in UTC ending in ``Z``
    (``2026-11-23T09:31:12.977499Z``), as pydantic serialises the response models' datetimes,
    for the few times written without them (a webhook's payload, the health report)."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def new_id() -> str:
    return str(uuid.uuid4())


#: The shape of every id :func:`new_id` makes. Text from a client that is meant to be an id
#: is checked against it before it reaches a query (PostgreSQL refuses NUL in text).
ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_ID_RE = re.compile(ID_PATTERN)


def is_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class TenantOwned:
    """Marks a model whose rows belong to one tenant (it has a ``tenant_id`` column). A
    tenant-bound session scopes every such model with one loader criterion on this class
    (services.db), instead of one per model on every statement. Each model declares its own
    ``tenant_id`` (its index and key differ); this one is what that criterion is written
    against."""

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))


class Role(enum.StrEnum):
    MEMBER = "member"
    ADMIN = "admin"


class TlsMode(enum.StrEnum):
    SSL = "ssl"  # implicit TLS (IMAPS 993, SMTPS 465)
    STARTTLS = "starttls"
    NONE = "none"  # plain text; only sensible for local test servers


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def final(cls) -> frozenset[TaskState]:
        return frozenset({cls.SUCCEEDED, cls.FAILED, cls.CANCELLED})

    @classmethod
    def in_flight(cls) -> frozenset[TaskState]:
        return frozenset({cls.QUEUED, cls.RUNNING, cls.RETRYING})


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class User(TenantOwned, Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "email"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16), default=Role.MEMBER.value)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(TenantOwned, Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the whole key: keys carry 256 bits of randomness, so a slow hash adds nothing.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(lazy="joined")


class Account(TenantOwned, Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str] = mapped_column(String(320))

    imap_host: Mapped[str] = mapped_column(String(255))
    imap_port: Mapped[int] = mapped_column(Integer)
    imap_tls: Mapped[str] = mapped_column(String(16))
    imap_username: Mapped[str] = mapped_column(String(320))
    imap_password_enc: Mapped[bytes] = mapped_column(LargeBinary)

    smtp_host: Mapped[str] = mapped_column(String(255))
    smtp_port: Mapped[int] = mapped_column(Integer)
    smtp_tls: Mapped[str] = mapped_column(String(16))
    smtp_username: Mapped[str] = mapped_column(String(320))
    smtp_password_enc: Mapped[bytes] = mapped_column(LargeBinary)

    sync_interval: Mapped[int] = mapped_column(Integer, default=900)
    last_sync_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_sync_error: Mapped[str | None] = mapped_column(Text)
    # The sync lock: one sync per account. Claimed with one conditional UPDATE, so two API
    # processes or two Beats cannot both win; held while this task's record is in flight
    # (services.accounts explains why it has no expiry of its own).
    sync_task_id: Mapped[str | None] = mapped_column(String(36))
    capabilities: Mapped[list[str] | None] = mapped_column(JSON)
    # Whether a send files its copy in \Sent; off for servers that file sent mail themselves
    # (a message's own save_sent overrides it).
    save_sent_copy: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # Spam: queue a check of new INBOX mail after each sync; move spam to \Junk.
    spam_auto_scan: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    spam_move_to_junk: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The secret that signs POST /api/hooks/inbound/{id} (services.webhooks); NULL: refused.
    hook_secret_enc: Mapped[bytes | None] = mapped_column(LargeBinary)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Folder(TenantOwned, Base):
    __tablename__ = "folders"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(1000))
    delimiter: Mapped[str | None] = mapped_column(String(4))
    special_use: Mapped[str | None] = mapped_column(String(32))
    flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    uidnext: Mapped[int | None] = mapped_column(BigInteger)
    highestmodseq: Mapped[int | None] = mapped_column(BigInteger)
    # Highest UID stored so far: where a first sync (newest first) or a resumed one goes on.
    last_seen_uid: Mapped[int | None] = mapped_column(BigInteger)
    # Lowest UID stored by a first sync that walks downwards; None once the walk is complete.
    backfill_below_uid: Mapped[int | None] = mapped_column(BigInteger)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    unread_count: Mapped[int] = mapped_column(Integer, default=0)
    server_message_count: Mapped[int | None] = mapped_column(Integer)
    last_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def _ordered_index(name: str, column: str) -> tuple[Index, Index]:
    """``(column, date DESC NULLS LAST, id DESC)``: one DDL for PostgreSQL, one for SQLite."""
    return (
        Index(name, column, desc("date").nulls_last(), desc("id")).ddl_if(dialect="postgresql"),
        Index(name, column, desc("date"), desc("id")).ddl_if(dialect="sqlite"),
    )


class Message(TenantOwned, Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("folder_id", "uid"),
        # The list's order (date DESC NULLS LAST, id DESC) so newest-first pages are index
        # range scans (migration 0004). SQLite sorts NULL lowest, so its plain DESC index
        # has the same order and it refuses NULLS LAST in an index.
        *_ordered_index("ix_messages_account_order", "account_id"),
        *_ordered_index("ix_messages_folder_order", "folder_id"),
        Index("ix_messages_match", "account_id", "message_id_header"),
        # The list filtered to spam (?is_spam=true) in the list's order: only spam rows are
        # in it, so a page is a short range scan however rare spam is (migration 0007).
        Index(
            "ix_messages_account_spam",
            "account_id",
            desc("date").nulls_last(),
            desc("id"),
            postgresql_where=text("is_spam IS true"),
        ).ddl_if(dialect="postgresql"),
        Index(
            "ix_messages_account_spam",
            "account_id",
            desc("date"),
            desc("id"),
            sqlite_where=text("is_spam IS 1"),
        ).ddl_if(dialect="sqlite"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int | None] = mapped_column(BigInteger)
    message_id_header: Mapped[str | None] = mapped_column(String(998))
    in_reply_to: Mapped[str | None] = mapped_column(String(998))
    subject: Mapped[str] = mapped_column(Text, default="")
    from_addr: Mapped[str] = mapped_column(String(998), default="")
    to_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    cc_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    date: Mapped[datetime | None] = mapped_column(UTCDateTime())
    internal_date: Mapped[datetime | None] = mapped_column(UTCDateTime())
    flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    seen: Mapped[bool] = mapped_column(Boolean, default=False)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # RFC822.SIZE as declared: may pass 2 GiB
    snippet: Mapped[str] = mapped_column(Text, default="")
    attachments: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Spam scoring (services.spam_store): the calibrated score, the verdict at the tenant's
    # threshold (the user's own label wins), the reasons, and when it was scored.
    spam_score: Mapped[float | None] = mapped_column(Float)
    is_spam: Mapped[bool | None] = mapped_column(Boolean)
    indicators: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    spam_label: Mapped[str | None] = mapped_column(String(8))  # "spam" | "ham": the user's word
    # The label the tenant's filter last learned from this message: a retried or redelivered
    # lesson is not learned twice.
    spam_learned: Mapped[str | None] = mapped_column(String(8))
    spam_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class BodyCacheEntry(TenantOwned, Base):
    """A message body fetched from IMAP for ``?body=1`` (services.bodies), as the API shows
    it. Keyed by folder, UIDVALIDITY and UID, which name one immutable message content."""

    __tablename__ = "body_cache"
    __table_args__ = (
        UniqueConstraint("folder_id", "uidvalidity", "uid", name="uq_body_cache_folder_id"),
        Index("ix_body_cache_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id", ondelete="CASCADE"))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[str] = mapped_column(Text)  # the body as JSON
    size: Mapped[int] = mapped_column(Integer)  # bytes of content, for the per-tenant bound
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DeleteJournalEntry(TenantOwned, Base):
    """What a delete is about to do to one folder's messages, committed before its first
    IMAP command and cleared once its rows are written (services.mail_delete_journal): a
    delete that finds an entry left by an attempt that died brings the rows in line with
    the server from it."""

    __tablename__ = "delete_journal"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    source_folder_id: Mapped[str] = mapped_column(ForeignKey("folders.id", ondelete="CASCADE"))
    # Trash for a move; NULL for a permanent delete.
    target_folder_id: Mapped[str | None] = mapped_column(ForeignKey("folders.id", ondelete="CASCADE"))
    # The target's UIDNEXT before the first command: every copy this delete makes is at or above it.
    target_uidnext: Mapped[int | None] = mapped_column(BigInteger)
    uids: Mapped[str] = mapped_column(Text)  # the source UIDs, as an IMAP UID set ("4:9,12")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SpamSettings(TenantOwned, Base):
    """A tenant's spam settings and its own learned layer over the shipped model (one row
    per tenant, made on first use; services.spam_store)."""

    __tablename__ = "spam_settings"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    threshold: Mapped[float] = mapped_column(Float)
    allow: Mapped[list[str]] = mapped_column(JSON, default=list)
    block: Mapped[list[str]] = mapped_column(JSON, default=list)
    # services.spam.TenantLayer.to_bytes(); None until the tenant first labels a message.
    layer: Mapped[bytes | None] = mapped_column(LargeBinary)
    learned: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class WebhookEndpoint(TenantOwned, Base):
    """A tenant's receiver of event deliveries (services.webhooks)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str] = mapped_column(String(200), default="")
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    secret_enc: Mapped[bytes] = mapped_column(LargeBinary)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class WebhookDelivery(TenantOwned, Base):
    """One event for one endpoint: the exact body that is signed and sent, and its attempts."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        # The hourly cleanup's range delete (services.webhooks.delete_old_deliveries).
        Index("ix_webhook_deliveries_created_at", "created_at"),
        # The few deliveries not yet sent, for the unpublished-delivery sweep.
        Index(
            "ix_webhook_deliveries_pending",
            "created_at",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))
    event_id: Mapped[str] = mapped_column(String(36))
    payload: Mapped[str] = mapped_column(Text)
    # pending → succeeded, or retrying → … → succeeded / failed.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_latency_ms: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    # The last attempts, newest last: [{"at", "status_code", "latency_ms", "error"}].
    attempt_log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class OutboxState(enum.StrEnum):
    """An outbox row's life: ``queued`` (or ``scheduled``) → ``sending`` → ``accepted`` (the
    SMTP server took DATA) → ``sent`` (the Sent copy is filed, or was not wanted); or
    ``failed`` / ``cancelled``. services.send.deliver explains why the order is this."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    ACCEPTED = "accepted"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"


class OutboxEntry(TenantOwned, Base):
    """One message to send, built once by the API: its exact bytes travel here, never in
    the broker message (services.send)."""

    __tablename__ = "outbox"
    __table_args__ = (
        # An Idempotency-Key names one send per tenant; NULL keys (no header) never collide.
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_outbox_account_created", "account_id", "created_at"),
        Index("ix_outbox_account_sending", "account_id", "sending_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=OutboxState.QUEUED.value)
    message_id_header: Mapped[str] = mapped_column(String(998))
    task_id: Mapped[str | None] = mapped_column(String(36))
    subject: Mapped[str] = mapped_column(Text, default="")
    envelope_from: Mapped[str] = mapped_column(String(320))
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    # The message exactly as sent and filed; dropped once no attempt can need it again (the
    # row is sent, failed or cancelled: services.send.retention).
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer, default=0)
    save_sent: Mapped[bool] = mapped_column(Boolean, default=True)
    send_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the SMTP transaction was allowed to start: the per-account rate limit's clock.
    sending_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    accepted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    smtp_reply: Mapped[str | None] = mapped_column(Text)
    refused: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    sent_folder: Mapped[str | None] = mapped_column(String(1000))
    sent_uid: Mapped[int | None] = mapped_column(BigInteger)
    sent_message_id: Mapped[str | None] = mapped_column(String(36))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class TaskRecord(TenantOwned, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_tenant_created", "tenant_id", "created_at"),
        Index("ix_tasks_state", "state"),
    )

    # The same id as the Celery task id.
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    account_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id", ondelete="SET NULL"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    queue: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    origin: Mapped[str] = mapped_column(String(16), default="api")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default=TaskState.QUEUED.value)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    stage: Mapped[str] = mapped_column(String(500), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Names the log lines of an internal error, whose details are never shown to clients.
    error_ref: Mapped[str | None] = mapped_column(String(32))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    estimated_duration: Mapped[float | None] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255))
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Bumped by every state or progress write: how cleanup tells a live task from a lost one.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    @property
    def is_final(self) -> bool:
        return self.state in TaskState.final()


# --- dispatch and statistics (read on every dispatch and scrape, so each read is O(1)) ----


class TaskDuration(TenantOwned, Base):
    """How long an account's tasks of one type take: kept up to date as each task succeeds,
    so neither dispatch (the estimate) nor the admin stats read the task history."""

    __tablename__ = "task_durations"

    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    type: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    queue: Mapped[str] = mapped_column(String(32))
    #: Successful runs counted, and their summed duration (s): the all-time mean and count.
    runs: Mapped[int] = mapped_column(BigInteger, default=0)
    total_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    #: A running mean weighted like the last ~20 runs: what the next run will likely take.
    recent_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


_IN_FLIGHT_STATES = "state IN ('queued', 'running', 'retrying')"
_ENDED_BADLY_STATES = "state IN ('failed', 'cancelled')"

# The cap on tasks in flight counts a tenant's in-flight rows of one queue on every dispatch;
# a partial index holds only in-flight rows, so it stays small however long the history grows.
Index(
    "ix_tasks_in_flight",
    TaskRecord.tenant_id,
    TaskRecord.queue,
    TaskRecord.state,
    postgresql_where=_IN_FLIGHT_STATES,
    sqlite_where=_IN_FLIGHT_STATES,
)
# Recent failures and cancellations for the stats and the scrape: a range of this index.
Index(
    "ix_tasks_ended_badly",
    TaskRecord.finished_at,
    TaskRecord.tenant_id,
    postgresql_where=_ENDED_BADLY_STATES,
    sqlite_where=_ENDED_BADLY_STATES,
)
