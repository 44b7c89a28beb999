"""Ordinary mail as today's clients send it: short notes, photo-only messages from phones, an
empty message, a one-line "see attached" with a PDF. Shared by the scorer's tests."""

from __future__ import annotations

import base64

# The start of a real JPEG (SOI, JFIF APP0) followed by filler bytes: the scorer never
# decodes the image, only sees its part.
_JPEG = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00H\x00H\x00\x00" + bytes(range(256)) * 40 + b"\xff\xd9"
)
_PDF = (
    b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    + b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n" * 30
    + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
)


def _b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii").replace("\n", "\r\n")


def _join(head: list[str], body: str) -> bytes:
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode("utf-8")


def empty_message() -> bytes:
    """No subject, no text: sent by mistake, or a calendar client's bare reply."""
    return _join(
        [
            "From: Maria Keller <maria.keller@posteo.de>",
            "To: Tom Weber <tom.weber@example.com>",
            "Subject: ",
            "Date: Tue, 01 Dec 2026 08:12:40 +0100",
            "Message-ID: <5f0c2a9e-1b7d-4c55-9f3e-7d1b2c9a0e11@posteo.de>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=UTF-8; format=flowed",
            "Content-Transfer-Encoding: 7bit",
        ],
        "",
    )


def iphone_photo() -> bytes:
    """Apple Mail on an iPhone: multipart/mixed holding one JPEG, no text part at all."""
    return _join(
        [
            "Content-Type: multipart/mixed; boundary=Apple-Mail-6B1E3A52-88C4-4F0B-9A61-2D3C4E5F6A7B",
            "Content-Transfer-Encoding: 7bit",
            "From: Julia Novak <julia.novak@icloud.com>",
            "Mime-Version: 1.0 (1.0)",
            "Date: Tue, 1 Dec 2026 18:41:07 +0100",
            "Message-Id: <A3F1C2D4-7E8B-4C9A-B1D2-E3F4A5B6C7D8@icloud.com>",
            "To: Daniel Novak <daniel.novak@example.com>",
            "X-Mailer: iPhone Mail (22B91)",
        ],
        "\r\n--Apple-Mail-6B1E3A52-88C4-4F0B-9A61-2D3C4E5F6A7B\r\n"
        "Content-Type: image/jpeg; name=IMG_4127.jpeg;\r\n"
        " x-apple-part-url=5E1B2C3D-4A5B-6C7D-8E9F-0A1B2C3D4E5F\r\n"
        "Content-Disposition: inline; filename=IMG_4127.jpeg\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + _b64(_JPEG)
        + "\r\n--Apple-Mail-6B1E3A52-88C4-4F0B-9A61-2D3C4E5F6A7B--\r\n",
    )


def android_photo() -> bytes:
    """Gmail on Android: an empty text and HTML alternative beside one JPEG attachment."""
    return _join(
        [
            "MIME-Version: 1.0",
            "From: Sam Carter <sam.carter1987@gmail.com>",
            "Date: Tue, 1 Dec 2026 12:03:55 -0500",
            "Message-ID: <CAH7x9qK2vLr8mT3nPq0sW4uYb6eZ1aD5fG7hJ9kL2mN4pQ6rS@mail.gmail.com>",
            "Subject: ",
            "To: Alex Carter <alex.carter@example.com>",
            'Content-Type: multipart/mixed; boundary="000000000000a1b2c3060b5f9e2d"',
        ],
        "--000000000000a1b2c3060b5f9e2d\r\n"
        'Content-Type: multipart/alternative; boundary="000000000000a1b2c2060b5f9e2b"\r\n\r\n'
        "--000000000000a1b2c2060b5f9e2b\r\n"
        'Content-Type: text/plain; charset="UTF-8"\r\n\r\n\r\n'
        "--000000000000a1b2c2060b5f9e2b\r\n"
        'Content-Type: text/html; charset="UTF-8"\r\n\r\n<div dir="auto"></div>\r\n\r\n'
        "--000000000000a1b2c2060b5f9e2b--\r\n"
        "--000000000000a1b2c3060b5f9e2d\r\n"
        'Content-Type: image/jpeg; name="PXL_20261201_170312345.jpg"\r\n'
        'Content-Disposition: attachment; filename="PXL_20261201_170312345.jpg"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "X-Attachment-Id: f_lm3k2j1h0\r\n"
        "Content-ID: <f_lm3k2j1h0>\r\n\r\n" + _b64(_JPEG) + "\r\n--000000000000a1b2c3060b5f9e2d--\r\n",
    )


def see_attached_pdf() -> bytes:
    """One line of text and a PDF, from Outlook."""
    return _join(
        [
            "From: Priya Shah <priya.shah@northwind-consulting.co.uk>",
            "To: Mark Evans <mark.evans@example.com>",
            "Subject: Q3 report",
            "Date: Tue, 1 Dec 2026 14:22:10 +0000",
            "Message-ID: <AM9PR04MB8211C3D2E1F0A9B8C7D6E5F4A3B2C@AM9PR04MB8211.eurprd04.prod.outlook.com>",
            "Accept-Language: en-GB, en-US",
            "Content-Language: en-GB",
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="_004_AM9PR04MB8211_"',
        ],
        "--_004_AM9PR04MB8211_\r\n"
        'Content-Type: text/plain; charset="us-ascii"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        "See attached.\r\n\r\nPriya\r\n\r\n"
        "--_004_AM9PR04MB8211_\r\n"
        'Content-Type: application/pdf; name="Q3 report.pdf"\r\n'
        "Content-Description: Q3 report.pdf\r\n"
        'Content-Disposition: attachment; filename="Q3 report.pdf"; size=2048\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n" + _b64(_PDF) + "\r\n--_004_AM9PR04MB8211_--\r\n",
    )


def short_note(
    body: str,
    *,
    subject: str,
    sender: str = "Ben Miller <ben.miller@fastmail.com>",
    to: str = "Anna Schmidt <anna.schmidt@example.com>",
    reply_to_id: str | None = None,
) -> bytes:
    head = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        "Date: Tue, 01 Dec 2026 09:30:00 +0100",
        "Message-ID: <8d3e6f21-4b7a-4e2c-9d1f-0a6b5c4d3e2f@fastmail.com>",
    ]
    if reply_to_id:
        head += [f"In-Reply-To: {reply_to_id}", f"References: {reply_to_id}"]
    head += [
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return _join(head, body.replace("\n", "\r\n"))


# Short notes people send every day.
SHORT_NOTES: dict[str, bytes] = {
    "meeting_moved": short_note(
        "Hello Anna,\n\nthe meeting moved to Thursday at ten.\n\nBen\n", subject="Meeting"
    ),
    "running_late": short_note(
        "Running about 10 minutes late, start without me.\n\nSent from my iPhone\n", subject="Running late"
    ),
    "lunch": short_note("Are we still on for lunch tomorrow at 12:30?\n\nBen\n", subject="Lunch tomorrow?"),
    "thanks": short_note(
        "Thanks, got it. I'll have a look tonight.\n\nBen\n",
        subject="Re: Slides for Friday",
        reply_to_id="<c1d2e3f4@example.com>",
    ),
    "call_back": short_note(
        "Hi Anna, could you call me back when you have a minute? Nothing urgent.\n\nBen\n",
        subject="Quick question",
    ),
    "dinner": short_note(
        "Dinner at ours on Saturday? Kids are welcome, we'll do pasta.\n\nLove, Ben\n",
        subject="Saturday",
    ),
}
