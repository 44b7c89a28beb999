"""Sending as a client sees it: through the REST API, on the real send worker, to aiosmtpd,
with the Sent copy filed in Dovecot and listed by the API."""

from __future__ import annotations

import base64
import email
import time
import uuid
from datetime import UTC, datetime, timedelta
from email import policy
from typing import Any

import pytest
from sqlalchemy import func, select

from services.models import Message, OutboxEntry
from tests.support import error_of

pytestmark = pytest.mark.usefixtures("workers")


def send(kit, account: dict[str, Any], body: dict[str, Any], **kw: Any) -> Any:
    return kit.admin.post(f"/api/accounts/{account['id']}/send", json=body, **kw)


def sync(kit, account: dict[str, Any]) -> None:
    task = kit.admin.wait_task(kit.admin.post(f"/api/accounts/{account['id']}/sync").get_json()["task_id"])
    assert task["state"] == "succeeded", task


def delivered(smtp, message_id: str) -> list[dict[str, Any]]:
    return [m for m in smtp.received() if f"Message-ID: {message_id}".encode() in m["data"]]


def sent_copies(dovecot, user: tuple[str, str], message_id: str) -> list[tuple[bytes, list[bytes]]]:
    with dovecot.client(*user) as client:
        client.select_folder("Sent", readonly=True)
        uids = client.search(["HEADER", "Message-ID", message_id])
        fetched = client.fetch(uids, ["BODY.PEEK[]", "FLAGS"]) if uids else {}
        return [(data[b"BODY[]"], list(data[b"FLAGS"])) for data in fetched.values()]


def sent_rows(sessions, account_id: str, message_id: str) -> list[Message]:
    with sessions() as session:
        return list(
            session.scalars(
                select(Message).where(
                    Message.account_id == account_id, Message.message_id_header == message_id
                )
            )
        )


ATTACHMENT = bytes(range(256)) * 40


@pytest.mark.parametrize(
    "content",
    [
        {"text": "Hello,\n.\nA line with a lone dot above.\n"},
        {"text": "Plain part", "html": "<p>HTML <b>part</b> — ünïcode</p>"},
        {
            "text": "See the attachment.",
            "attachments": [{"filename": "data.bin", "content": base64.b64encode(ATTACHMENT).decode()}],
        },
    ],
    ids=["plain", "html+text", "attachment"],
)
def test_message_arrives_byte_exact_and_once_in_sent(
    kit, account, smtp, dovecot, mailbox_user, sessions, content, workers
) -> None:
    sync(kit, account)  # Mailroom knows the Sent folder: the copy is listed at once
    body = {
        "to": [{"email": "rcpt@example.test", "name": "Ré Cipient"}],
        "cc": ["cc@example.test"],
        "bcc": ["hidden@example.test"],
        "subject": "Grüße " + uuid.uuid4().hex[:6],
        "headers": {"X-Campaign": "spring"},
        **content,
    }
    response = send(kit, account, body)
    assert response.status_code == 202, response.get_json()
    accepted = response.get_json()
    task = kit.admin.wait_task(accepted["task_id"])
    assert task["state"] == "succeeded", workers["send"].log_text()[-3000:]
    message_id = accepted["message_id"]
    assert message_id.endswith("@example.test>")

    [arrived] = delivered(smtp, message_id)
    assert arrived["rcpt_tos"] == ["rcpt@example.test", "cc@example.test", "hidden@example.test"]
    assert arrived["mail_from"] == account["email"] and arrived["auth_user"] == "smtpuser"
    [(copy, flags)] = sent_copies(dovecot, mailbox_user, message_id)
    assert copy == arrived["data"]  # one build, the same bytes on the wire and in Sent
    assert b"\\Seen" in flags

    parsed = email.message_from_bytes(copy, policy=policy.default)
    assert parsed["From"] == f"Test mailbox <{account['email']}>"
    assert parsed["Subject"] == body["subject"] and parsed["X-Campaign"] == "spring"
    assert parsed["Bcc"] is None and b"hidden@example.test" not in copy
    assert parsed["Date"] is not None
    if "html" in content:
        html = parsed.get_body(("html",))
        assert html is not None and html.get_content().strip() == content["html"]
    if "attachments" in content:
        [part] = list(parsed.iter_attachments())
        assert part.get_filename() == "data.bin" and part.get_content() == ATTACHMENT
    else:
        plain = parsed.get_body(("plain",))
        assert plain is not None
        assert plain.get_content().replace("\r\n", "\n").strip() == content["text"].strip()

    result = task["result"]
    assert result["state"] == "sent" and result["refused"] == {}
    row_id = result["sent_copy"]["message_id"]
    assert row_id is not None
    listed = kit.admin.get(f"/api/accounts/{account['id']}/messages?folder=Sent").get_json()["items"]
    assert [m["id"] for m in listed if m["subject"] == body["subject"]] == [row_id]
    folders = kit.admin.get(f"/api/accounts/{account['id']}/folders").get_json()["items"]
    [sent_folder] = [f for f in folders if f["name"] == "Sent"]
    assert (sent_folder["message_count"], sent_folder["unread_count"]) == (1, 0)  # counted in at once
    sync(kit, account)  # the next sync matches the copy instead of storing it again
    assert [r.id for r in sent_rows(sessions, account["id"], message_id)] == [row_id]

    outbox = kit.admin.get(f"/api/accounts/{account['id']}/outbox/{accepted['outbox_id']}").get_json()
    assert outbox["state"] == "sent" and outbox["sent_copy"]["message_id"] == row_id


