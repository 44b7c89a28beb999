"""The body of ``POST /api/accounts/{id}/send``, checked completely before anything is queued.

What it promises: every address, name, subject, header value, Message-ID reference and
attachment field that reaches the MIME builder is free of CR, LF and other control
characters (a header injection is a 422, never a second header), custom headers are only
those of :data:`ALLOWED_HEADERS` or ``X-…``, attachments are valid base64, and an inline
attachment's ``content_id`` is one header token (no CR, LF, spaces or angle brackets) of at
most :data:`MAX_CONTENT_ID` characters, unique in the message, beside an html body.

Attachments travel as base64 inside the JSON body rather than as ``multipart/form-data``:
the whole request is then one document that the same model validates, that the OpenAPI
contract describes, that the input guard checks, and whose hash makes ``Idempotency-Key``
comparisons exact (same key, same bytes). The cost, a third more bytes on the wire, is
why the send route's body limit is about 4/3 of the decoded limit (services.send.limits).
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    model_validator,
)

from services.task_inputs import EmailAddress

#: Control characters a header value or display name must not hold (TAB is allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MSG_ID = re.compile(r"^<[^<>\s]{1,990}>$")
_HEADER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,75}$")
#: A Content-ID as the client gives it, without angle brackets: RFC 5322 atext, dots and
#: one "@" at most, so it is one token in the header and in a ``cid:`` URL alike.
_CONTENT_ID = r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(@[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)?$"
#: The longest Content-ID accepted (without the angle brackets Mailroom adds).
MAX_CONTENT_ID = 250

#: Headers a client may set besides ``X-…`` ones: none of them changes who the message is
#: from, who receives it, how it is parsed, or how it is threaded (those have own fields).
ALLOWED_HEADERS = frozenset(
    {
        "list-unsubscribe",
        "list-unsubscribe-post",
        "list-id",
        "auto-submitted",
        "importance",
        "priority",
        "sensitivity",
        "organization",
        "keywords",
        "comments",
        "precedence",
    }
)
#: ``X-`` headers that say something about the sending system, not the message: refused.
_DENIED_X = frozenset({"x-mailer-daemon", "x-original-to", "x-forwarded-to", "x-forwarded-for"})


def _header_text(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain CR, LF or other control characters")
    return value


HeaderText = Annotated[str, AfterValidator(_header_text)]


def _message_id(value: str) -> str:
    value = value.strip()
    if not _MSG_ID.match(value):
        raise ValueError("must be a Message-ID in angle brackets, e.g. <abc@example.com>")
    return value


MessageIdRef = Annotated[str, AfterValidator(_message_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _no_control(value: object) -> object:
    # Checked before the address pattern, which strips surrounding whitespace: a trailing
    # CR LF must be refused, not quietly removed.
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("must not contain CR, LF or other control characters")
    return value


CheckedEmail = Annotated[EmailAddress, BeforeValidator(_no_control)]


class Address(_Strict):
    email: CheckedEmail
    name: HeaderText = Field(default="", max_length=200)


#: ``"a@b.example"`` or ``{"email": "a@b.example", "name": "A. B."}``.
AddressIn = Address | CheckedEmail


def as_address(value: Address | str) -> Address:
    return value if isinstance(value, Address) else Address(email=value)


class Attachment(_Strict):
    filename: HeaderText = Field(min_length=1, max_length=255)
    content_type: str = Field(
        default="application/octet-stream", pattern=r"^[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}$"
    )
    content: str = Field(description="The file's bytes, base64 (RFC 4648, standard alphabet).")
    inline: StrictBool = Field(
        default=False,
        description="Shown inside the HTML body rather than as an attachment: the part goes into a "
        "multipart/related beside the HTML with Content-Disposition inline and the Content-ID "
        "content_id, which the HTML references as cid:<content_id>. Needs content_id and an html body.",
    )
    content_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CONTENT_ID,
        pattern=_CONTENT_ID,
        description="The part's Content-ID without angle brackets (Mailroom adds them), e.g. "
        "logo.png@example.test; only with inline. Letters, digits, dots and !#$%&'*+/=?^_`{|}~- "
        "with at most one @.",
    )
    _data: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _decode(self) -> Attachment:
        if self.inline and self.content_id is None:
            raise ValueError("an inline attachment needs a content_id (referenced as cid:… in the html)")
        if self.content_id is not None and not self.inline:
            raise ValueError("content_id is for inline attachments: set inline to true")
        try:
            self._data = base64.b64decode(self.content, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("content is not valid base64") from None
        return self

    @property
    def data(self) -> bytes:
        return self._data


class SendRequest(_Strict):
    """A message to send from the account: everything but From, Date and Message-ID,
    which Mailroom sets."""

    to: list[AddressIn] = Field(default_factory=list, max_length=100)
    cc: list[AddressIn] = Field(default_factory=list, max_length=100)
    bcc: list[AddressIn] = Field(
        default_factory=list, max_length=100, description="Envelope only: never written into the message."
    )
    reply_to: list[AddressIn] = Field(default_factory=list, max_length=10)
    subject: HeaderText = Field(default="", max_length=998)
    text: str | None = None
    html: str | None = None
    in_reply_to: MessageIdRef | None = None
    references: list[MessageIdRef] = Field(default_factory=list, max_length=100)
    headers: dict[str, HeaderText] = Field(
        default_factory=dict,
        max_length=50,
        description="Extra headers: X-… or one of List-Unsubscribe, List-Unsubscribe-Post, List-Id, "
        "Auto-Submitted, Importance, Priority, Sensitivity, Organization, Keywords, Comments, Precedence.",
    )
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)
    send_at: datetime | None = Field(default=None, description="Send later (ISO 8601 with a time zone).")
    save_sent: StrictBool | None = Field(
        default=None,
        description="File a copy in the account's \\Sent folder: true or false for this message; "
        "null or absent follows the account's save_sent_copy.",
    )

    @model_validator(mode="after")
    def _whole(self) -> SendRequest:
        if not (self.to or self.cc or self.bcc):
            raise ValueError("a message needs at least one recipient in to, cc or bcc")
        if self.text is None and self.html is None:
            raise ValueError("a message needs a text or an html body")
        for name, value in self.headers.items():
            lower = name.lower()
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header {name!r}: not a header name")
            if lower in _DENIED_X or not (lower.startswith("x-") or lower in ALLOWED_HEADERS):
                raise ValueError(
                    f"header {name!r} may not be set; allowed are X-… and {sorted(ALLOWED_HEADERS)}"
                )
            if len(value) > 998:
                raise ValueError(f"header {name!r}: longer than 998 characters")
        inline = [a.content_id for a in self.attachments if a.inline]
        if inline and self.html is None:
            raise ValueError("inline attachments need an html body that references them (cid:…)")
        if len(set(inline)) != len(inline):
            raise ValueError("each inline attachment needs its own content_id")
        if self.send_at is not None and self.send_at.tzinfo is None:
            raise ValueError("send_at needs a time zone (e.g. 2026-01-01T09:00:00Z)")
        return self

    def envelope(self) -> list[str]:
        """Every recipient once, in order: to, cc, bcc."""
        seen: dict[str, None] = {}
        for value in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(as_address(value).email, None)
        return list(seen)

    def content_bytes(self) -> int:
        """What the size limit counts: bodies as UTF-8 and attachments decoded."""
        size = len((self.text or "").encode()) + len((self.html or "").encode())
        return size + sum(len(a.data) for a in self.attachments)
