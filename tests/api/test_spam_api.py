"""The spam routes without a worker: tenant scoping (another tenant's account or message is
a 404), the settings' roles and validation, the verdict a threshold change re-judges, the
list filter, and what the routes put in the task record."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.db import transaction
from services.models import Folder, Message, TaskRecord
from services.spam import DEFAULT_THRESHOLD
from tests.support import TenantKit, error_of


def _seed(
    sessions: sessionmaker[Session], kit: TenantKit, account: dict[str, Any], scores: list[float | None]
) -> list[str]:
    """One INBOX message per score, written straight to the database."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with transaction(sessions) as session:
        folder = Folder(tenant_id=kit.tenant_id, account_id=account["id"], name="INBOX", flags=[])
        session.add(folder)
        session.flush()
        rows = [
            Message(
                tenant_id=kit.tenant_id,
                account_id=account["id"],
                folder_id=folder.id,
                uid=n + 1,
                date=start + timedelta(minutes=n),
                subject=f"s{n}",
                spam_score=score,
                is_spam=None if score is None else score >= 0.5,
                indicators=None
                if score is None
                else [{"name": "statistical_tokens", "weight": 1.0, "detail": ""}],
                spam_checked_at=None if score is None else start,
            )
            for n, score in enumerate(scores)
        ]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


def _listed(kit: TenantKit, account: dict[str, Any], query: str = "") -> dict[str, dict[str, Any]]:
    page = kit.admin.get(f"/api/accounts/{account['id']}/messages?limit=500{query}")
    assert page.status_code == 200, page.get_json()
    return {m["subject"]: m for m in page.get_json()["items"]}


def test_settings_defaults_roles_and_normalised_lists(kit: TenantKit, other_kit: TenantKit) -> None:
    shown = kit.member.get("/api/spam/settings")
    assert shown.status_code == 200
    assert shown.get_json() == {"threshold": DEFAULT_THRESHOLD, "allow": [], "block": [], "learned": 0}

    refused = kit.member.patch("/api/spam/settings", json={"threshold": 0.7})
    assert refused.status_code == 403 and error_of(refused)["code"] == "forbidden"

    changed = kit.admin.patch(
        "/api/spam/settings",
        json={"threshold": 0.7, "allow": ["Boss@Example.COM", "partner.example", "boss@example.com"]},
    )
    assert changed.status_code == 200, changed.get_json()
    assert changed.get_json()["allow"] == ["boss@example.com", "partner.example"]
    blocked = kit.admin.patch("/api/spam/settings", json={"block": ["Spam.Example."]}).get_json()
    assert blocked == {
        "threshold": 0.7,
        "allow": ["boss@example.com", "partner.example"],
        "block": ["spam.example"],
        "learned": 0,
    }
    assert kit.member.get("/api/spam/settings").get_json() == blocked
    # Another tenant's settings are its own.
    assert other_kit.admin.get("/api/spam/settings").get_json()["block"] == []


def test_settings_validation_is_422(kit: TenantKit) -> None:
    for body in (
        {"threshold": 1.5},
        {"threshold": 0},
        {"threshold": "high"},
        {"allow": ["not an address"]},
        {"block": ["@example.com"]},
        {"block": ["a" * 400]},
        {"allow": [f"u{i}@example.com" for i in range(5001)]},
        {"colour": "red"},
    ):
        response = kit.admin.patch("/api/spam/settings", json=body)
        assert response.status_code == 422, (body, response.get_json())
        assert error_of(response)["code"] == "validation_error"
    assert kit.admin.get("/api/spam/settings").get_json()["threshold"] == DEFAULT_THRESHOLD


def test_threshold_rejudges_and_the_list_filters_by_verdict(
    kit: TenantKit, account: dict[str, Any], sessions: sessionmaker[Session]
) -> None:
    assert kit.admin.patch("/api/spam/settings", json={"threshold": 0.5}).status_code == 200
    _seed(sessions, kit, account, [0.1, 0.55, 0.65, 0.9, None])  # judged at 0.5
    listed = _listed(kit, account)
    assert listed["s3"]["spam_score"] == 0.9 and listed["s3"]["is_spam"] is True
    assert listed["s3"]["indicators"] == [{"name": "statistical_tokens", "weight": 1.0, "detail": ""}]
    assert (
        listed["s4"]["is_spam"] is None
        and listed["s4"]["indicators"] == []
        and listed["s4"]["spam_label"] is None
    )
    assert set(_listed(kit, account, "&is_spam=true")) == {"s1", "s2", "s3"}
    assert set(_listed(kit, account, "&is_spam=false")) == {"s0"}

    assert kit.admin.patch("/api/spam/settings", json={"threshold": 0.6}).status_code == 200
    assert set(_listed(kit, account, "&is_spam=true")) == {"s2", "s3"}
    assert set(_listed(kit, account, "&is_spam=false")) == {"s0", "s1"}