def test_idempotency_key_replays_the_first_task_and_refuses_another_body(kit, account, smtp) -> None:
    key = {"Idempotency-Key": "order-" + uuid.uuid4().hex}
    body = {"to": ["a@example.test"], "subject": "Once", "text": "only once", "save_sent": False}
    first = send(kit, account, body, headers=key)
    assert first.status_code == 202
    again = send(kit, account, body, headers=key)
    assert again.status_code == 200
    assert again.get_json()["task_id"] == first.get_json()["task_id"]
    assert again.get_json()["deduplicated"] is True
    kit.admin.wait_task(first.get_json()["task_id"])
    assert send(kit, account, body, headers=key).get_json()["task_id"] == first.get_json()["task_id"]

    other = send(kit, account, {**body, "text": "something else"}, headers=key)
    assert other.status_code == 409 and error_of(other)["code"] == "idempotency_key_reused"
    assert len(delivered(smtp, first.get_json()["message_id"])) == 1

    # Without the header, the same request again is a second message.
    one, two = send(kit, account, body), send(kit, account, body)
    assert one.get_json()["task_id"] != two.get_json()["task_id"]
    for response in (one, two):
        assert kit.admin.wait_task(response.get_json()["task_id"])["state"] == "succeeded"
        assert len(delivered(smtp, response.get_json()["message_id"])) == 1


def test_an_idempotency_key_is_per_tenant(kit, other_kit, account, dovecot, smtp, mailbox_user) -> None:
    from tests.conftest import account_body

    key = {"Idempotency-Key": "shared-" + uuid.uuid4().hex}
    body = {"to": ["a@example.test"], "text": "x", "save_sent": False}
    theirs = other_kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()
    mine = send(kit, account, body, headers=key)
    other = other_kit.admin.post(f"/api/accounts/{theirs['id']}/send", json=body, headers=key)
    assert mine.status_code == other.status_code == 202
    assert mine.get_json()["task_id"] != other.get_json()["task_id"]
    # Another tenant's account is a 404, with or without a key.
    assert send(other_kit, account, body).status_code == 404


