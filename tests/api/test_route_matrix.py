"""Every route of the URL map against every way a request can be wrong, on PostgreSQL:
another tenant's ids (404), no / revoked / malformed key (401), a member on an admin route
(403), an oversized body (413), a body that is not JSON (415), invalid UTF-8 and NUL bytes
in the body, the query and the path (4xx), a method the route does not have (405), a very
long URL. Each answer is in the one error shape, and none is a 5xx.

The routes come from the app itself, so a route added later is walked too."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from mailroom.api.send import body_limit
from mailroom.app import MAX_BODY_BYTES
from services import tenancy
from services.db import transaction
from services.models import ApiKey
from tests.support import TenantKit, error_of

pytestmark = pytest.mark.slow

BODY_METHODS = {"POST", "PATCH", "PUT"}
#: The routes that need the admin role (everything else is open to a member of the tenant).
ADMIN_PREFIXES = ("/api/admin/", "/api/webhooks")
ADMIN_ROUTES = {("PATCH", "/api/spam/settings")}
#: Signed with the account's hook secret instead of an API key.
HOOK_PREFIX = "/api/hooks/"

#: Bodies valid for an admin, so that only the role can refuse them (a body invalid for
#: anyone is a 422 first: that tells a member nothing).
VALID_BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/webhooks"): {"url": "http://127.0.0.1:9/h", "events": ["task.failed"]},
}

COUNTS: dict[str, int] = {}
JSON = "application/json"


def _routes(app: Any) -> Iterator[tuple[str, Any]]:
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                yield method, rule


def _path(rule: Any, ids: dict[str, str]) -> str:
    path = rule.rule
    for name in rule.arguments:
        path = path.replace(f"<{name}>", ids.get(name, str(uuid.uuid4())))
    return path


def _is_admin_route(method: str, rule: str) -> bool:
    return rule.startswith(ADMIN_PREFIXES) or (method, rule) in ADMIN_ROUTES


def _open(app: Any, method: str, path: str, key: str | None, **kw: Any) -> Any:
    headers = dict(kw.pop("headers", {}))
    if key is not None:
        headers.setdefault("Authorization", f"Bearer {key}")
    return app.test_client().open(path, method=method, headers=headers, **kw)


def _client_error(response: Any, where: Any, *statuses: int) -> dict[str, Any]:
    assert response.status_code < 500, (where, response.status_code, response.get_data()[:300])
    if statuses:
        assert response.status_code in statuses, (where, response.status_code, response.get_data()[:300])
    else:
        assert 400 <= response.status_code < 500, (where, response.status_code, response.get_data()[:300])
    return error_of(response)


def _unknown_id(rule: str) -> tuple[int, ...]:
    """An id that names nothing is a 404; on the signed inbound hook, the same 401 as any
    bad signature (it tells an unsigned caller nothing)."""
    return (401,) if rule.startswith(HOOK_PREFIX) else (404,)


def _empty(method: str) -> dict[str, Any] | None:
    return {} if method in BODY_METHODS else None


def _count(category: str, n: int = 1) -> None:
    COUNTS[category] = COUNTS.get(category, 0) + n


@pytest.fixture
def owned(kit: TenantKit, account: dict[str, Any]) -> dict[str, str]:
    """Real ids of ``kit``'s tenant for every path parameter the API has."""
    ids = {"account_id": account["id"]}
    ids["task_id"] = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    sent = kit.admin.post(f"/api/accounts/{account['id']}/send", json={"to": ["a@b.test"], "text": "x"})
    ids["outbox_id"] = sent.get_json()["outbox_id"]
    hook = kit.admin.post("/api/webhooks", json={"url": "http://127.0.0.1:9/h", "events": ["task.failed"]})
    ids["webhook_id"] = hook.get_json()["id"]
    return ids


def test_another_tenants_ids_are_404_everywhere(
    app: Any, kit: TenantKit, other_kit: TenantKit, owned: Any
) -> None:
    checked = 0
    for method, rule in _routes(app):
        if not rule.arguments or rule.rule.startswith(HOOK_PREFIX):
            continue
        path = _path(rule, owned)
        body = {"message_ids": [str(uuid.uuid4())]} if rule.rule.endswith(("/delete", "/spam-check")) else {}
        response = _open(
            app, method, path, other_kit.admin_key, json=body if method in BODY_METHODS else None
        )
        assert _client_error(response, (method, path), 404)["code"] == "not_found"
        checked += 1
    _count("other tenant's ids", checked)
    assert checked >= 20
    assert kit.admin.get(f"/api/accounts/{owned['account_id']}").status_code == 200


