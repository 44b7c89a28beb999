"""What BODYSTRUCTURE and the first bytes of part 1 tell about a message: the names of
its attachments, and a ~200-character text snippet with transfer encoding and charset
undone. Structures come as imapclient and :mod:`services.sync.wire` return them (a
multipart's parts gathered into a list as its first element)."""

from __future__ import annotations

import base64
import binascii
import html
import re
from collections.abc import Sequence
from email.parser import BytesParser
from email.policy import compat32
from typing import Any
from urllib.parse import unquote_to_bytes

from services.sync.parse import bytes_to_text, decode_charset, decode_words

SNIPPET_CHARS = 200

_HTML_DROP = re.compile(r"<(script|style|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_CONTINUATION = re.compile(r"^(filename|name)\*(\d+)(\*?)$")


# --- BODYSTRUCTURE --------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return bytes_to_text(value)
    return "" if value is None else str(value)


def _is_multipart(part: Sequence[Any]) -> bool:
    return bool(part) and isinstance(part[0], list)


def _pairs(params: Any) -> list[tuple[str, Any]]:
    if not isinstance(params, (tuple, list)):
        return []
    return [(_text(params[i]).lower(), params[i + 1]) for i in range(0, len(params) - 1, 2)]


def _param(params: Any, wanted: str) -> str | None:
    """A MIME parameter: plain (maybe RFC 2047-encoded), RFC 2231 ``name*``, or continued."""
    if not isinstance(params, (tuple, list)) or not params:
        return None
    wanted_key = wanted.encode()
    for i in range(0, len(params) - 1, 2):
        if isinstance(params[i], bytes) and params[i].lower() == wanted_key:
            value = params[i + 1]
            return decode_words(value) if isinstance(value, bytes) else _text(value)
    if not any(isinstance(k, bytes) and b"*" in k for k in params[::2]):
        return None
    pairs = _pairs(params)
    direct = dict(pairs)
    pieces: list[tuple[int, bool, str]] = []
    if f"{wanted}*" in direct:
        pieces.append((0, True, _text(direct[f"{wanted}*"])))
    for key, value in pairs:
        found = _CONTINUATION.match(key)
        if found and found.group(1) == wanted:
            pieces.append((int(found.group(2)), bool(found.group(3)), _text(value)))
    if not pieces:
        return None
    pieces.sort()
    charset, data = "us-ascii", b""
    for index, encoded, piece in pieces:
        if encoded:
            value = piece
            if index == 0 and value.count("'") >= 2:
                charset, _language, value = value.split("'", 2)
            data += unquote_to_bytes(value)
        else:
            data += piece.encode("utf-8")
    return decode_charset(data, charset or "us-ascii")


def _leaf_extension_start(part: Sequence[Any]) -> int:
    kind, subtype = _text(part[0]).lower(), _text(part[1]).lower()
    if kind == "text":
        return 8
    if kind == "message" and subtype in ("rfc822", "global"):
        return 10
    return 7


def _disposition(part: Sequence[Any]) -> tuple[str, Any]:
    index = _leaf_extension_start(part) + 1  # after body-fld-md5
    value = part[index] if len(part) > index else None
    if isinstance(value, (tuple, list)) and value:
        return _text(value[0]).lower(), value[1] if len(value) > 1 else None
    return "", None


def attachment_names(structure: Any, *, limit: int = 100) -> list[str]:
    """File names of the attachments BODYSTRUCTURE describes (not descending into attached
    messages). A part counts when its disposition is ``attachment``, it carries a name, or
    it is an attached message."""
    names: list[str] = []

    def walk(part: Any) -> None:
        if len(names) >= limit or not isinstance(part, (tuple, list)) or not part:
            return
        if _is_multipart(part):
            for child in part[0]:
                walk(child)
            return
        if len(part) < 7:
            return
        disposition, disposition_params = _disposition(part)
        name = _param(disposition_params, "filename") or _param(part[2], "name")
        kind = _text(part[0]).lower()
        # An attached message is shown as an attachment even without a name.
        if disposition == "attachment" or name or kind == "message":
            fallback = "forwarded-message.eml" if kind == "message" else "untitled"
            names.append((name or fallback)[:500])

    walk(structure)
    return names


# --- snippet --------------------------------------------------------------------------------


def decode_transfer(data: bytes, encoding: str) -> bytes:
    """Undo a Content-Transfer-Encoding on a possibly truncated prefix of a part."""
    encoding = encoding.lower()
    if encoding == "base64":
        compact = b"".join(data.split())
        compact = compact[: len(compact) - len(compact) % 4]
        try:
            return base64.b64decode(compact)
        except (binascii.Error, ValueError):
            return b""
    if encoding == "quoted-printable":
        cut = data.rfind(b"=", max(0, len(data) - 2))
        if cut != -1:
            data = data[:cut]  # a "=X" escape cut off by the partial fetch
        return binascii.a2b_qp(data)
    return data


def html_to_text(markup: str) -> str:
    """Readable text of (a prefix of) an HTML part: scripts, styles and tags removed."""
    markup = _HTML_COMMENT.sub(" ", markup)
    markup = _HTML_DROP.sub(" ", markup)
    cut = markup.rfind("<")
    if cut > markup.rfind(">"):
        markup = markup[:cut]  # a tag cut off by the partial fetch
    return html.unescape(_HTML_TAG.sub(" ", markup))


def _shorten(text: str) -> str:
    # Collapsing whitespace in a prefix is enough unless the prefix was mostly whitespace.
    head = " ".join(text[: SNIPPET_CHARS * 4].replace("\ufffd", " ").split())
    text = head if len(head) > SNIPPET_CHARS or len(text) <= SNIPPET_CHARS * 4 else " ".join(text.split())
    if len(text) <= SNIPPET_CHARS:
        return text
    return text[: SNIPPET_CHARS - 1].rstrip() + "…"


def _leaf_text(data: bytes, kind: str, subtype: str, encoding: str, charset: str) -> str:
    if kind != "text" or subtype not in ("plain", "html"):
        return ""
    text = decode_charset(decode_transfer(data, encoding), charset or "us-ascii")
    return html_to_text(text) if subtype == "html" else text


def _nested_text(data: bytes, subtype: str, boundary: str) -> str:
    """The first text part inside a multipart part 1 (e.g. alternative inside mixed): its raw
    body is framed with a synthetic header so the stdlib parser can split it at boundaries."""
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode()
    message = BytesParser(policy=compat32).parsebytes(head + data)
    fallback = ""
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_maintype()
        sub = part.get_content_subtype()
        if kind != "text" or sub not in ("plain", "html"):
            continue
        payload = part.get_payload()
        raw = payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else b""
        text = _leaf_text(
            raw,
            kind,
            sub,
            str(part.get("content-transfer-encoding", "7bit")).strip(),
            part.get_content_charset() or "",
        )
        if sub == "plain" and text.strip():
            return text
        fallback = fallback or text
    return fallback


def snippet(structure: Any, first_part: bytes | None) -> str:
    """About 200 characters of readable text from the start of the message's first part
    (``BODY[1]<0.N>``), transfer encoding and charset undone as BODYSTRUCTURE describes."""
    if not first_part or not isinstance(structure, (tuple, list)) or not structure:
        return ""
    part = structure[0][0] if _is_multipart(structure) else structure
    if not isinstance(part, (tuple, list)) or not part:
        return ""
    if _is_multipart(part):
        boundary = _param(part[2] if len(part) > 2 else None, "boundary")
        if not boundary:
            return ""
        return _shorten(_nested_text(first_part, _text(part[1]).lower(), boundary))
    if len(part) < 7:
        return ""
    text = _leaf_text(
        first_part,
        _text(part[0]).lower(),
        _text(part[1]).lower(),
        _text(part[5]) or "7bit",
        _param(part[2], "charset") or "",
    )
    return _shorten(text)
