"""Accounts through the REST API: create, read, change, delete; secrets stay secret."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from services.crypto import SecretBox
from services.models import Account
from tests.conftest import account_body
from tests.support import error_of, fields_of


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
    row = _stored(sessions, body["id"])
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
        f"/api/accounts/{account['id']}",
        json={"imap": {"port": 1993, "password": "moved-secret"}, "name": "Renamed"},
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["imap"]["port"] == 1993 and body["imap"]["host"] == "127.0.0.1"
    assert body["name"] == "Renamed" and body["smtp"] == account["smtp"]
    response = kit.admin.patch(f"/api/accounts/{account['id']}", json={"smtp": {"password": "new-secret"}})
    assert response.status_code == 200
    row = _stored(sessions, account["id"])
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
    assert "private or loopback" in error["message"] and fields_of(error["details"]) == ["imap.host"]
    unresolvable = account_body(dovecot, smtp, mailbox_user)
    unresolvable["imap"]["host"] = "no-such-host.invalid"
    response = api.post("/api/accounts", json=unresolvable)
    assert response.status_code == 422 and "does not resolve" in error_of(response)["message"]
    assert kit.admin.get("/api/accounts").get_json()["total"] == 0


def _stored(sessions, account_id: str) -> Any:
    """The account's stored row, read below the ORM (no tenant scoping to satisfy)."""
    with sessions() as session:
        table = Account.__table__
        return session.connection().execute(select(table).where(table.c.id == account_id)).one()


def test_patch_moving_an_endpoint_needs_its_password(
    kit, account: dict[str, Any], sessions, settings
) -> None:
    """Host, port, TLS mode and username each point the stored password somewhere new."""
    box = SecretBox(settings.encryption_keys())
    before = _stored(sessions, account["id"])
    moves = [
        ("imap", {"host": "localhost"}),
        ("imap", {"port": 1993}),
        ("imap", {"tls": "ssl"}),
        ("imap", {"username": "someone-else"}),
        ("smtp", {"host": "localhost"}),
        ("smtp", {"port": 2525, "tls": "starttls"}),
        ("smtp", {"username": "someone-else"}),
    ]
    for kind, change in moves:
        response = kit.admin.patch(f"/api/accounts/{account['id']}", json={kind: change})
        assert response.status_code == 422, (kind, change)
        error = error_of(response)
        assert error["code"] == "validation_error" and fields_of(error["details"]) == [f"{kind}.password"]
    after = _stored(sessions, account["id"])
    for kind in ("imap", "smtp"):
        for field in ("host", "port", "tls", "username", "password_enc"):
            column = f"{kind}_{field}"
            assert getattr(after, column) == getattr(before, column)

    # The same fields with the password again are accepted and stored.
    response = kit.admin.patch(
        f"/api/accounts/{account['id']}",
        json={"imap": {"host": "localhost", "port": 1993, "password": "imap-2"}},
    )
    assert response.status_code == 200
    assert response.get_json()["imap"]["host"] == "localhost" and response.get_json()["imap"]["port"] == 1993
    assert box.decrypt(_stored(sessions, account["id"]).imap_password_enc) == "imap-2"


def test_patch_without_a_move_needs_no_password(kit, account: dict[str, Any], sessions, settings) -> None:
    box = SecretBox(settings.encryption_keys())
    # Restating the stored values is not a move.
    same = {k: account["smtp"][k] for k in ("host", "port", "tls", "username")}
    response = kit.admin.patch(
        f"/api/accounts/{account['id']}", json={"smtp": same, "name": "Same place", "sync_interval": 600}
    )
    assert response.status_code == 200 and response.get_json()["name"] == "Same place"
    response = kit.admin.patch(f"/api/accounts/{account['id']}", json={"imap": {"password": "rotated"}})
    assert response.status_code == 200
    assert box.decrypt(_stored(sessions, account["id"]).imap_password_enc) == "rotated"


def test_plain_text_refused_for_public_hosts(kit, dovecot, smtp, mailbox_user, account, settings) -> None:
    """``tls: none`` is for loopback and private servers only, on create and on PATCH, for
    IMAP and SMTP, whether or not private hosts are allowed. (An IP literal: no DNS.)"""
    from mailroom.app import create_app
    from tests.support import Api

    public = "8.8.8.8"
    for kind in ("imap", "smtp"):
        body = account_body(dovecot, smtp, mailbox_user)
        body[kind]["host"] = public
        response = kit.admin.post("/api/accounts", json=body)
        assert response.status_code == 422, kind
        error = error_of(response)
        assert fields_of(error["details"]) == [f"{kind}.tls"] and "plain text" in error["message"]
        body[kind]["tls"] = "ssl"
        response = kit.admin.post("/api/accounts", json=body)
        assert response.status_code == 201, response.get_json()
        created = response.get_json()
        # Switching that public endpoint to plain text is refused even with the password.
        response = kit.admin.patch(
            f"/api/accounts/{created['id']}", json={kind: {"tls": "none", "password": "pw"}}
        )
        assert response.status_code == 422 and fields_of(error_of(response)["details"]) == [f"{kind}.tls"]
        # So is moving a plain-text endpoint to a public host.
        response = kit.admin.patch(
            f"/api/accounts/{account['id']}", json={kind: {"host": public, "password": "pw"}}
        )
        assert response.status_code == 422 and fields_of(error_of(response)["details"]) == [f"{kind}.tls"]
        assert kit.admin.get(f"/api/accounts/{account['id']}").get_json()[kind]["host"] == "127.0.0.1"

    strict = Api(create_app(settings.model_copy(update={"allow_private_hosts": False})), kit.admin_key)
    body = account_body(dovecot, smtp, mailbox_user)
    body["imap"].update(host=public, tls="ssl")
    body["smtp"].update(host=public)
    response = strict.post("/api/accounts", json=body)
    assert response.status_code == 422 and fields_of(error_of(response)["details"]) == ["smtp.tls"]
    body["smtp"]["tls"] = "starttls"
    assert strict.post("/api/accounts", json=body).status_code == 201


def test_non_global_hosts_refused_on_create_and_patch(
    kit, dovecot, smtp, mailbox_user, account, settings
) -> None:
    from mailroom.app import create_app
    from tests.support import Api

    strict = Api(create_app(settings.model_copy(update={"allow_private_hosts": False})), kit.admin_key)
    for host in ("100.64.0.1", "198.18.0.1", "192.0.0.9", "::ffff:10.0.0.1", "64:ff9b::a00:1"):
        body = account_body(dovecot, smtp, mailbox_user)
        body["smtp"].update(host=host, tls="ssl")
        body["imap"].update(host="8.8.8.8", tls="ssl")
        response = strict.post("/api/accounts", json=body)
        assert response.status_code == 422, host
        assert fields_of(error_of(response)["details"]) == ["smtp.host"], host
    response = strict.patch(
        f"/api/accounts/{account['id']}",
        json={"imap": {"host": "100.64.0.1", "tls": "ssl", "password": "pw"}},
    )
    assert response.status_code == 422 and fields_of(error_of(response)["details"]) == ["imap.host"]