def test_a_reused_key_names_its_task_only_to_who_may_see_it(kit, account, dovecot, smtp) -> None:
    """Keys are the tenant's; the 409 for a key taken names the first task only to a caller
    who may see that task (an admin, or the member who sent it), never to another member."""
    from tests.conftest import account_body

    name = "u" + uuid.uuid4().hex[:10]
    dovecot.add_user(name, "pw-" + name)
    created = kit.member.post("/api/accounts", json=account_body(dovecot, smtp, (name, "pw-" + name)))
    assert created.status_code == 201, created.get_json()
    members_send = f"/api/accounts/{created.get_json()['id']}/send"
    body = {"to": ["a@example.test"], "text": "x", "save_sent": False}
    tasks = []

    def taken(response: Any) -> dict[str, Any]:
        assert response.status_code == 409
        error = error_of(response)
        assert error["code"] == "idempotency_key_reused"
        return error

    # The admin's key, reused by the member on their own account: taken, no task named.
    key = {"Idempotency-Key": "admins-" + uuid.uuid4().hex}
    tasks.append(send(kit, account, body, headers=key).get_json()["task_id"])
    refused = kit.member.post(members_send, json=body, headers=key)
    assert taken(refused)["details"] is None
    assert tasks[-1] not in refused.get_data(as_text=True)

    # The member's key: the member and an admin of the tenant may see its task.
    key = {"Idempotency-Key": "members-" + uuid.uuid4().hex}
    tasks.append(kit.member.post(members_send, json=body, headers=key).get_json()["task_id"])
    other_body = {**body, "text": "y"}
    assert taken(kit.member.post(members_send, json=other_body, headers=key))["details"] == {
        "task_id": tasks[-1]
    }
    assert taken(send(kit, account, body, headers=key))["details"] == {"task_id": tasks[-1]}

    # The admin's send from the member's account: the same body again from the member is no
    # replay of a task the member cannot see.
    key = {"Idempotency-Key": "on-behalf-" + uuid.uuid4().hex}
    tasks.append(kit.admin.post(members_send, json=body, headers=key).get_json()["task_id"])
    refused = kit.member.post(members_send, json=body, headers=key)
    assert taken(refused)["details"] is None
    assert tasks[-1] not in refused.get_data(as_text=True)
    for task_id in tasks:
        assert kit.admin.wait_task(task_id)["state"] == "succeeded"


def test_a_member_sends_only_from_accounts_they_own(kit, account, sessions) -> None:
    """A member of the tenant cannot send from the admin's account (404, nothing queued);
    the admin can."""
    body = {"to": ["a@example.test"], "text": "x", "save_sent": False}
    refused = kit.member.post(f"/api/accounts/{account['id']}/send", json=body)
    assert refused.status_code == 404, refused.get_json()
    with sessions() as session:
        queued = select(func.count()).where(OutboxEntry.account_id == account["id"])
        assert session.scalar(queued) == 0
    assert send(kit, account, body).status_code == 202


@pytest.mark.parametrize(
    "change",
    [
        {"to": ["victim@example.test\r\nBcc: evil@example.test"]},
        {"to": [{"email": "a@example.test", "name": "A\r\nBcc: evil@example.test"}]},
        {"cc": ["a@example.test\n"]},
        {"subject": "Hi\r\nBcc: evil@example.test"},
        {"subject": "Hi\nX-Injected: 1"},
        {"headers": {"X-Tag": "a\r\nBcc: evil@example.test"}},
        {"headers": {"Bcc": "evil@example.test"}},
        {"headers": {"From": "ceo@example.test"}},
        {"headers": {"Content-Type": "text/html"}},
        {"headers": {"X-Tag\r\nBcc": "evil@example.test"}},
        {"reply_to": ["r@example.test\r\n"]},
        {"in_reply_to": "<a@b>\r\nBcc: evil@example.test"},
        {"attachments": [{"filename": "a.txt\r\nX-Evil: 1", "content": "QUJD"}]},
        {"attachments": [{"filename": "a.txt", "content": "not base64!"}]},
        {"to": ["not an address"]},
        {"to": [], "text": "no recipients"},
    ],
)
def test_header_injection_and_bad_fields_are_422_and_nothing_is_queued(
    kit, account, sessions, change
) -> None:
    body = {"to": ["a@example.test"], "subject": "s", "text": "t", **change}
    response = send(kit, account, body)
    assert response.status_code == 422, response.get_json()
    assert error_of(response)["code"] == "validation_error"
    with sessions() as session:
        assert session.scalar(select(func.count()).where(OutboxEntry.account_id == account["id"])) == 0