def test_no_revoked_or_malformed_key_is_401_everywhere(
    app: Any, kit: TenantKit, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as session:
        key = session.scalar(
            tenancy.unrestricted_unsafe(ApiKey).where(ApiKey.key_hash == tenancy.hash_key(kit.member_key))
        )
        assert key is not None
        tenancy.revoke_api_key(session, key.prefix)
    headers_list: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic " + kit.admin_key},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Bearer mr_" + "x" * 43},
        {"Authorization": "Bearer " + kit.admin_key[:-1]},
        {"Authorization": "Bearer " + kit.admin_key + "x"},
        {"Authorization": "Bearer " + kit.member_key},  # revoked
        {"Authorization": "Bearer " + kit.admin_key.replace("mr_", "mr_\u00e9", 1)},
    ]
    checked = 0
    for method, rule in _routes(app):
        if rule.rule.startswith(HOOK_PREFIX):
            continue
        path = _path(rule, {})
        for headers in headers_list:
            response = _open(
                app, method, path, None, headers=headers, json={} if method in BODY_METHODS else None
            )
            assert _client_error(response, (method, path, headers), 401)["code"] == "unauthorized"
            checked += 1
    _count("missing/revoked/malformed key", checked)
    # the inbound hook has no key: any missing or wrong signature is the same 401
    for headers in ({}, {"X-Mailroom-Timestamp": "1", "X-Mailroom-Signature": "sha256=00"}):
        response = _open(app, "POST", f"/api/hooks/inbound/{uuid.uuid4()}", None, headers=headers, json={})
        _client_error(response, headers, 401)
        _count("missing/revoked/malformed key")


def test_a_member_gets_403_on_admin_routes_only(app: Any, kit: TenantKit) -> None:
    admin_routes = 0
    for method, rule in _routes(app):
        if rule.rule.startswith(HOOK_PREFIX):
            continue
        path = _path(rule, {})
        body = VALID_BODIES.get((method, rule.rule), {}) if method in BODY_METHODS else None
        response = _open(app, method, path, kit.member_key, json=body)
        assert response.status_code < 500, (method, path, response.get_json())
        if _is_admin_route(method, rule.rule):
            assert _client_error(response, (method, path), 403)["code"] == "forbidden"
            admin_routes += 1
        else:
            assert response.status_code != 403, (method, path, response.get_json())
        _count("member on every route")
    assert admin_routes >= 10


def test_oversized_bodies_are_413_and_other_media_types_415(app: Any, kit: TenantKit, owned: Any) -> None:
    send_limit = body_limit(app.extensions["mailroom"].settings.send_max_bytes)
    tasks_before = kit.admin.get("/api/tasks").get_json()["total"]
    checked = 0
    for method, rule in _routes(app):
        if method not in BODY_METHODS:
            continue
        path = _path(rule, owned)
        limit = send_limit if rule.rule.endswith("/send") else MAX_BODY_BYTES
        big = b'{"text": "' + b"a" * limit + b'"}'
        response = _open(app, method, path, kit.admin_key, data=big, content_type="application/json")
        assert _client_error(response, (method, path), 413)["code"] == "payload_too_large"
        for content_type, data in (
            ("text/plain", b'{"folders": ["INBOX"]}'),
            ("text/plain; charset=utf-8", b"hello"),
            ("application/xml", b"<a/>"),
            ("multipart/form-data; boundary=x", b"--x\r\n\r\nv\r\n--x--\r\n"),
            ("", b'{"a": 1}'),
        ):
            headers = {"Content-Type": content_type} if content_type else {}
            response = _open(app, method, path, kit.admin_key, data=data, headers=headers)
            error = _client_error(response, (method, path, content_type), 415)
            assert error["code"] == "unsupported_media_type"
            checked += 1
        checked += 1
    _count("oversized / wrong media type", checked)
    assert checked >= 6 * 15
    assert kit.admin.get("/api/tasks").get_json()["total"] == tasks_before  # nothing queued


#: A stray byte, an encoded surrogate, an overlong "/", a truncated sequence.
INVALID_UTF8 = [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"abc\xe2\x82"]


