"""gunicorn's settings for the API (``gunicorn -c python:mailroom.gunicorn_config``).

A request gunicorn refuses before Flask sees it (a request line over 4,094 octets, too many
or too large header fields, a malformed request line or header) is answered by gunicorn
itself, with an HTML page. Here those answers take the API's one error shape instead
(``{"error": {"code", "message", "details"}}``, ``application/json``), with gunicorn's
status and reason: a client parses every error of the API the same way.

gunicorn has no setting for that page: its workers call ``gunicorn.util.write_error``, which
this module replaces when gunicorn loads it (in the master, before the workers fork).
"""

from __future__ import annotations

import json
import socket

from gunicorn import util

from mailroom.errors import HTTP_CODES


def write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's error answer, in the error shape."""
    code = HTTP_CODES.get(status_int, "invalid_request" if status_int < 500 else "internal_error")
    message = f"{reason}: {mesg}" if mesg else reason
    body = json.dumps({"error": {"code": code, "message": message, "details": None}}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = write_error
