"""Mailroom's settings: read once from the environment (and a `.env` file), typed and checked.

Every variable is named ``MAILROOM_<FIELD>``; `.env.example` documents each one. A missing or
bad value stops start-up with :class:`SettingsError`, whose message is one line naming the
variable, so an operator sees at once what to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.redis_sentinel import SentinelTarget, is_sentinel
from services.redis_sentinel import parse as parse_sentinel

ENV_PREFIX = "MAILROOM_"
DEFAULT_DATA_DIR = Path("var")


class SettingsError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""


class Settings(BaseSettings):
    """All of Mailroom's configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- storage -------------------------------------------------------------------------
    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_DATA_DIR / 'mailroom.db'}",
        description="SQLAlchemy URL; SQLite by default, PostgreSQL in production.",
    )
    database_pool_size: int = Field(default=5, ge=1, le=200)
    database_pgbouncer: bool = Field(
        default=False,
        description="MAILROOM_DATABASE_URL points at PgBouncer in transaction pooling mode: "
        "no server-side prepared statements (a transaction's server connection is not the next one's).",
    )

    # --- broker and result backend (separate Redis instances allowed) --------------------
    broker_url: str = Field(default="redis://127.0.0.1:6379/0")
    broker_password: str | None = None
    broker_tls: bool = False
    broker_tls_verify: bool = True
    broker_sentinel_master: str = Field(
        default="mymaster",
        min_length=1,
        description="The master's name when MAILROOM_BROKER_URL is sentinel://.",
    )
    broker_sentinel_password: str | None = Field(
        default=None, description="The sentinels' own password, if any."
    )
    result_backend_url: str = Field(default="redis://127.0.0.1:6379/1")
    result_backend_password: str | None = None
    result_backend_tls: bool = False
    result_backend_tls_verify: bool = True
    result_backend_sentinel_master: str = Field(default="mymaster", min_length=1)
    result_backend_sentinel_password: str | None = None

    # --- secrets -------------------------------------------------------------------------
    secret_key: str = Field(
        default="",
        description="Fernet key(s), comma-separated, newest first; encrypts mail credentials.",
    )

    # --- task policy ---------------------------------------------------------------------
    task_soft_time_limit: int = Field(default=25 * 60, ge=1)
    task_hard_time_limit: int = Field(default=30 * 60, ge=2)
    retry_base_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    result_expires: int = Field(default=3600, ge=60)
    broker_visibility_timeout: int = Field(default=3 * 3600, ge=2)
    task_history_days: int = Field(default=30, ge=1)
    stuck_task_grace_seconds: int = Field(default=600, ge=1)
    worker_max_tasks_per_child: int = Field(default=1000, ge=1)
    worker_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Niceness a worker process (and its pool) takes at start, so that on a machine "
        "shared with the API the API answers first; 0 leaves it as started.",
    )
    max_tasks_in_flight_per_queue: int = Field(
        default=1000,
        ge=1,
        description="Queued + running + retrying tasks one tenant may have on one queue; more is a 429.",
    )
    periodic_sync_seconds: float = Field(default=300.0, gt=0)
    cleanup_seconds: float = Field(default=3600.0, gt=0)

    # --- mail ----------------------------------------------------------------------------
    allow_private_hosts: bool = Field(
        default=False,
        description="Allow mail hosts on loopback/private networks (embedded mode and tests).",
    )
    mail_timeout_seconds: float = Field(default=30.0, gt=0)
    sync_batch_size: int = Field(default=500, ge=1, le=5000)
    #: Messages per batch of a delete task: each batch's rows commit together, and a cancel
    #: is honoured between batches (services.mail_delete).
    delete_batch_size: int = Field(default=2000, ge=1, le=10000)
    default_sync_interval: int = Field(default=900, ge=60)

    # --- the watcher (`mailroom watcher`: IMAP NOTIFY / IDLE, a sync on each change) -------
    watcher_notify: bool = Field(
        default=True,
        description="Watch every folder on one connection with NOTIFY where the server offers it; "
        "off, or on servers without it, IDLE on INBOX plus a STATUS round over the other folders.",
    )
    watcher_status_seconds: float = Field(default=3.0, ge=0.5, le=300)
    watcher_keepalive_seconds: float = Field(default=600.0, ge=1, le=1500)
    watcher_reload_seconds: float = Field(default=10.0, ge=0.5)
    watcher_heartbeat_seconds: float = Field(default=5.0, gt=0)
    watcher_ttl_seconds: float = Field(default=15.0, gt=0)
    watcher_max_connections_per_user: int = Field(default=1, ge=1, le=100)
    watcher_backoff_max_seconds: float = Field(default=300.0, ge=1)
    watcher_poll_seconds: float = Field(default=0.25, gt=0, le=60)
    watcher_group: str = Field(default="default", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    watcher_tenants: str = Field(default="", description="Comma-separated tenant ids; empty: every tenant.")

    # --- sending (POST /api/accounts/{id}/send) -----------------------------------------
    send_max_bytes: int = Field(
        default=25 * 1024 * 1024,
        ge=1024,
        description="Largest message content (bodies + decoded attachments) the send route takes.",
    )
    smtp_idle_seconds: float = Field(
        default=30.0, gt=0, description="A reused SMTP connection idle longer than this is closed."
    )
    send_schedule_max_seconds: int = Field(
        default=2 * 3600,
        ge=60,
        description="How far ahead send_at may be; also kept below the visibility timeout minus "
        "the hard time limit and the longest retry delay.",
    )
    send_rate_per_account: float = Field(
        default=0.0,
        ge=0,
        description="Messages per second one account may send (0: no limit); more wait their turn.",
    )
    smtp_messages_per_connection: int = Field(
        default=100, ge=1, description="Messages sent over one SMTP connection before a fresh one."
    )
    outbox_retention_hours: int = Field(
        default=72,
        ge=24,
        description="Hours a finished outbox row is kept after its request (at least 24: an "
        "Idempotency-Key replays its first request for as long as the row exists).",
    )

    # --- message bodies (GET /api/messages/{id}?body=1) ----------------------------------
    body_max_bytes: int = Field(default=1024 * 1024, ge=1024)
    body_fetch_timeout_seconds: float = Field(default=5.0, gt=0)
    body_fetch_concurrency: int = Field(default=3, ge=1, le=100)
    body_cache_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    body_cache_tenant_bytes: int = Field(default=50 * 1024 * 1024, ge=0)

    # --- spam checks ---------------------------------------------------------------------
    spam_max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="Bytes of a message a spam check reads.",
    )
    spamd_url: str | None = Field(
        default=None,
        description="An optional SpamAssassin spamd (spamd://host:port); its score joins as the "
        "`spamassassin` indicator. Unset, or unreachable, the scorer works without it.",
    )

    # --- outbound webhooks (services.webhooks) -------------------------------------------
    webhook_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="A webhook delivery's connect timeout, and again its timeout for each read.",
    )
    webhook_max_attempts: int = Field(
        default=30, ge=1, le=200, description="Attempts of one webhook delivery at most (within a day)."
    )
    webhook_retry_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Longest wait between two attempts of a webhook delivery (kept below "
        "MAILROOM_BROKER_VISIBILITY_TIMEOUT minus MAILROOM_TASK_HARD_TIME_LIMIT: a retry waits "
        "in the broker).",
    )

    # --- API rate limits (per tenant; per client address before authentication) ---------
    rate_limit_enabled: bool = True
    rate_limit_per_second: int = Field(default=20, ge=1, description="Burst: requests per second.")
    rate_limit_per_minute: int = Field(default=600, ge=1, description="Sustained: requests per minute.")
    rate_limit_queue_per_minute: int = Field(
        default=60, ge=1, description="Requests per minute to routes that queue work (verify, sync)."
    )
    rate_limit_storage_url: str | None = Field(
        default=None, description="Redis for the counters; the broker's Redis when unset."
    )

    # --- observability -------------------------------------------------------------------
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_basic_auth: str | None = Field(
        default=None,
        description="user:password[,user2:password2] for Flower (`mailroom flower`); required "
        "when Flower listens beyond loopback.",
    )
    metrics_token: str | None = Field(
        default=None, description="When set, GET /metrics needs `Authorization: Bearer <token>`."
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="When set, each Celery worker serves its pool's metrics on this port "
        "(needs PROMETHEUS_MULTIPROC_DIR); unset, the API's /metrics shows them when they share "
        "its PROMETHEUS_MULTIPROC_DIR, as under `mailroom run`.",
    )
    worker_heartbeat_file: str | None = Field(
        default=None,
        description="When set, each Celery worker touches this file every 5 s while it runs "
        "(for a liveness probe that a broker outage does not fail).",
    )
    log_level: str = Field(default="INFO")
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="json: one JSON object per line (time, level, logger, message, task and tenant "
        "ids); text: a plain line for people. `mailroom run` uses text unless this is set.",
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        if value.startswith("postgres:") or value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value.split("://", 1)[1]
        return value

    @field_validator("broker_url", "result_backend_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if is_sentinel(value):
            parse_sentinel(value, master="m", password=None, sentinel_password=None)  # raises if bad
            return value
        if not value.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ValueError("must be a redis://, rediss://, redis+socket:// or sentinel:// URL")
        return value

    @field_validator("spamd_url")
    @classmethod
    def _spamd_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value if "://" in value else f"spamd://{value}")
        if parts.scheme not in ("spamd", "tcp") or not parts.hostname:
            raise ValueError("must be spamd://host:port")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError("must be spamd://host:port") from exc
        return value

    @field_validator("rate_limit_storage_url")
    @classmethod
    def _rate_limit_storage_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://")):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value or None

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: str) -> str:
        from services.crypto import validate_keys

        validate_keys(value)
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _flower_basic_auth(cls, value: str | None) -> str | None:
        if not value:
            return None
        for pair in value.split(","):
            user, sep, password = pair.partition(":")
            if not sep or not user or not password:
                raise ValueError("must be user:password, several separated by commas")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.task_soft_time_limit >= self.task_hard_time_limit:
            raise ValueError("MAILROOM_TASK_SOFT_TIME_LIMIT must be below MAILROOM_TASK_HARD_TIME_LIMIT")
        if self.broker_visibility_timeout <= self.task_hard_time_limit + self.retry_max_seconds:
            # A message whose visibility runs out while it is still being worked on (or held
            # by a worker until its retry time) is handed to a second worker: the same task
            # would run twice.
            raise ValueError(
                "MAILROOM_BROKER_VISIBILITY_TIMEOUT must be above MAILROOM_TASK_HARD_TIME_LIMIT "
                "plus MAILROOM_RETRY_MAX_SECONDS"
            )
        if not self.secret_key and not self.is_sqlite:
            raise ValueError("MAILROOM_SECRET_KEY is required when the database is not SQLite")
        if self.retry_base_seconds > self.retry_max_seconds:
            raise ValueError("MAILROOM_RETRY_BASE_SECONDS must not exceed MAILROOM_RETRY_MAX_SECONDS")
        if self.watcher_ttl_seconds <= self.watcher_heartbeat_seconds:
            raise ValueError("MAILROOM_WATCHER_TTL_SECONDS must exceed MAILROOM_WATCHER_HEARTBEAT_SECONDS")
        return self

    @property
    def broker_connection_url(self) -> str:
        """The broker URL with the password and TLS settings folded in."""
        return _redis_url(self.broker_url, self.broker_password, self.broker_tls)

    @property
    def result_backend_connection_url(self) -> str:
        """The result backend URL with the password and TLS settings folded in."""
        return _redis_url(self.result_backend_url, self.result_backend_password, self.result_backend_tls)

    @property
    def broker_sentinel(self) -> SentinelTarget | None:
        """The broker's sentinels and master, when its URL is sentinel://."""
        if not is_sentinel(self.broker_url):
            return None
        return parse_sentinel(
            self.broker_url,
            master=self.broker_sentinel_master,
            password=self.broker_password,
            sentinel_password=self.broker_sentinel_password,
        )

    @property
    def result_backend_sentinel(self) -> SentinelTarget | None:
        if not is_sentinel(self.result_backend_url):
            return None
        return parse_sentinel(
            self.result_backend_url,
            master=self.result_backend_sentinel_master,
            password=self.result_backend_password,
            sentinel_password=self.result_backend_sentinel_password,
        )

    @property
    def rate_limit_storage(self) -> str:
        """Where the API's rate-limit counters live: their own Redis, else the broker's."""
        sentinel = self.broker_sentinel
        if self.rate_limit_storage_url is None and sentinel is not None:
            return sentinel.limits_uri()
        url = self.rate_limit_storage_url or self.broker_connection_url
        # The limits library names a unix socket redis+unix://, Celery redis+socket://.
        return url.replace("redis+socket://", "redis+unix://", 1)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def data_dir(self) -> Path:
        """Where embedded mode keeps its files: the SQLite database's folder, else ./var."""
        if self.is_sqlite:
            path = self.database_url.split(":///", 1)[-1]
            if path and path != ":memory:":
                return Path(path).resolve().parent
        return DEFAULT_DATA_DIR.resolve()

    def encryption_keys(self) -> str:
        """The Fernet keys; embedded (SQLite) mode falls back to a key file in the data dir."""
        if self.secret_key:
            return self.secret_key
        from services.crypto import key_file_secret

        return key_file_secret(self.data_dir / "secret.key")


def _redis_url(url: str, password: str | None, tls: bool) -> str:
    if is_sentinel(url):
        # kombu and Celery read the master's password from the first sentinel URL.
        first, _, rest = url.partition(";")
        folded = _redis_url("redis" + first.removeprefix("sentinel"), password, False)
        return "sentinel" + folded.removeprefix("redis") + (";" + rest if rest else "")
    parts = urlsplit(url)
    scheme = parts.scheme
    if tls and scheme == "redis":
        scheme = "rediss"
    netloc = parts.netloc
    if password and "@" not in netloc:
        netloc = f":{quote(password, safe='')}@{netloc}"
    if (scheme, netloc) == (parts.scheme, parts.netloc):
        return url  # as given: urlunsplit would write redis+socket:///path as redis+socket:/path
    return urlunsplit((scheme, netloc, parts.path, parts.query, parts.fragment))


def load_settings(**overrides: object) -> Settings:
    """Read the settings once; raise :class:`SettingsError` naming the first bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = error.get("loc") or ()
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if loc:
            name = ENV_PREFIX + str(loc[0]).upper()
            raise SettingsError(f"{name}: {message}") from None
        raise SettingsError(message) from None
