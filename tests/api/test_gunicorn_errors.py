"""What gunicorn refuses before Flask sees it comes in the API's one error shape: the API
served as deploy/api.yaml runs it (its gunicorn command, with this suite's settings)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import env_for, worker_env
from tests.servers.api import ApiServer


@pytest.fixture(scope="module")
def api_port(base_values: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = ApiServer(worker_env(env_for(base_values)), tmp_path_factory.mktemp("gunicorn"))
    try:
        server.start()
        yield server.port
    finally:
        server.stop()


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is; the status, header fields and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /api/tasks/" + b"x" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n", 400, "invalid_request"),
        (b"NOT A REQUEST\r\n\r\n", 400, "invalid_request"),
    ],
    ids=["request-line-too-long", "header-too-large", "bad-header-name", "garbage"],
)
def test_requests_gunicorn_refuses_get_the_error_shape(
    api_port: int, request_bytes: bytes, status: int, code: str
) -> None:
    got, headers, body = exchange(api_port, request_bytes)
    assert got == status, body[:300]
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and error["details"] is None


def test_flask_still_answers_what_gunicorn_accepts(api_port: int) -> None:
    request = b"GET /api/tasks/nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    got, _, body = exchange(api_port, request)
    assert got == 401 and json.loads(body)["error"]["code"] == "unauthorized"
