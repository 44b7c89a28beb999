"""Building the message once, in the API: the bytes made here are exactly the bytes the SMTP
server receives and the bytes filed in \\Sent.

Promises: From is the account's address and name; Message-ID is new and on the account's
domain; Date is now (UTC); Bcc never appears in the message; lines end in CRLF and header
fields are folded and RFC 2047-encoded by the ``SMTP`` policy, so what goes over the wire
needs no further rewriting by anyone.

The policy parses every field it is given into a tree and folds that tree again, which was
most of the build's CPU. A field whose line is short printable ASCII in single spaces
(no ``=?``) comes out of that unchanged, ``Name: value`` CRLF: such fields of the header
block (From .. the client's headers) are written directly; any other (non-ASCII, long,
empty, ...) is folded by the policy, field by field, exactly as the whole message's
generator folds it. The MIME structure (content headers, bodies, parts, boundaries) is
the email package's, as before. The bytes are the same as an ``EmailMessage`` holding every
field gives (tests/test_send_mime.py compares them)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime

from services.send.request import Address, SendRequest, as_address

POLICY = policy.SMTP
#: A field value the policy writes back as is when ``Name: value`` fits one line: printable
#: ASCII words in single spaces (the policy keeps an ``=?`` only after decoding it).
_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*")
#: The policy folds lines longer than this (without a limit, every field goes to the policy).
_MAX_LINE = POLICY.max_line_length or 0


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


def _addresses(values: list[Address | str]) -> str:
    """An address list as the policy's header factory writes it before parsing it."""
    return ", ".join(str(_header_address(as_address(a))) for a in values)


def header_fields(
    request: SendRequest, *, sender: str, sender_name: str, message_id: str
) -> list[tuple[str, str]]:
    """The header block above the MIME fields, in order: From .. References, then the
    client's own headers."""
    fields = [("From", str(_header_address(Address(email=sender, name=sender_name))))]
    if request.to:
        fields.append(("To", _addresses(request.to)))
    if request.cc:
        fields.append(("Cc", _addresses(request.cc)))
    if request.reply_to:
        fields.append(("Reply-To", _addresses(request.reply_to)))
    fields.append(("Subject", request.subject))
    fields.append(("Date", format_datetime(datetime.now(UTC).replace(microsecond=0))))
    fields.append(("Message-ID", message_id))
    if request.in_reply_to:
        fields.append(("In-Reply-To", request.in_reply_to))
    references = list(request.references)
    if request.in_reply_to and request.in_reply_to not in references:
        references.append(request.in_reply_to)  # a reply's References end with its parent
    if references:
        fields.append(("References", " ".join(references)))
    fields.extend(request.headers.items())
    return fields


def fold_field(name: str, value: str) -> bytes:
    """``name: value`` as the SMTP policy writes it in a message (folded, RFC 2047-encoded,
    CRLF-terminated)."""
    line = f"{name}: {value}"
    if len(line) <= _MAX_LINE and "=?" not in value and _PLAIN.fullmatch(value):
        return line.encode("ascii") + b"\r\n"
    return POLICY.fold_binary(*POLICY.header_store_parse(name, value))


def build_message(request: SendRequest, *, sender: str, sender_name: str) -> BuiltMessage:
    """The message for ``request`` from the account ``sender`` (named ``sender_name``)."""
    message_id = new_message_id(sender)
    fields = header_fields(request, sender=sender, sender_name=sender_name, message_id=message_id)
    # The MIME part: MIME-Version and the content fields, then the bodies; in a message that
    # held the fields above too, they would come after them, as here.
    mime = EmailMessage(policy=POLICY)
    _set_bodies(mime, request)
    raw = b"".join(fold_field(name, value) for name, value in fields) + mime.as_bytes(policy=POLICY)
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
