"""How every Mailroom process logs: one JSON object per line for machines (the default),
or a plain line for people (``mailroom run``). Context that a record's own message does
not carry — the task id, tenant id, queue, task type and attempt of the task being worked
on, the request's method and route — comes from ``log_context`` and is added to every
record logged inside it, by any library.

Secrets never belong in a log line; as a last guard, URL credentials
(``scheme://user:password@``) are blanked in every message.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter

#: Fields ``log_context`` may set; the plain format shows them in this order.
CONTEXT_FIELDS = ("task_id", "tenant_id", "queue", "task_type", "attempt", "request_id")

_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("mailroom_log_context", default=None)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@", re.IGNORECASE)
_HANDLER_NAME = "mailroom"


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Add ``values`` to every record logged in this block (nested blocks add to it)."""
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), **values})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Puts the block's context on the record (without overwriting a record's own field)
    and blanks URL credentials in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_CONTEXT.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        message = record.getMessage()
        if "://" in message and "@" in message:
            record.msg, record.args = _URL_CREDENTIALS.sub(r"\g<scheme>***:***@", message), None
        return True


class PlainFormatter(logging.Formatter):
    """``time level logger: message [key=value ...]`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS if hasattr(record, key)]
        return f"{line} [{' '.join(extra)}]" if extra else line


class MailroomJsonFormatter(JsonFormatter):
    """JSON lines with an ISO 8601 UTC ``time``, ``level``, ``logger`` and ``message``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def make_handler(fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if fmt == "json":
        handler.setFormatter(
            MailroomJsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    return handler


def configure_logging(level: str, fmt: str, *, force: bool = False) -> None:
    """Log ``level`` and above from every logger to stderr in ``fmt`` ("json" or "text").
    Like ``logging.basicConfig``, it leaves a root logger that already has handlers alone
    (a test runner's, say) unless ``force`` (a Celery process owns its logging)."""
    root = logging.getLogger()
    if root.handlers and not force:
        return
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(make_handler(fmt))
    root.setLevel(level)