def test_4xx_is_retried_then_sent_once(kit, account, smtp) -> None:
    smtp.set_reject(451, "4.3.0 try again later", stage="data", times=1)
    try:
        response = send(kit, account, {"to": ["a@example.test"], "text": "retry me", "save_sent": False})
        task = kit.admin.wait_task(response.get_json()["task_id"])
    finally:
        smtp.clear_reject()
    assert task["state"] == "succeeded" and task["attempts"] == 2, task
    assert len(delivered(smtp, response.get_json()["message_id"])) == 1


def test_5xx_fails_at_once_with_the_server_reply(kit, account, smtp) -> None:
    smtp.set_reject(554, "5.7.1 message refused by policy", stage="data", times=1)
    try:
        response = send(kit, account, {"to": ["a@example.test"], "text": "refused", "save_sent": False})
        task = kit.admin.wait_task(response.get_json()["task_id"])
    finally:
        smtp.clear_reject()
    assert task["state"] == "failed" and task["attempts"] == 1, task
    assert task["error"]["code"] == "mail_rejected"
    assert "554" in task["error"]["message"] and "refused by policy" in task["error"]["message"]
    outbox = kit.admin.get(f"/api/accounts/{account['id']}/outbox/{response.get_json()['outbox_id']}")
    assert outbox.get_json()["state"] == "failed"


def test_recipients_refused_while_others_were_accepted_are_listed(kit, account, smtp) -> None:
    smtp.set_reject(550, "5.1.1 no such user", stage="rcpt", times=1)  # the first RCPT only
    try:
        body = {"to": ["gone@example.test", "here@example.test"], "text": "partial", "save_sent": False}
        response = send(kit, account, body)
        task = kit.admin.wait_task(response.get_json()["task_id"])
    finally:
        smtp.clear_reject()
    assert task["state"] == "succeeded", task
    assert task["result"]["refused"] == {"gone@example.test": "550 5.1.1 no such user"}
    assert task["result"]["accepted"] == ["here@example.test"]
    [arrived] = delivered(smtp, response.get_json()["message_id"])
    assert arrived["rcpt_tos"] == ["here@example.test"]


def test_bad_smtp_login_fails_permanently(kit, account, smtp) -> None:
    patch = {"smtp": {"username": "smtpuser", "password": "wrong"}}
    assert kit.admin.patch(f"/api/accounts/{account['id']}", json=patch).status_code == 200
    response = send(kit, account, {"to": ["a@example.test"], "text": "x", "save_sent": False})
    task = kit.admin.wait_task(response.get_json()["task_id"])
    assert task["state"] == "failed" and task["attempts"] == 1
    assert task["error"]["code"] == "mail_auth_failed"


def test_size_limits_apply_to_the_send_route_alone(kit, account, smtp, base_values) -> None:
    from mailroom.app import create_app
    from services.settings import load_settings
    from tests.support import Api

    big = base64.b64encode(b"\x01" * (1536 * 1024)).decode()  # 1.5 MiB: over every other route's limit
    body = {"to": ["a@example.test"], "text": "big", "save_sent": False}
    response = send(kit, account, {**body, "attachments": [{"filename": "big.bin", "content": big}]})
    assert response.status_code == 202, response.get_json()
    assert kit.admin.wait_task(response.get_json()["task_id"])["state"] == "succeeded"
    [arrived] = delivered(smtp, response.get_json()["message_id"])
    assert len(arrived["data"]) > 1536 * 1024

    other = kit.admin.post(f"/api/accounts/{account['id']}/sync", json={"folders": ["x" * 900] * 1500})
    assert other.status_code == 413 and error_of(other)["code"] == "payload_too_large"

    small = Api(create_app(load_settings(**base_values, send_max_bytes=4096)), kit.admin_key)
    over = small.post(
        f"/api/accounts/{account['id']}/send",
        json={
            **body,
            "attachments": [{"filename": "a.bin", "content": base64.b64encode(b"x" * 5000).decode()}],
        },
    )
    assert over.status_code == 413, over.get_json()
    assert error_of(over)["details"] == {"size": 5003, "limit": 4096}
    far_over = small.post(f"/api/accounts/{account['id']}/send", json={**body, "text": "y" * 2_000_000})
    assert far_over.status_code == 413 and error_of(far_over)["code"] == "payload_too_large"


