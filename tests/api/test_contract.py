"""The API contract: the OpenAPI document is valid and complete, and every bad body gets a
4xx in the one error shape — never a 500, never a half-written row."""

from __future__ import annotations

import json
import re

import pytest
from openapi_spec_validator import validate

from tests.support import error_of, response_validator


@pytest.fixture
def spec(app) -> dict:
    return app.test_client().get("/openapi.json").get_json()


def test_openapi_document_validates(spec) -> None:
    validate(spec)
    assert spec["info"]["title"] == "Mailroom API"


def test_openapi_lists_every_route(app, spec) -> None:
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(("/docs", "/openapi.json", "/static")) or rule.rule == "/":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, f"{method} {path} is not in /openapi.json"


def test_api_operations_declare_bearer_and_error_shape(spec) -> None:
    for path, ops in spec["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, op in ops.items():
            # The inbound hook is signed with its account's hook secret instead of a key.
            scheme = "hook_signature" if path.startswith("/api/hooks/inbound/") else "bearer"
            expected: list[dict[str, list[str]]] = [{scheme: []}]
            assert op.get("security") == expected, (method, path)
            assert "401" in op["responses"], (method, path)


def _body_operations(spec, account_id: str):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if "requestBody" in op and path.startswith("/api/"):
                path = path.replace("{account_id}", account_id)
                if "{" not in path:  # a made-up id of another kind is a 404 before any body check
                    yield method.upper(), path


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "code"),
    [
        ("{not json", "application/json", 400, "invalid_json"),
        ("[1, 2]", "application/json", 400, "invalid_json"),
        ('"a string"', "application/json", 400, "invalid_json"),
        ("email=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (json.dumps({"unexpected": 1}), "application/json", 422, "validation_error"),
        (
            json.dumps({"email": 5, "imap": "x", "folders": "INBOX", "full": "maybe", "sync_interval": -1}),
            "application/json",
            422,
            "validation_error",
        ),
    ],
)
def test_bad_bodies_are_4xx_in_error_shape(kit, account, spec, payload, content_type, status, code) -> None:
    operations = list(_body_operations(spec, account["id"]))
    assert len(operations) >= 3
    for method, path in operations:
        response = kit.admin.client.open(
            path,
            method=method,
            data=payload,
            headers={"Authorization": f"Bearer {kit.admin_key}", "Content-Type": content_type},
        )
        assert response.status_code == status, (method, path, response.get_json())
        assert error_of(response)["code"] == code
    # nothing half-written: the tenant still has just the one account and no task
    assert kit.admin.get("/api/accounts").get_json()["total"] == 1
    assert kit.admin.get("/api/tasks").get_json()["total"] == 0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b["imap"].update(port=0),
        lambda b: b["imap"].update(port=70000),
        lambda b: b["imap"].update(tls="maybe"),
        lambda b: b["imap"].update(host="bad host name"),
        lambda b: b["smtp"].pop("password"),
        lambda b: b.update(email="not-an-address"),
        lambda b: b.update(sync_interval=10),
        lambda b: b["imap"].update(password=""),
    ],
)
def test_account_field_validation(kit, dovecot, smtp, mailbox_user, mutate) -> None:
    from tests.conftest import account_body

    body = account_body(dovecot, smtp, mailbox_user)
    mutate(body)
    response = kit.admin.post("/api/accounts", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_error" and error["details"][0]["loc"]
    assert kit.admin.get("/api/accounts").get_json()["total"] == 0


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=201", "offset=-1", "limit=abc", "state=sleeping", "type=teleport"],
)
def test_bad_query_parameters_are_422(kit, query) -> None:
    response = kit.admin.get(f"/api/tasks?{query}")
    assert response.status_code == 422 and error_of(response)["code"] == "validation_error"


def test_sync_body_validation(kit, account) -> None:
    path = f"/api/accounts/{account['id']}/sync"
    for body in ({"folders": []}, {"folders": [""]}, {"full": "yes please"}, {"folders": "INBOX"}):
        response = kit.admin.post(path, json=body)
        assert response.status_code == 422, body
    assert kit.admin.get("/api/tasks").get_json()["total"] == 0


