"""Inline (cid:) attachments on send: through the REST API and the real send worker, the
message reaches aiosmtpd with the HTML in a multipart/related beside its inline parts, and
the Sent copy in Dovecot is the same bytes."""

from __future__ import annotations

import base64
import email
import uuid
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select

from services.models import OutboxEntry
from tests.support import error_of
from tests.test_send import delivered, send, sent_copies

pytestmark = pytest.mark.usefixtures("workers")

LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
ICON = b"GIF89a" + bytes(range(255, -1, -1)) * 4
REPORT = b"%PDF-1.4 report " * 64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parts(message: EmailMessage) -> list[str]:
    """Every part's content type, depth first."""
    return [part.get_content_type() for part in message.walk()]


def test_inline_parts_arrive_in_multipart_related_and_sent_copy_is_identical(
    kit, account, smtp, dovecot, mailbox_user, workers
) -> None:
    html = '<p>Hi <img src="cid:logo.1@example.test"> and <img src="cid:icon"></p>'
    body = {
        "to": ["rcpt@example.test"],
        "subject": "Inline " + uuid.uuid4().hex[:6],
        "text": "Hi (your client shows no images)",
        "html": html,
        "attachments": [
            {
                "filename": "logo.png",
                "content_type": "image/png",
                "content": b64(LOGO),
                "inline": True,
                "content_id": "logo.1@example.test",
            },
            {"filename": "report.pdf", "content_type": "application/pdf", "content": b64(REPORT)},
            {
                "filename": "icon.gif",
                "content_type": "image/gif",
                "content": b64(ICON),
                "inline": True,
                "content_id": "icon",
            },
        ],
    }
    response = send(kit, account, body)
    assert response.status_code == 202, response.get_json()
    task = kit.admin.wait_task(response.get_json()["task_id"])
    assert task["state"] == "succeeded", workers["send"].log_text()[-3000:]
    message_id = response.get_json()["message_id"]

    [arrived] = delivered(smtp, message_id)
    [(copy, _flags)] = sent_copies(dovecot, mailbox_user, message_id)
    assert copy == arrived["data"]  # the same bytes on the wire and in Sent

    parsed = email.message_from_bytes(arrived["data"], policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    # mixed [ alternative [ plain, related [ html, png, gif ] ], pdf ]
    assert parts(parsed) == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "image/gif",
        "application/pdf",
    ]
    _, alternative, _, related, *_ = parsed.walk()
    assert related.get_param("type") == "text/html"
    root, logo, icon = related.iter_parts()
    assert root.get_content().strip() == html  # the html references both parts by cid:
    for part, cid, filename, data in (
        (logo, "logo.1@example.test", "logo.png", LOGO),
        (icon, "icon", "icon.gif", ICON),
    ):
        assert part["Content-ID"] == f"<{cid}>" and f"cid:{cid}" in root.get_content()
        assert part.get_content_disposition() == "inline" and part.get_filename() == filename
        assert part.get_content() == data
    # A client's get_body prefers the HTML, and only the PDF is listed as an attachment.
    shown = parsed.get_body(("html",))
    assert shown is not None and shown.get_content().strip() == html
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "report.pdf" and attachment.get_content() == REPORT
    assert alternative.get_content_type() == "multipart/alternative"


def test_html_only_with_inline_part_is_multipart_related(kit, account, smtp, workers) -> None:
    body = {
        "to": ["rcpt@example.test"],
        "html": '<img src="cid:logo">',
        "save_sent": False,
        "attachments": [
            {
                "filename": "logo.png",
                "content_type": "image/png",
                "content": b64(LOGO),
                "inline": True,
                "content_id": "logo",
            }
        ],
    }
    response = send(kit, account, body)
    assert response.status_code == 202, response.get_json()
    assert kit.admin.wait_task(response.get_json()["task_id"])["state"] == "succeeded"
    [arrived] = delivered(smtp, response.get_json()["message_id"])
    parsed = email.message_from_bytes(arrived["data"], policy=policy.default)
    assert parts(parsed) == ["multipart/related", "text/html", "image/png"]
    assert parsed.get_param("type") == "text/html"
    [_, logo] = parsed.iter_parts()
    assert logo["Content-ID"] == "<logo>" and logo.get_content() == LOGO


INLINE = {"filename": "a.png", "content_type": "image/png", "content": "QUJD", "inline": True}


@pytest.mark.parametrize(
    "change",
    [
        {"attachments": [{**INLINE, "content_id": "a\r\nBcc: evil@example.test"}]},
        {"attachments": [{**INLINE, "content_id": "a\nX-Evil: 1"}]},
        {"attachments": [{**INLINE, "content_id": "<a@b>"}]},
        {"attachments": [{**INLINE, "content_id": "a b"}]},
        {"attachments": [{**INLINE, "content_id": "a@b@c"}]},
        {"attachments": [{**INLINE, "content_id": ""}]},
        {"attachments": [{**INLINE, "content_id": "x" * 251}]},
        {"attachments": [INLINE]},  # inline without a content_id
        {"attachments": [{**INLINE, "inline": False, "content_id": "a"}]},  # content_id, not inline
        {"attachments": [{**INLINE, "content_id": "a"}, {**INLINE, "content_id": "a"}]},
        {"html": None, "attachments": [{**INLINE, "content_id": "a"}]},  # nothing to show it in
    ],
    ids=[
        "crlf",
        "lf",
        "angle-brackets",
        "space",
        "two-at",
        "empty",
        "too-long",
        "no-content-id",
        "not-inline",
        "duplicate",
        "no-html",
    ],
)
def test_bad_inline_attachments_are_422_and_nothing_is_queued(kit, account, sessions, change) -> None:
    body: dict[str, Any] = {"to": ["a@example.test"], "text": "t", "html": '<img src="cid:a">', **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = send(kit, account, body)
    assert response.status_code == 422, response.get_json()
    error = error_of(response)
    assert error["code"] == "validation_error" and error["details"], error
    with sessions() as session:
        assert session.scalar(select(func.count()).where(OutboxEntry.account_id == account["id"])) == 0


def test_longest_content_id_is_accepted(kit, account) -> None:
    cid = "x" * 125 + "@" + "y" * 124
    body = {
        "to": ["a@example.test"],
        "html": f'<img src="cid:{cid}">',
        "save_sent": False,
        "attachments": [{**INLINE, "content_id": cid}],
    }
    response = send(kit, account, body)
    assert response.status_code == 202, response.get_json()
    assert kit.admin.wait_task(response.get_json()["task_id"])["state"] == "succeeded"
