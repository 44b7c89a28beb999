"""Turning the header fields a FETCH returns into the values a message row stores.

Parsing is the bottleneck of a first sync (TESTBED: ``policy=default`` parses 567 msg/s,
``compat32`` 2,391), so this module avoids the ``email`` package's policy machinery on the
hot path: the header block holds only the handful of fields we asked the server for, so it
is split by hand, RFC 2047 words are decoded here, and the usual shapes of address lists
and dates are read with regular expressions, the stdlib parsers handling everything else.
Everything is lenient: a malformed field gives an empty or best-effort value, never an
exception.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta, timezone
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_SPACE_BETWEEN_WORDS = re.compile(rb"\?=[ \t\r\n]+=\?")
_MESSAGE_ID = re.compile(r"<[^<>\s]+>")


# --- header fields --------------------------------------------------------------------------


def split_header_block(raw: bytes) -> dict[str, bytes]:
    """The fields of a header block by lower-case name (first occurrence wins), unfolded.

    Unfolding removes only the line breaks and keeps the whitespace after them (RFC 5322
    §2.2.3); a line that is neither a field nor a continuation is ignored."""
    fields: dict[str, bytes] = {}
    current: str | None = None
    for raw_line in raw.split(b"\n"):
        line = raw_line.rstrip(b"\r")
        if not line:
            current = None
            continue
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                fields[current] += line
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            current = None
            continue
        key = name.strip().lower().decode("ascii", "replace")
        if key in fields:
            current = None  # a repeated field: keep the first, skip its continuation lines
            continue
        fields[key] = value.lstrip()
        current = key
    return fields


def bytes_to_text(raw: bytes) -> str:
    """Header bytes as text: UTF-8 when valid (RFC 6532), else Latin-1, which never fails."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\x00", "") if "\x00" in text else text  # PostgreSQL text refuses NUL


def decode_charset(data: bytes, charset: str) -> str:
    charset = charset.split("*", 1)[0].strip().lower() or "us-ascii"  # RFC 2231 language tag
    try:
        text = data.decode(charset, "replace")
    except LookupError:
        text = data.decode("utf-8", "replace")
    return text.replace("\x00", "") if "\x00" in text else text


def _decode_word_payload(encoding: bytes, payload: bytes) -> bytes | None:
    try:
        if encoding in (b"b", b"B"):
            return base64.b64decode(payload + b"=" * (-len(payload) % 4), validate=True)
        return binascii.a2b_qp(payload, header=True)
    except (binascii.Error, ValueError):
        return None