def test_a_label_is_recorded_at_once_and_queues_learning(
    kit: TenantKit, account: dict[str, Any], sessions: sessionmaker[Session]
) -> None:
    ids = _seed(sessions, kit, account, [0.9, 0.1])
    response = kit.admin.post(f"/api/messages/{ids[0]}/ham")
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["message_id"] == ids[0] and body["label"] == "ham" and body["queue"] == "spam"
    shown = kit.admin.get(f"/api/messages/{ids[0]}").get_json()
    assert shown["spam_label"] == "ham" and shown["is_spam"] is False and shown["spam_score"] == 0.9
    assert kit.admin.post(f"/api/messages/{ids[1]}/spam").status_code == 202
    assert set(_listed(kit, account, "&is_spam=true")) == {"s1"}
    # A threshold change never overrides what a user said.
    kit.admin.patch("/api/spam/settings", json={"threshold": 0.05})
    assert set(_listed(kit, account, "&is_spam=true")) == {"s1"}
    with sessions() as session:
        record = session.scalar(select(TaskRecord).where(TaskRecord.id == body["task_id"]))
        assert record is not None and record.type == "spam_check" and record.account_id == account["id"]
        assert record.params == {"message_ids": [ids[0]], "learn": "ham"}


def test_spam_check_routes_queue_what_was_asked(
    kit: TenantKit, account: dict[str, Any], sessions: sessionmaker[Session]
) -> None:
    ids = _seed(sessions, kit, account, [None, None])
    by_ids = kit.admin.post(f"/api/accounts/{account['id']}/spam-check", json={"message_ids": ids + ids[:1]})
    assert by_ids.status_code == 202, by_ids.get_json()
    by_folder = kit.admin.post(
        f"/api/accounts/{account['id']}/spam-check", json={"folder": "INBOX", "only_unscored": True}
    )
    assert by_folder.status_code == 202
    with sessions() as session:
        first = session.get(TaskRecord, by_ids.get_json()["task_id"])
        second = session.get(TaskRecord, by_folder.get_json()["task_id"])
        assert first is not None and first.params == {"message_ids": ids}
        assert second is not None and second.params == {"folder": "INBOX", "only_unscored": True}
    missing = kit.admin.post(f"/api/accounts/{account['id']}/spam-check", json={"folder": "Nowhere"})
    assert missing.status_code == 404


def test_spam_check_validation_is_422(kit: TenantKit, account: dict[str, Any]) -> None:
    url = f"/api/accounts/{account['id']}/spam-check"
    bodies: list[dict[str, Any]] = [
        {},
        {"message_ids": []},
        {"message_ids": ["nope"]},
        {"message_ids": [str(uuid.uuid4()) for _ in range(1001)]},
        {"message_ids": [str(uuid.uuid4())], "folder": "INBOX"},
        {"folder": ""},
        {"folder": "INBOX", "learn": "spam"},
        {"folder": "INBOX", "only_unscored": "maybe"},
    ]
    for body in bodies:
        response = kit.admin.post(url, json=body)
        assert response.status_code == 422, (body, response.get_json())
        assert error_of(response)["code"] == "validation_error"


def test_another_tenants_account_and_messages_are_404(
    kit: TenantKit, other_kit: TenantKit, account: dict[str, Any], sessions: sessionmaker[Session]
) -> None:
    ids = _seed(sessions, kit, account, [0.9])
    for response in (
        other_kit.admin.post(f"/api/accounts/{account['id']}/spam-check", json={"folder": "INBOX"}),
        other_kit.admin.post(f"/api/accounts/{account['id']}/spam-check", json={"message_ids": ids}),
        other_kit.admin.post(f"/api/messages/{ids[0]}/spam"),
        other_kit.admin.post(f"/api/messages/{ids[0]}/ham"),
        # A member sees only its own accounts' messages.
        kit.member.post(f"/api/messages/{ids[0]}/spam"),
        kit.member.post(f"/api/accounts/{account['id']}/spam-check", json={"folder": "INBOX"}),
        kit.admin.post(f"/api/messages/{uuid.uuid4()}/ham"),
    ):
        assert response.status_code == 404, response.get_json()
        assert error_of(response)["code"] == "not_found"
    shown = kit.admin.get(f"/api/messages/{ids[0]}").get_json()
    assert shown["spam_label"] is None and shown["is_spam"] is True


def test_account_spam_options(kit: TenantKit, account: dict[str, Any]) -> None:
    assert account["spam_auto_scan"] is False and account["spam_move_to_junk"] is False
    changed = kit.admin.patch(f"/api/accounts/{account['id']}", json={"spam_move_to_junk": True})
    assert changed.status_code == 200
    assert changed.get_json()["spam_move_to_junk"] is True and changed.get_json()["spam_auto_scan"] is False
    bad = kit.admin.patch(f"/api/accounts/{account['id']}", json={"spam_auto_scan": "sometimes"})
    assert bad.status_code == 422


def test_routes_are_in_the_openapi_document_with_their_errors(kit: TenantKit) -> None:
    document = kit.admin.get("/openapi.json").get_json()
    for path, method, ok in (
        ("/api/accounts/{account_id}/spam-check", "post", "202"),
        ("/api/messages/{message_id}/spam", "post", "202"),
        ("/api/messages/{message_id}/ham", "post", "202"),
        ("/api/spam/settings", "get", "200"),
        ("/api/spam/settings", "patch", "200"),
    ):
        responses = document["paths"][path][method]["responses"]
        assert {ok, "401", "403", "404", "422", "429"} <= set(responses), (path, method)
