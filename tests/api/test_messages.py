"""The message routes: page sizes, folder names in the page, and the body fetch limit's 429."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from services import bodies
from services.db import transaction
from services.models import Folder, Message
from services.settings import Settings
from tests.support import TenantKit, error_of, response_validator


def _seed(sessions: sessionmaker[Session], kit: TenantKit, account: dict[str, Any], count: int) -> list[str]:
    """``count`` messages over two folders of ``account``, written straight to the database."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    with transaction(sessions) as session:
        folders = [
            Folder(tenant_id=kit.tenant_id, account_id=account["id"], name=name, flags=[])
            for name in ("INBOX", "Archive")
        ]
        session.add_all(folders)
        session.flush()
        rows = [
            Message(
                tenant_id=kit.tenant_id,
                account_id=account["id"],
                folder_id=folders[n % 2].id,
                uid=n + 1,
                date=start + timedelta(minutes=n),
                subject=f"m{n}",
            )
            for n in range(count)
        ]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


def test_pages_of_500_and_no_more(
    kit: TenantKit, account: dict[str, Any], sessions: sessionmaker[Session]
) -> None:
    _seed(sessions, kit, account, 520)
    url = f"/api/accounts/{account['id']}/messages"
    page = kit.admin.get(f"{url}?limit=500")
    assert page.status_code == 200
    body = page.get_json()
    assert len(body["items"]) == 500 and body["next_cursor"]
    assert body["items"][0]["subject"] == "m519"
    # The folder name comes with each message (joined into the page's query).
    assert {(m["subject"], m["folder"]) for m in body["items"][:2]} == {
        ("m519", "Archive"),
        ("m518", "INBOX"),
    }
    rest = kit.admin.get(f"{url}?limit=500&cursor={body['next_cursor']}").get_json()
    assert len(rest["items"]) == 20 and rest["next_cursor"] is None
    too_big = kit.admin.get(f"{url}?limit=501")
    assert too_big.status_code == 422
    assert error_of(too_big)["code"] == "validation_error"


def test_body_fetches_over_the_tenant_limit_get_429(
    kit: TenantKit, account: dict[str, Any], sessions: sessionmaker[Session], settings: Settings
) -> None:
    message_id = _seed(sessions, kit, account, 1)[0]
    slots = bodies.body_slots(settings)
    # Every slot taken, as by fetches running in other API processes.
    held = [slots.try_take(kit.tenant_id) for _ in range(settings.body_fetch_concurrency)]
    try:
        assert all(held)
        response = kit.admin.get(f"/api/messages/{message_id}?body=1")
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        error = error_of(response)
        assert error["code"] == "rate_limited" and error["details"] == {"retry_after": 1}
        # The message itself (no body) is not limited.
        assert kit.admin.get(f"/api/messages/{message_id}").status_code == 200
    finally:
        for token in held:
            if token is not None:
                slots.release(kit.tenant_id, token)


def test_a_message_with_its_body_is_what_openapi_describes(
    kit: TenantKit, account: dict[str, Any], sessions: sessionmaker[Session], settings: Settings
) -> None:
    whole, large = _seed(sessions, kit, account, 2)
    raw = (
        b"From: Ann <ann@example.test>\r\nTo: bob@example.test\r\nSubject: report\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
        b"hello\r\n--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
        b'filename="r.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n'
    )
    part = {"content_type": "text/plain", "encoding": "7bit", "charset": "utf-8", "size": 5}
    cut = {
        "text": "hello",
        "html": None,
        "headers": {"Subject": "big"},
        "attachments": [{"filename": "big.bin", "content_type": "application/octet-stream", "size": 9}],
        "truncated": True,
        "size": 2_000_000,
        "parts": [
            {"section": "1", **part, "disposition": None, "filename": None},
            {"section": "2", **part, "disposition": "attachment", "filename": "big.bin"},
        ],
    }
    # Bodies as a fetch from the server stores them in the cache, which ?body=1 then reads.
    with transaction(sessions) as session:
        for message_id, body in ((whole, {**bodies.parse_body(raw), "truncated": False}), (large, cut)):
            message = session.get(Message, message_id)
            assert message is not None
            folder = session.get(Folder, message.folder_id)
            assert folder is not None
            bodies._store(session, folder, message, body, settings)

    spec = kit.admin.client.get("/openapi.json").get_json()
    validator = response_validator(spec, "/api/messages/{message_id}", "get", "200")
    for message_id in (whole, large):
        for query in ("", "?body=1"):
            response = kit.admin.get(f"/api/messages/{message_id}{query}")
            assert response.status_code == 200
            problems = [error.message for error in validator.iter_errors(response.get_json())]
            assert problems == [], (query, problems)
    body = kit.admin.get(f"/api/messages/{whole}?body=1").get_json()["body"]
    assert body["text"].strip() == "hello" and body["attachments"][0]["filename"] == "r.pdf"