def test_invalid_utf8_in_body_query_and_path_is_4xx(app: Any, kit: TenantKit, owned: Any) -> None:
    checked = 0
    for method, rule in _routes(app):
        path = _path(rule, owned if method != "DELETE" else {})  # the account must live on
        for bad in INVALID_UTF8:
            if method in BODY_METHODS:
                for body in (b'{"folder": "' + bad + b'"}', b'{"' + bad + b'": 1}', bad):
                    response = _open(
                        app, method, path, kit.admin_key, data=body, content_type="application/json"
                    )
                    assert _client_error(response, (method, path, body), 400, 401, 422)["code"]
                    checked += 1
            # a raw byte and its %-escape in the query string
            raw_query = ("folder=" + bad.decode("latin-1")) * 2  # WSGI strings are latin-1 bytes
            response = _open(app, method, path, kit.admin_key, environ_overrides={"QUERY_STRING": raw_query})
            assert response.status_code < 500, (method, path, bad, response.get_data()[:300])
            escaped = "folder=" + "".join(f"%{b:02X}" for b in bad)
            response = _open(app, method, f"{path}?{escaped}", kit.admin_key)
            assert response.status_code < 500, (method, path, bad, response.get_data()[:300])
            checked += 2
            if rule.arguments:
                # the raw bytes as a WSGI server hands them over (PATH_INFO is latin-1)
                last = rule.arguments and sorted(rule.arguments)[0]
                bad_path = _path(rule, {**owned, last: "x" + bad.decode("latin-1")})
                response = _open(app, method, "/", kit.admin_key, environ_overrides={"PATH_INFO": bad_path})
                _client_error(response, (method, bad_path), *_unknown_id(rule.rule))
                escaped_path = _path(rule, {**owned, last: "".join(f"%{b:02X}" for b in bad)})
                response = _open(app, method, escaped_path, kit.admin_key)
                _client_error(response, (method, escaped_path), *_unknown_id(rule.rule))
                checked += 2
    _count("invalid UTF-8", checked)


def test_nul_bytes_anywhere_are_4xx(app: Any, kit: TenantKit, owned: Any) -> None:
    """Beyond tests/api/test_hostile_input.py (escaped NUL in JSON, NUL in query values and
    ids): a raw NUL byte in the body, %00 in the path, NUL in header values and names."""
    checked = 0
    for method, rule in _routes(app):
        path = _path(rule, owned if method != "DELETE" else {})
        if method in BODY_METHODS:
            for body in (b'{"folder": "a\x00b"}', b"\x00", b'{"a":1}\x00'):
                response = _open(app, method, path, kit.admin_key, data=body, content_type="application/json")
                _client_error(response, (method, path, body), 400, 401)
                checked += 1
        if rule.arguments:
            first = sorted(rule.arguments)[0]
            nul_path = _path(rule, {**owned, first: owned.get(first, str(uuid.uuid4())) + "%00"})
            response = _open(app, method, nul_path, kit.admin_key)
            _client_error(response, (method, nul_path), *_unknown_id(rule.rule))
            checked += 1
        for headers in (
            {"Authorization": f"Bearer {kit.admin_key}\x00"},
            {"Authorization": f"Bearer\x00{kit.admin_key}"},
            {"Idempotency-Key": "a\x00b"},
            {"X-Request-Id": "\x00"},
        ):
            response = _open(
                app, method, path, None, headers=headers, json={} if method in BODY_METHODS else None
            )
            assert response.status_code < 500, (method, path, headers, response.get_data()[:300])
            if response.status_code >= 400:
                error_of(response)
            checked += 1
        response = _open(app, method, path + "?a%00b=1", kit.admin_key)
        _client_error(response, (method, path, "nul in a query name"), 404, 422)
        checked += 1
    _count("NUL bytes", checked)


def test_methods_a_route_lacks_are_405_and_long_urls_are_json(app: Any, kit: TenantKit, owned: Any) -> None:
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        path = _path(rule, owned)
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - rule.methods):
            response = _open(app, method, path, kit.admin_key)
            # another rule may match the same path with this method; otherwise a 405
            if response.status_code == 405:
                assert error_of(response)["code"] == "method_not_allowed"
                assert response.headers.get("Allow")
            else:
                assert response.status_code < 500, (method, path, response.get_data()[:300])
            checked += 1
        for long in ("a" * 10_000, "%41" * 3000):
            if rule.arguments:
                long_path = _path(rule, {**owned, sorted(rule.arguments)[0]: long})
                response = _open(app, "GET", long_path, kit.admin_key)
                _client_error(response, long_path[:60], 405, *_unknown_id(rule.rule))
            response = _open(app, "GET", path + "?folder=" + long + "&cursor=" + long, kit.admin_key)
            assert response.status_code < 500 and response.is_json, (path, response.status_code)
            checked += 2
    _count("unsupported methods / long URLs", checked)
    print("\nroute matrix inputs per category:", COUNTS)


def test_an_encoded_surrogate_in_a_stored_field_is_400_not_500(
    kit: TenantKit, dovecot: Any, smtp: Any, mailbox_user: tuple[str, str]
) -> None:
    """ED A0 80 is how a lone surrogate looks in bytes: not UTF-8, and json.loads(bytes)
    would let it through as "\\ud800", which PostgreSQL cannot store."""
    from tests.conftest import account_body

    for raw in (b"\xed\xa0\x80", b"\xff", b"\xc0\xaf"):
        body = json.dumps(account_body(dovecot, smtp, mailbox_user, name="NAME")).encode()
        response = kit.admin.post(
            "/api/accounts", data=body.replace(b"NAME", raw), content_type="application/json"
        )
        assert response.status_code == 400 and error_of(response)["code"] == "invalid_json", raw
    assert kit.admin.get("/api/accounts").get_json()["total"] == 0
