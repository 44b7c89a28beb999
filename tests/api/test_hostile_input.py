"""Odd input on every route, on both databases: NUL characters and lone surrogates in ids,
query values and JSON strings, and ids that are not ids. Each gets a 4xx in the one error
shape — never a 500 (PostgreSQL cannot store NUL; SQLite can, which hides the bug there)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from services.db import make_engine, make_sessionmaker, transaction, unrestricted_unsafe_sessions
from services.migrate import upgrade
from services.settings import load_settings
from tests.support import TenantKit, error_of, make_tenant

NUL = "\x00"
SURROGATE = "\ud800"


@pytest.fixture(scope="module")
def sqlite_kit(base_values: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The same API on SQLite, with the shared broker (nothing here reaches a worker)."""
    from mailroom.app import create_app

    path = tmp_path_factory.mktemp("sqlite") / "mailroom.db"
    settings = load_settings(**{**base_values, "database_url": f"sqlite:///{path}"})
    upgrade(make_engine(settings))
    app = create_app(settings)
    sessions = unrestricted_unsafe_sessions(make_sessionmaker(make_engine(settings)))
    with transaction(sessions) as session:
        kit = make_tenant(session, app)
    yield kit


@pytest.fixture(params=["postgresql", "sqlite"])
def any_kit(request: pytest.FixtureRequest, kit: TenantKit) -> TenantKit:
    return kit if request.param == "postgresql" else request.getfixturevalue("sqlite_kit")


def _routes(app: Any) -> Iterator[tuple[str, str]]:
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, rule.rule


def _fill(rule: str, value: str) -> str:
    parts = []
    for segment in rule.split("/"):
        parts.append(value if segment.startswith("<") else segment)
    return "/".join(parts)


def _call(kit: TenantKit, method: str, path: str, **kw: Any) -> Any:
    return kit.admin.client.open(
        path, method=method, headers={"Authorization": f"Bearer {kit.admin_key}"}, **kw
    )


def _assert_client_error(response: Any, method: str, path: str) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (method, path, response.status_code, response.get_data()[:300])
    return error_of(response)


@pytest.mark.parametrize("bad_id", ["abc" + NUL, NUL, "x" * 40, "..", "1 OR 1=1", "é" * 36])
def test_ids_that_are_not_ids_are_404_on_every_route(app: Any, any_kit: TenantKit, bad_id: str) -> None:
    checked = 0
    for method, rule in _routes(app):
        if "<" not in rule:
            continue
        path = _fill(rule, bad_id)
        response = _call(any_kit, method, path, json={} if method in {"POST", "PATCH"} else None)
        error = _assert_client_error(response, method, path)
        # the signed inbound hook answers any unknown or malformed id with its one 401
        expected = (401,) if rule.startswith("/api/hooks/") else (404, 422)
        assert response.status_code in expected, (method, path, error)
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("bad", [NUL, "inbox" + NUL])
def test_query_values_with_nul_are_422_on_every_route(app: Any, any_kit: TenantKit, bad: str) -> None:
    real_id = str(uuid.uuid4())
    for method, rule in _routes(app):
        path = _fill(rule, real_id)
        for name in ("folder", "subject", "from", "state", "account_id", "cursor", "anything"):
            response = _call(any_kit, method, path, query_string={name: bad})
            error = _assert_client_error(response, method, path)
            assert response.status_code == 422 and error["code"] == "validation_error", (method, path, error)


@pytest.mark.parametrize("query", ["subject=%ff", "subject=abc%E2%82", "folder=%ED%A0%80", "%C0%AF=1"])
def test_percent_escapes_that_are_not_utf8_are_400_on_every_route(
    app: Any, any_kit: TenantKit, query: str
) -> None:
    """The docs promise a 400 for a query string that is not UTF-8: a %-escape of bytes that
    are not UTF-8 is one too, not a search for U+FFFD."""
    real_id = str(uuid.uuid4())
    for method, rule in _routes(app):
        path = _fill(rule, real_id)
        response = _call(any_kit, method, f"{path}?{query}")
        error = _assert_client_error(response, method, path)
        assert response.status_code == 400 and error["code"] == "invalid_request", (method, path, error)
        assert error["message"] == "the query string is not valid UTF-8"


@pytest.mark.parametrize("bad", [NUL, "name" + NUL + "tail", SURROGATE])
def test_json_strings_with_nul_are_422_on_every_route(app: Any, any_kit: TenantKit, bad: str) -> None:
    body = {"name": bad, "email": f"a{bad}@example.test", "folders": [bad], bad: 1}
    payload = json.dumps(body)  # ensure_ascii: "\u0000", "\ud800" escapes, as a client sends them
    create = _call(any_kit, "POST", "/api/accounts", data=payload, content_type="application/json")
    assert create.status_code == 422 and "body" in error_of(create)["message"]
    real_id = str(uuid.uuid4())
    for method, rule in _routes(app):
        if method not in {"POST", "PATCH", "PUT"}:
            continue
        path = _fill(rule, real_id)
        response = _call(any_kit, method, path, data=payload, content_type="application/json")
        error = _assert_client_error(response, method, path)
        assert response.status_code == 422, (method, path, error)


def test_nul_in_a_real_accounts_fields_is_refused_and_nothing_is_written(any_kit: TenantKit) -> None:
    body = {
        "email": "someone@example.test",
        "name": "Nul" + NUL,
        "imap": {"host": "127.0.0.1", "port": 1, "tls": "none", "username": "u" + NUL, "password": "p"},
        "smtp": {"host": "127.0.0.1", "port": 1, "tls": "none", "username": "u", "password": "p" + NUL},
    }
    response = any_kit.admin.post("/api/accounts", json=body)
    assert response.status_code == 422, response.get_json()
    assert any_kit.admin.get("/api/accounts").get_json()["total"] == 0


def test_an_id_filter_that_is_not_an_id_is_422(any_kit: TenantKit) -> None:
    response = any_kit.admin.get("/api/tasks", query_string={"account_id": "not-an-id"})
    assert response.status_code == 422 and error_of(response)["code"] == "validation_error"


@pytest.mark.parametrize("ident", ["x" + NUL, SURROGATE, "not-an-id"])
def test_a_crafted_cursor_is_400_not_a_query(
    any_kit: TenantKit, dovecot, smtp, mailbox_user, ident: str
) -> None:
    """The cursor is opaque but comes from the client: its decoded id must be an id."""
    import base64

    from tests.conftest import account_body

    account = any_kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()
    raw = json.dumps(["2026-01-01T00:00:00+00:00", ident]).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    response = any_kit.admin.get(f"/api/accounts/{account['id']}/messages", query_string={"cursor": cursor})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_request"
