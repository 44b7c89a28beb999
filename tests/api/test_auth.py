"""Authentication and tenancy: 401 for bad keys, 403 for non-admins, 404 across tenants."""

from __future__ import annotations

import re

import pytest

from services import tenancy
from services.db import transaction
from services.models import ApiKey
from tests.support import Api, error_of


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing Authorization"),
        ("Basic abc", "malformed Authorization"),
        ("Bearer ", "malformed Authorization"),
        ("Bearer not-a-key", "malformed API key"),
        ("Bearer mr_" + "x" * 43, "unknown API key"),
    ],
)
def test_bad_keys_are_401(app, header, fragment) -> None:
    client = app.test_client()
    response = client.get("/api/accounts", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert fragment in error_of(response)["message"]


def test_revoked_key_is_401_and_last_used_recorded(app, kit, sessions) -> None:
    assert kit.member.get("/api/accounts").status_code == 200
    with sessions() as session:
        key = session.scalar(
            tenancy.unrestricted_unsafe(ApiKey).where(ApiKey.key_hash == tenancy.hash_key(kit.member_key))
        )
        assert key.last_used_at is not None
    with transaction(sessions) as session:
        tenancy.revoke_api_key(session, key.prefix)
    response = kit.member.get("/api/accounts")
    assert response.status_code == 401 and "revoked" in error_of(response)["message"]


def test_admin_routes_need_admin(kit) -> None:
    for path in ("/api/admin/stats", "/api/admin/active-tasks", "/api/admin/health"):
        response = kit.member.get(path)
        assert response.status_code == 403 and error_of(response)["code"] == "forbidden"
    assert kit.member.post("/api/admin/cancel-all").status_code == 403


def test_every_route_with_another_tenants_id_is_404(app, kit, other_kit, account) -> None:
    """Walk the app's URL map, so a route added later cannot forget the tenant check."""
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    ids = {"account_id": account["id"], "task_id": task_id, "message_id": _a_message_id(kit, account)}
    sent = kit.admin.post(f"/api/accounts/{account['id']}/send", json={"to": ["a@b.test"], "text": "x"})
    ids["outbox_id"] = sent.get_json()["outbox_id"]
    hook = kit.admin.post("/api/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["task.failed"]})
    ids["webhook_id"] = hook.get_json()["id"]
    ids["delivery_id"] = "00000000-0000-4000-8000-000000000000"
    # Bodies valid for the owner, so only the tenant check can refuse them (a body invalid
    # for anyone may be refused first: 422 tells nothing about whose account it is).
    bodies = {
        "/api/accounts/<account_id>/delete": {"message_ids": [ids["message_id"]]},
        "/api/accounts/<account_id>/spam-check": {"message_ids": [ids["message_id"]]},
    }
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/") or not rule.arguments:
            continue
        if rule.rule.startswith("/api/hooks/inbound/"):
            continue  # no key: signed by the account's hook secret (tests/test_webhooks.py)
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", ids[name])
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = other_kit.admin.client.open(
                path,
                method=method,
                json=bodies.get(rule.rule, {}) if method in {"POST", "PATCH"} else None,
                headers={"Authorization": f"Bearer {other_kit.admin_key}"},
            )
            assert response.status_code == 404, (method, path, response.get_json())
            assert error_of(response)["code"] == "not_found"
            checked += 1
    assert checked >= 8
    # and the owner still sees them
    assert kit.admin.get(f"/api/accounts/{account['id']}").status_code == 200


def _a_message_id(kit, account) -> str:
    """A real message id of this tenant when one exists; any id otherwise (still 404)."""
    items = kit.admin.get(f"/api/accounts/{account['id']}/messages").get_json().get("items") or []
    return items[0]["id"] if items else "00000000-0000-4000-8000-000000000000"


def test_unknown_route_and_method_use_error_shape(kit) -> None:
    response = kit.admin.get("/api/nothing-here")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    response = kit.admin.client.put("/api/accounts", headers={"Authorization": f"Bearer {kit.admin_key}"})
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


def test_key_format(kit) -> None:
    assert re.fullmatch(r"mr_[A-Za-z0-9_-]{43}", kit.admin_key)


def test_probes_need_no_key(app) -> None:
    client = Api(app, None)
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["database"]["ok"] is True
    assert client.get("/openapi.json").status_code == 200
    assert b"swagger" in client.get("/docs").data.lower()
    assert b"mailroom_http_requests_total" in client.get("/metrics").data
