"""Text that no route may pass on to the database: NUL characters and lone surrogates.

PostgreSQL text cannot hold NUL (``\\x00``) and its UTF-8 encoder refuses lone surrogates
(``"\\ud800"`` is valid JSON), so either one in a path, a query string or a JSON body would
surface as a 500 deep inside a query — on PostgreSQL only, while SQLite stores it happily.
Refusing them at the door, before any route runs, makes every route answer the same 4xx on
both databases. Ids in paths are checked for their shape too: a malformed id names nothing,
so it is a 404 like any unknown id, and it never reaches a query.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from flask import request

from services.errors import InvalidRequest, NotFound, ValidationFailed
from services.models import ID_PATTERN, is_id

__all__ = ["ID_PATTERN", "check_json_text", "check_request_text", "is_id"]

_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def _bad_text(value: str) -> str | None:
    match = _BAD_TEXT.search(value)
    if match is None:
        return None
    return "a NUL character" if match.group() == "\x00" else "an unpaired surrogate (invalid Unicode)"


def find_bad_text(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], str] | None:
    """The location and kind of the first NUL or lone surrogate in a parsed JSON value."""
    if isinstance(value, str):
        problem = _bad_text(value)
        return (loc, problem) if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _bad_text(str(key))
            if problem:
                return (*loc, str(key)), problem
            found = find_bad_text(item, (*loc, str(key)))
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = find_bad_text(item, (*loc, index))
            if found:
                return found
    return None


def refuse(loc: tuple[str | int, ...], problem: str) -> ValidationFailed:
    where = ".".join(str(p) for p in loc) or "request"
    return ValidationFailed(
        f"{where}: text must not contain {problem}",
        details=[{"loc": [str(p) for p in loc], "msg": f"contains {problem}", "type": "invalid_text"}],
    )


def check_request_text() -> None:
    """``before_request``: ids in the path must look like ids (else 404), and no path
    segment or query value may hold NUL or a lone surrogate (else 422), and the query string
    must be UTF-8, raw and once its %-escapes are decoded (else 400: Werkzeug would raise
    decoding raw bytes, a 500, and would turn ``%ff`` into U+FFFD, a search for text the
    client never sent)."""
    try:
        parse_qsl(request.query_string.decode(), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("the query string is not valid UTF-8", code="invalid_request") from None
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str) and name.endswith("_id") and not is_id(value):
            raise NotFound(f"{name.removesuffix('_id').replace('_', ' ')} not found")
    if _bad_text(request.path):
        raise refuse(("path",), _bad_text(request.path) or "")
    for key, value in request.args.items(multi=True):
        problem = _bad_text(key) or _bad_text(value)
        if problem:
            raise refuse(("query", key), problem)


# Valid JSON can carry a NUL or a surrogate only as a \u escape (raw control characters
# are invalid JSON and UTF-8 cannot encode surrogates), so a body without such an escape
# needs no walk: a 5,000-id body is checked in microseconds instead of tens of ms.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89abAB89cdefCDEF][0-9a-fA-F]{2})")


def check_json_text(parsed: Any, raw: bytes | None = None) -> None:
    """Called on every parsed JSON body: NUL or a lone surrogate anywhere is a 422.
    ``raw``, the body's bytes, lets a body with no suspect escape skip the walk."""
    if raw is not None and not _SUSPECT_ESCAPE.search(raw):
        return
    found = find_bad_text(parsed, ("body",))
    if found:
        raise refuse(*found)
