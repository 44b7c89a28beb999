"""Accounts through the REST API: create, read, change, delete; secrets stay secret."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from services.crypto import SecretBox
from services.models import Account
from tests.conftest import account_body
from tests.support import error_of


def test_create_returns_account_without_secrets(kit, dovecot, smtp, mailbox_user, sessions, settings) -> None:
    response = kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user))
    assert response.status_code == 201
    body = response.get_json()
    assert body["email"] == f"{mailbox_user[0]}@example.test"
    assert body["imap"] == {
        "host": "127.0.0.1",
        "port": dovecot.port,
        "tls": "none",
        "username": mailbox_user[0],
    }
    assert "password" not in response.get_data(as_text=True)
    assert body["sync_interval"] == settings.default_sync_interval
    with sessions() as session:
        row = session.scalar(select(Account).where(Account.id == body["id"]))
        assert row is not None
        # stored encrypted, and the ciphertext decrypts to what was sent
        assert mailbox_user[1].encode() not in row.imap_password_enc
        assert SecretBox(settings.encryption_keys()).decrypt(row.imap_password_enc) == mailbox_user[1]


def test_list_paginates(kit, dovecot, smtp, mailbox_user) -> None:
    ids = []
    for i in range(3):
        body = account_body(dovecot, smtp, mailbox_user, email=f"box{i}@example.test")
        ids.append(kit.admin.post("/api/accounts", json=body).get_json()["id"])
    first = kit.admin.get("/api/accounts?limit=2").get_json()
    assert first["total"] == 3 and first["next_offset"] == 2
    assert [a["id"] for a in first["items"]] == ids[:2]
    second = kit.admin.get("/api/accounts?limit=2&offset=2").get_json()
    assert [a["id"] for a in second["items"]] == ids[2:] and second["next_offset"] is None


def test_patch_merges_endpoint_fields(kit, account: dict[str, Any], sessions, settings) -> None:
    response = kit.admin.patch(
        f"/api/accounts/{account['id']}", json={"imap": {"port": 1993}, "name": "Renamed"}
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["imap"]["port"] == 1993 and body["imap"]["host"] == "127.0.0.1"
    assert body["name"] == "Renamed" and body["smtp"] == account["smtp"]
    response = kit.admin.patch(f"/api/accounts/{account['id']}", json={"smtp": {"password": "new-secret"}})
    assert response.status_code == 200
    with sessions() as session:
        row = session.get(Account, account["id"])
        assert SecretBox(settings.encryption_keys()).decrypt(row.smtp_password_enc) == "new-secret"


def test_delete_then_404(kit, account) -> None:
    assert kit.admin.delete(f"/api/accounts/{account['id']}").status_code == 204
    response = kit.admin.get(f"/api/accounts/{account['id']}")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_member_sees_only_own_accounts_admin_sees_all(kit, dovecot, smtp, mailbox_user, account) -> None:
    mine = kit.member.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()
    assert [a["id"] for a in kit.member.get("/api/accounts").get_json()["items"]] == [mine["id"]]
    assert kit.member.get(f"/api/accounts/{account['id']}").status_code == 404
    admin_view = {a["id"] for a in kit.admin.get("/api/accounts").get_json()["items"]}
    assert admin_view == {mine["id"], account["id"]}


def test_private_hosts_refused_when_not_allowed(kit, dovecot, smtp, mailbox_user, settings, app) -> None:
    from mailroom.app import create_app
    from tests.support import Api

    strict = create_app(settings.model_copy(update={"allow_private_hosts": False}))
    api = Api(strict, kit.admin_key)
    response = api.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user))
    assert response.status_code == 422
    error = error_of(response)
    assert "private or loopback" in error["message"] and error["details"] == {"field": "imap.host"}
    unresolvable = account_body(dovecot, smtp, mailbox_user)
    unresolvable["imap"]["host"] = "no-such-host.invalid"
    response = api.post("/api/accounts", json=unresolvable)
    assert response.status_code == 422 and "does not resolve" in error_of(response)["message"]
    assert kit.admin.get("/api/accounts").get_json()["total"] == 0