@pytest.mark.parametrize("loose", ["no", "yes", "true", 1, 0])
def test_booleans_in_bodies_are_json_true_or_false_only(
    kit, account, dovecot, smtp, mailbox_user, spec, loose
) -> None:
    """Every boolean of a request body takes JSON true or false only: "no", "yes", "true",
    1 and 0 are a 422 naming the field (pydantic's lax mode read "no" as false)."""
    from tests.conftest import account_body

    acc = f"/api/accounts/{account['id']}"
    message = {"to": ["a@example.test"], "text": "x"}
    attachment = {"filename": "a.txt", "content": "QUJD"}
    cases = [
        # (path in the document, method, path, body, where the problem is)
        *(
            (
                "/api/accounts",
                "post",
                "/api/accounts",
                {**account_body(dovecot, smtp, mailbox_user), f: loose},
                [f],
            )
            for f in ("save_sent_copy", "spam_auto_scan", "spam_move_to_junk")
        ),
        *(
            ("/api/accounts/{account_id}", "patch", acc, {f: loose}, [f])
            for f in ("save_sent_copy", "spam_auto_scan", "spam_move_to_junk")
        ),
        ("/api/accounts/{account_id}/sync", "post", f"{acc}/sync", {"full": loose}, ["full"]),
        (
            "/api/accounts/{account_id}/delete",
            "post",
            f"{acc}/delete",
            {"message_ids": [account["id"]], "permanent": loose},
            ["permanent"],
        ),
        (
            "/api/accounts/{account_id}/spam-check",
            "post",
            f"{acc}/spam-check",
            {"folder": "INBOX", "only_unscored": loose},
            ["only_unscored"],
        ),
        (
            "/api/accounts/{account_id}/send",
            "post",
            f"{acc}/send",
            {**message, "save_sent": loose},
            ["save_sent"],
        ),
        (
            "/api/accounts/{account_id}/send",
            "post",
            f"{acc}/send",
            {**message, "attachments": [{**attachment, "inline": loose}]},
            ["attachments", "0", "inline"],
        ),
        (
            "/api/webhooks",
            "post",
            "/api/webhooks",
            {"url": "http://127.0.0.1:9/in", "events": ["task.failed"], "enabled": loose},
            ["enabled"],
        ),
    ]
    hook = kit.admin.post("/api/webhooks", json={"url": "http://127.0.0.1:9/in", "events": ["task.failed"]})
    hook_id = hook.get_json()["id"]
    cases.append(
        ("/api/webhooks/{webhook_id}", "patch", f"/api/webhooks/{hook_id}", {"enabled": loose}, ["enabled"])
    )
    for doc_path, method, path, body, loc in cases:
        response = getattr(kit.admin, method)(path, json=body)
        assert response.status_code == 422, (path, body, response.get_json())
        error = error_of(response)
        assert error["code"] == "validation_error" and [e["loc"] for e in error["details"]] == [loc], error
        validator = response_validator(spec, doc_path, method, "422")
        assert [p.message for p in validator.iter_errors(response.get_json())] == [], error
    assert kit.admin.get("/api/tasks").get_json()["total"] == 0
    assert kit.admin.get("/api/accounts").get_json()["total"] == 1
    assert kit.admin.get(acc).get_json()["save_sent_copy"] is True


def test_routes_without_a_body_refuse_fields(kit, account, spec) -> None:
    """verify, cancel, spam/ham, secret rotation, redelivery and the rest take no body: a
    field sent to one (a request meant for another route, a typo) is a 422 before the
    route runs, like an unknown field of a route with a body; ``{}`` and no body pass."""
    made_up = "0b7a3c1e-2f4d-4e5a-9b6c-7d8e9f0a1b2c"
    operations = [
        (method.upper(), re.sub(r"\{[a-z_]+\}", made_up, path.replace("{account_id}", account["id"])))
        for path, ops in spec["paths"].items()
        if path.startswith("/api/")
        for method, op in ops.items()
        if method in ("post", "put", "patch") and "requestBody" not in op
    ]
    assert len(operations) >= 8
    for method, path in operations:
        response = kit.admin.client.open(
            path,
            method=method,
            json={"folder": "INBOX", "permanent": True},
            headers={"Authorization": f"Bearer {kit.admin_key}"},
        )
        assert response.status_code == 422, (method, path, response.get_json())
        error = error_of(response)
        assert error["code"] == "validation_error"
        assert [d["loc"] for d in error["details"]] == [["folder"], ["permanent"]], (method, path)
    assert kit.admin.get("/api/tasks").get_json()["total"] == 0
    for body in ({}, None):
        response = kit.admin.post(f"/api/accounts/{account['id']}/verify", json=body)
        assert response.status_code == 202, body


def test_every_422_is_one_entry_per_problem_as_openapi_describes(kit, account, spec) -> None:
    """Refusals from the body's schema, from the input guard and from Mailroom's own checks
    (a host, a list entry, a time, a header) all come as a list of {loc, msg, type}
    entries, which the document's ValidationErrorResponse describes."""
    send = f"/api/accounts/{account['id']}/send"
    message = {"to": [{"email": "a@example.test"}], "text": "x"}
    cases = [
        # (path in the document, method, request, where the problem is)
        ("/api/accounts", "post", lambda: kit.admin.post("/api/accounts", json={"email": "x"}), ["email"]),
        (
            "/api/accounts/{account_id}",
            "patch",
            lambda: kit.admin.patch(f"/api/accounts/{account['id']}", json={"imap": {"port": 994}}),
            ["imap", "password"],
        ),
        (
            "/api/spam/settings",
            "patch",
            lambda: kit.admin.patch("/api/spam/settings", json={"allow": ["not valid!"]}),
            ["allow"],
        ),
        (
            "/api/accounts/{account_id}/send",
            "post",
            lambda: kit.admin.post(send, json={**message, "send_at": "2099-01-01T00:00:00Z"}),
            ["send_at"],
        ),
        (
            "/api/accounts/{account_id}/send",
            "post",
            lambda: kit.admin.post(send, json=message, headers={"Idempotency-Key": "has space"}),
            ["header", "Idempotency-Key"],
        ),
        (
            "/api/accounts/{account_id}/verify",
            "post",
            lambda: kit.admin.post(f"/api/accounts/{account['id']}/verify", json={"bogus": 1}),
            ["bogus"],
        ),
    ]
    for path, method, call, loc in cases:
        response = call()
        assert response.status_code == 422, (path, response.get_json())
        error = error_of(response)
        assert error["code"] == "validation_error" and loc in [e["loc"] for e in error["details"]], error
        validator = response_validator(spec, path, method, "422")
        assert [p.message for p in validator.iter_errors(response.get_json())] == [], error
    refused = kit.admin.patch("/api/spam/settings", json={"allow": ["ok@example.test", "not valid!"]})
    assert error_of(refused)["details"] == [
        {
            "loc": ["allow"],
            "msg": "entries must be email addresses or domain names",
            "type": "value_error",
            "ctx": {"invalid": ["not valid!"]},
        }
    ]
    assert kit.admin.get("/api/tasks").get_json()["total"] == 0