def _outbox(kit, account: dict[str, Any], query: str = "") -> list[dict[str, Any]]:
    response = kit.admin.get(f"/api/accounts/{account['id']}/outbox{query}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]  # type: ignore[no-any-return]


def test_scheduled_send_waits_is_listed_and_goes_out_at_its_time(kit, account, smtp) -> None:
    send_at = datetime.now(UTC) + timedelta(seconds=3)
    body = {"to": ["a@example.test"], "text": "later", "save_sent": False, "send_at": send_at.isoformat()}
    response = send(kit, account, body)
    assert response.status_code == 202, response.get_json()
    accepted = response.get_json()
    [waiting] = _outbox(kit, account, "?state=scheduled")
    assert waiting["id"] == accepted["outbox_id"] and waiting["send_at"] is not None
    assert kit.admin.task(accepted["task_id"])["state"] == "queued"
    task = kit.admin.wait_task(accepted["task_id"], timeout=30)
    assert task["state"] == "succeeded", task
    [arrived] = delivered(smtp, accepted["message_id"])
    assert arrived["time"] >= send_at.timestamp()
    assert arrived["time"] - send_at.timestamp() < 10  # "within a few seconds", with room for a busy CI
    assert _outbox(kit, account, "?state=scheduled") == []


def test_scheduled_send_can_be_cancelled_before_it_starts(kit, account, smtp) -> None:
    send_at = datetime.now(UTC) + timedelta(seconds=4)
    body = {"to": ["a@example.test"], "text": "never", "save_sent": False, "send_at": send_at.isoformat()}
    accepted = send(kit, account, body).get_json()
    cancel = kit.admin.post(f"/api/tasks/{accepted['task_id']}/cancel")
    assert cancel.status_code == 202 and cancel.get_json()["state"] == "cancelled"
    [row] = _outbox(kit, account, "?state=cancelled")
    assert row["id"] == accepted["outbox_id"]
    assert _outbox(kit, account, "?state=scheduled") == []
    time.sleep((send_at - datetime.now(UTC)).total_seconds() + 3)
    assert delivered(smtp, accepted["message_id"]) == []
    assert kit.admin.task(accepted["task_id"])["state"] == "cancelled"


def test_a_scheduled_send_whose_account_was_deleted_fails_not_found(kit, account, smtp) -> None:
    """Deleting the account leaves its queued tasks' records (account_id becomes null) and
    deletes the outbox row; when the send's time comes the task ends not_found, saying the
    account was deleted, and nothing is sent."""
    send_at = datetime.now(UTC) + timedelta(seconds=3)
    body = {"to": ["a@example.test"], "text": "orphan", "save_sent": False, "send_at": send_at.isoformat()}
    accepted = send(kit, account, body).get_json()
    assert kit.admin.delete(f"/api/accounts/{account['id']}").status_code == 204
    task = kit.admin.wait_task(accepted["task_id"], timeout=30)
    assert task["state"] == "failed" and task["account_id"] is None, task
    assert task["error"]["code"] == "not_found", task["error"]
    assert "account was deleted" in task["error"]["message"]
    assert delivered(smtp, accepted["message_id"]) == []


def test_send_at_too_far_ahead_or_without_a_zone_is_422(kit, account) -> None:
    far = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    for send_at in (far, "2030-01-01T09:00:00"):
        response = send(kit, account, {"to": ["a@example.test"], "text": "x", "send_at": send_at})
        assert response.status_code == 422, response.get_json()


def test_the_smtp_connection_is_reused_for_the_accounts_next_messages(kit, account, smtp) -> None:
    body = {"to": ["a@example.test"], "text": "reuse", "save_sent": False}
    peers = []
    for _ in range(3):
        accepted = send(kit, account, body).get_json()
        assert kit.admin.wait_task(accepted["task_id"])["state"] == "succeeded"
        peers.append(tuple(delivered(smtp, accepted["message_id"])[0]["peer"]))
    assert len(set(peers)) == 1, peers  # one client port: one connection, one login


def test_4xx_until_retries_run_out_fails_and_the_outbox_says_so(kit, account, smtp) -> None:
    smtp.set_reject(451, "4.3.0 still busy", stage="mail")
    try:
        accepted = send(kit, account, {"to": ["a@example.test"], "text": "x", "save_sent": False}).get_json()
        task = kit.admin.wait_task(accepted["task_id"], timeout=60)
    finally:
        smtp.clear_reject()
    assert task["state"] == "failed" and task["attempts"] == 4, task
    assert "451" in task["error"]["message"]
    assert delivered(smtp, accepted["message_id"]) == []
    [row] = _outbox(kit, account, "?state=failed")
    assert row["id"] == accepted["outbox_id"]


def test_the_accounts_save_sent_copy_and_the_per_message_override(
    kit, dovecot, smtp, mailbox_user, workers
) -> None:
    from tests.conftest import account_body

    created = kit.admin.post(
        "/api/accounts", json={**account_body(dovecot, smtp, mailbox_user), "save_sent_copy": False}
    )
    assert created.status_code == 201, created.get_json()
    account = created.get_json()
    assert account["save_sent_copy"] is False

    def copies_after(body: dict[str, Any]) -> int:
        accepted = send(kit, account, {"to": ["a@example.test"], "text": "copy?", **body}).get_json()
        task = kit.admin.wait_task(accepted["task_id"])
        assert task["state"] == "succeeded", (task, workers["send"].log_text()[-3000:])
        assert len(delivered(smtp, accepted["message_id"])) == 1
        found = len(sent_copies(dovecot, mailbox_user, accepted["message_id"]))
        assert (task["result"]["sent_copy"] is not None) == (found == 1)
        return found

    assert copies_after({}) == 0  # the account's setting: the server files sent mail itself
    assert copies_after({"save_sent": None}) == 0
    assert copies_after({"save_sent": True}) == 1  # this message asks for a copy

    patched = kit.admin.patch(f"/api/accounts/{account['id']}", json={"save_sent_copy": True})
    assert patched.status_code == 200 and patched.get_json()["save_sent_copy"] is True
    assert kit.admin.get(f"/api/accounts/{account['id']}").get_json()["save_sent_copy"] is True
    assert copies_after({}) == 1
    assert copies_after({"save_sent": False}) == 0
    # A PATCH without the field leaves it alone; an account made without it files copies.
    assert kit.admin.patch(f"/api/accounts/{account['id']}", json={"name": "x"}).get_json()["save_sent_copy"]
    other = kit.admin.post("/api/accounts", json=account_body(dovecot, smtp, mailbox_user)).get_json()
    assert other["save_sent_copy"] is True
    bad = kit.admin.patch(f"/api/accounts/{account['id']}", json={"save_sent_copy": "sometimes"})
    assert bad.status_code == 422


def test_a_send_the_broker_could_not_take_frees_its_idempotency_key(kit, account, base_values) -> None:
    from mailroom.app import create_app
    from services.settings import load_settings
    from tests.servers.redis import RedisServer
    from tests.support import Api

    broker = RedisServer()
    broker.start()
    try:
        api = Api(create_app(load_settings(**{**base_values, "broker_url": broker.url})), kit.admin_key)
        key = {"Idempotency-Key": "outage-" + uuid.uuid4().hex}
        body = {"to": ["a@example.test"], "text": "after the outage", "save_sent": False}
        broker.stop()
        down = api.post(f"/api/accounts/{account['id']}/send", json=body, headers=key)
        assert down.status_code == 503, down.get_json()
        [failed] = _outbox(kit, account)
        assert failed["state"] == "failed" and "nothing was sent" in failed["error"]
        broker.start()
        again = api.post(f"/api/accounts/{account['id']}/send", json=body, headers=key)
        assert again.status_code == 202, again.get_json()
        assert again.get_json()["task_id"] != error_of(down)["details"]["task_id"]
        replay = api.post(f"/api/accounts/{account['id']}/send", json=body, headers=key)
        assert replay.status_code == 200 and replay.get_json()["task_id"] == again.get_json()["task_id"]
    finally:
        broker.stop()
