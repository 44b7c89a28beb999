"""Building the message once, in the API: the bytes made here are exactly the bytes the SMTP
server receives and the bytes filed in \\Sent.

Promises: From is the account's address and name; Message-ID is new and on the account's
domain; Date is now (UTC); Bcc never appears in the message; lines end in CRLF and header
fields are folded and RFC 2047-encoded by the ``SMTP`` policy, so what goes over the wire
needs no further rewriting by anyone."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime

from services.send.request import Address, SendRequest, as_address

POLICY = policy.SMTP


@dataclass(frozen=True)
class BuiltMessage:
    raw: bytes
    message_id: str
    envelope_from: str
    recipients: list[str]


def _header_address(value: Address) -> HeaderAddress:
    local, _, domain = value.email.rpartition("@")
    return HeaderAddress(display_name=value.name, username=local, domain=domain)


def new_message_id(sender: str) -> str:
    """A Message-ID no other message has: 128 random bits on the sender's domain."""
    domain = sender.rpartition("@")[2] or "mailroom.invalid"
    return f"<{uuid.uuid4().hex}@{domain}>"


def build_message(request: SendRequest, *, sender: str, sender_name: str) -> BuiltMessage:
    """The message for ``request`` from the account ``sender`` (named ``sender_name``)."""
    message = EmailMessage(policy=POLICY)
    message_id = new_message_id(sender)
    message["From"] = _header_address(Address(email=sender, name=sender_name))
    if request.to:
        message["To"] = [_header_address(as_address(a)) for a in request.to]
    if request.cc:
        message["Cc"] = [_header_address(as_address(a)) for a in request.cc]
    if request.reply_to:
        message["Reply-To"] = [_header_address(as_address(a)) for a in request.reply_to]
    message["Subject"] = request.subject
    message["Date"] = format_datetime(datetime.now(UTC).replace(microsecond=0))
    message["Message-ID"] = message_id
    if request.in_reply_to:
        message["In-Reply-To"] = request.in_reply_to
    references = list(request.references)
    if request.in_reply_to and request.in_reply_to not in references:
        references.append(request.in_reply_to)  # a reply's References end with its parent
    if references:
        message["References"] = " ".join(references)
    for name, value in request.headers.items():
        message[name] = value
    _set_bodies(message, request)
    raw = message.as_bytes(policy=POLICY)
    return BuiltMessage(raw=raw, message_id=message_id, envelope_from=sender, recipients=request.envelope())


def _set_bodies(message: EmailMessage, request: SendRequest) -> None:
    """text/plain, text/html, or multipart/alternative of both; inline attachments make the
    HTML a multipart/related of the HTML and those parts (RFC 2387, so its ``cid:`` URLs
    resolve, RFC 2392); other attachments make the whole a multipart/mixed."""
    if request.text is not None:
        message.set_content(request.text, subtype="plain", charset="utf-8")
        if request.html is not None:
            message.add_alternative(request.html, subtype="html", charset="utf-8")
    else:
        message.set_content(request.html or "", subtype="html", charset="utf-8")
    inline = [item for item in request.attachments if item.inline]
    if inline:
        html = message.get_body(("html",))  # SendRequest refuses inline parts without html
        assert isinstance(html, EmailMessage)
        for item in inline:
            maintype, _, subtype = item.content_type.partition("/")
            html.add_related(
                item.data,
                maintype=maintype,
                subtype=subtype,
                disposition="inline",
                filename=item.filename,
                cid=f"<{item.content_id}>",
            )
        html.set_param("type", "text/html")  # the root part's type, which RFC 2387 requires
    for item in request.attachments:
        if not item.inline:
            maintype, _, subtype = item.content_type.partition("/")
            message.add_attachment(item.data, maintype=maintype, subtype=subtype, filename=item.filename)
