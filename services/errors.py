"""Domain exceptions. Each carries a stable code and the HTTP status the API maps it to;
whether a mail fault is worth retrying is decided here, by its class, and nowhere else."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc


class MailroomError(Exception):
    """Base of every error Mailroom reports to a client."""

    code = "error"
    status = 500

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidRequest(MailroomError):
    code = "invalid_request"
    status = 400


class UnsupportedMediaType(MailroomError):
    code = "unsupported_media_type"
    status = 415


class ValidationFailed(MailroomError):
    """Input that is refused. Its ``details`` are always a list of problems in pydantic's
    shape, ``{"loc": [...], "msg": ..., "type": ...}``, whoever found them: a check of our
    own names its ``field`` (``"imap.password"`` is ``loc`` ``["imap", "password"]``) and may
    add ``context`` (the entry's ``ctx``: the entries refused, a limit)."""

    code = "validation_error"
    status = 422

    def __init__(
        self,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        field: str | None = None,
        context: dict[str, Any] | None = None,
        code: str | None = None,
    ) -> None:
        if details is None:
            prefix = f"{field}: " if field else ""
            entry: dict[str, Any] = {
                "loc": field.split(".") if field else [],
                "msg": message.removeprefix(prefix) if prefix else message,
                "type": "value_error",
            }
            if context:
                entry["ctx"] = context
            details = [entry]
        super().__init__(message, details=details, code=code)


class Unauthorized(MailroomError):
    code = "unauthorized"
    status = 401


class Forbidden(MailroomError):
    code = "forbidden"
    status = 403


class NotFound(MailroomError):
    code = "not_found"
    status = 404


class Conflict(MailroomError):
    code = "conflict"
    status = 409


class Superseded(MailroomError):
    """Another task took over this task's work (e.g. the account's sync lock)."""

    code = "superseded"
    status = 409


class TooManyRequests(MailroomError):
    """Over a per-tenant limit. ``retry_after`` (whole seconds) is sent as ``Retry-After``
    and in ``details``."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, details={"retry_after": retry_after})
        self.retry_after = retry_after


class ServiceUnavailable(MailroomError):
    code = "service_unavailable"
    status = 503


# --- mail faults: the one place that says what is transient --------------------------------


class MailError(MailroomError):
    """A fault talking to a mail server."""

    code = "mail_error"
    status = 502
    transient = False
    # What the metrics count it as: "imap" or "smtp", and a short kind ("auth", "timeout",
    # "connect", "tls", "unavailable", "rejected", "smtp_4xx", "smtp_5xx", "other").
    protocol: str | None = None
    kind = "other"

    def tagged(self, protocol: str, kind: str) -> MailError:
        """Name the protocol and kind of this fault (for metrics); returns ``self``."""
        self.protocol = protocol
        self.kind = kind
        return self


class TransientMailError(MailError):
    """Network faults, timeouts, IMAP ``NO [UNAVAILABLE]``, SMTP 4xx: worth another try."""

    code = "mail_unavailable"
    transient = True


class PermanentMailError(MailError):
    """Bad credentials, SMTP 5xx, a server that refuses the request: retrying cannot help."""

    code = "mail_rejected"


class AuthenticationFailed(PermanentMailError):
    code = "mail_auth_failed"


class TaskCancelled(Exception):
    """Raised inside a task at a checkpoint once cancellation was requested."""


def is_database_fault(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached or dropped the connection
    (a restart, a failover, a network fault), not that a statement was wrong."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is worth retrying: a transient mail fault, a network/timeout
    error, or the database unreachable for a moment (:func:`is_database_fault`)."""
    if isinstance(exc, MailError):
        return exc.transient
    if is_database_fault(exc):
        return True
    return isinstance(exc, (TimeoutError, ConnectionError, OSError)) and not isinstance(
        exc, (FileNotFoundError, PermissionError)
    )