def decode_words(raw: bytes | str) -> str:
    """An unstructured header value with its RFC 2047 encoded words decoded.

    Whitespace between adjacent encoded words is dropped (RFC 2047 §6.2), and adjacent words
    in the same charset are decoded together, because senders do split one multi-byte
    character across two words even though the RFC forbids it."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    if b"=?" not in data:
        return bytes_to_text(data).strip()
    data = _SPACE_BETWEEN_WORDS.sub(b"?==?", data)
    out: list[str] = []
    pending_charset: bytes | None = None
    pending = b""
    position = 0
    for match in _ENCODED_WORD.finditer(data):
        decoded = _decode_word_payload(match.group(2), match.group(3))
        if decoded is None:
            continue  # left in place as literal text
        literal = data[position : match.start()]
        charset = match.group(1).lower()
        if literal or charset != pending_charset:
            if pending_charset is not None:
                out.append(decode_charset(pending, pending_charset.decode("ascii", "replace")))
            out.append(bytes_to_text(literal))
            pending, pending_charset = b"", charset
        pending += decoded
        position = match.end()
    if pending_charset is not None:
        out.append(decode_charset(pending, pending_charset.decode("ascii", "replace")))
    out.append(bytes_to_text(data[position:]))
    return "".join(out).strip()


_NEEDS_FULL_PARSER = re.compile(r"[()\\;:\[]")  # comments, escapes, groups, domain literals
_LIST_ITEM = re.compile(r'(?:"[^"]*"|[^,"])+')
_NOT_BARE = re.compile(r'[\s"]')
_NAME_ADDR = re.compile(r"(.*?)\s*<([^<>]*)>\s*")


def _split_addresses(text: str) -> list[tuple[str, str]]:
    """(name, address) pairs of an address list. The common shapes (``Name <a@b>``,
    ``"Last, First" <a@b>``, ``a@b``) are split here, many times faster than the stdlib's
    full RFC 5322 parser, which still handles everything else."""
    if _NEEDS_FULL_PARSER.search(text) or text.count('"') % 2:
        return getaddresses([text])
    pairs = []
    for item in _LIST_ITEM.findall(text):
        found = _NAME_ADDR.fullmatch(item.strip())
        if found:
            pairs.append((found.group(1).strip().strip('"').strip(), found.group(2).strip()))
        elif item.strip():
            if _NOT_BARE.search(item.strip()):
                return getaddresses([text])
            pairs.append(("", item.strip()))
    return pairs


def parse_addresses(raw: bytes | None, *, limit: int = 200) -> list[str]:
    """An address-list field as ``"Name <addr>"`` / ``"addr"`` strings with decoded names.

    The list is split before RFC 2047 decoding, since a decoded name may contain commas."""
    if not raw:
        return []
    out: list[str] = []
    for raw_name, address in _split_addresses(bytes_to_text(raw)):
        if not address and not raw_name:
            continue
        name = decode_words(raw_name) if raw_name else ""
        out.append(f"{name} <{address}>" if name and address else (address or name))
        if len(out) >= limit:
            break
    return out


_MONTHS = {
    name.encode(): number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1
    )
}
_ZONES: dict[bytes, timezone] = {}
# "Fri, 01 Mar 2024 09:00:00 +0000", the shape nearly every client writes.
_USUAL_DATE = re.compile(
    rb"[ \t]*(?:[A-Za-z]{3}, *)?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d\d):(\d\d)(?::(\d\d))? ([+-]\d{4})"
)
# INTERNALDATE: "01-Mar-2024 09:00:00 +0000" (day space-padded).
_INTERNAL_DATE = re.compile(rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-]\d{4})")


def _zone(offset: bytes) -> timezone:
    zone = _ZONES.get(offset)
    if zone is None:
        minutes = int(offset[1:3]) * 60 + int(offset[3:5])
        zone = _ZONES[offset] = timezone(timedelta(minutes=-minutes if offset[:1] == b"-" else minutes))
    return zone


def _utc(found: re.Match[bytes]) -> datetime | None:
    day, month, year, hour, minute, second, offset = found.groups()
    number = _MONTHS.get(month.lower())
    if number is None:
        return None
    try:
        local = datetime(
            int(year), number, int(day), int(hour), int(minute), int(second or 0), tzinfo=_zone(offset)
        )
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def parse_internal_date(raw: Any) -> datetime | None:
    """An INTERNALDATE value as an aware UTC datetime (None when unreadable)."""
    found = _INTERNAL_DATE.fullmatch(raw) if isinstance(raw, bytes) else None
    return _utc(found) if found else None


def parse_date(raw: bytes | None) -> datetime | None:
    """The Date field as an aware UTC datetime, or None when missing or unparseable.

    The usual shape is read by a regular expression (a quarter of the stdlib's time);
    anything else goes to :func:`email.utils.parsedate_to_datetime`."""
    if not raw:
        return None
    usual = _USUAL_DATE.match(raw)
    if usual and usual.group(2).lower() in _MONTHS:
        return _utc(usual)
    try:
        parsed = parsedate_to_datetime(raw.decode("ascii", "replace").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)  # "-0000": the RFC says UTC, the zone unknown
    try:
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def parse_message_id(raw: bytes | None) -> str | None:
    """The ``<…>`` identifier of a Message-ID or In-Reply-To field (the first, for the latter)."""
    if not raw:
        return None
    text = bytes_to_text(raw).strip()
    found = _MESSAGE_ID.search(text)
    value = found.group(0) if found else text
    return value[:998] or None
