"""What one FETCH of new messages asks for, and how each answer becomes a message row.

One command per batch carries everything a row needs: flags, size, internal date, the
header fields we store, BODYSTRUCTURE (attachment names, and how to decode the snippet)
and the first 2 KB of part 1 for the snippet. Part 1 is the body itself for a one-part
message and the first alternative of a multipart one, so a single section serves every
message of the batch without a second round trip.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import imapclient

from services.sync import bodystructure, parse
from services.sync.commands import uid_fetch

log = logging.getLogger(__name__)

HEADER_FIELDS = ("MESSAGE-ID", "IN-REPLY-TO", "SUBJECT", "FROM", "TO", "CC", "DATE")
SNIPPET_BYTES = 2048
MESSAGE_ITEMS = (
    "UID FLAGS RFC822.SIZE INTERNALDATE "
    f"BODY.PEEK[HEADER.FIELDS ({' '.join(HEADER_FIELDS)})] BODYSTRUCTURE "
    f"BODY.PEEK[1]<0.{SNIPPET_BYTES}>"
)
FLAG_ITEMS = "(UID FLAGS)"


def message_items(condstore: bool) -> str:
    """The FETCH item list for new messages (with MODSEQ where the server keeps them)."""
    return f"({MESSAGE_ITEMS}{' MODSEQ' if condstore else ''})"


def fetch_messages(
    client: imapclient.IMAPClient, uids: str, *, condstore: bool
) -> dict[int, dict[bytes, Any]]:
    """FETCH the row material of the UIDs in ``uids`` (a UID set)."""
    return uid_fetch(client, uids, message_items(condstore))


def flag_names(raw: Any) -> list[str]:
    """FLAGS as sorted strings, without \\Recent (session-specific, not a message property)."""
    out = []
    for flag in raw or ():
        text = flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)
        if text.lower() != "\\recent":
            out.append(text)
    return sorted(out)


def modseq_of(data: dict[bytes, Any]) -> int | None:
    value = data.get(b"MODSEQ")
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return int(value) if isinstance(value, int) else None


def _section(data: dict[bytes, Any], prefix: bytes) -> bytes | None:
    # The server echoes the section spec in its own spelling (case, quoting), so match
    # on the prefix rather than on the exact key we asked for.
    for key, value in data.items():
        if key.startswith(prefix):
            return value if isinstance(value, bytes) else None
    return None


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def message_row(uid: int, data: dict[bytes, Any]) -> dict[str, Any]:
    """The Message columns (without ids) for one FETCH answer.

    A message whose header or structure cannot be parsed still gets a row with what the
    server told us directly (flags, size, dates), so one odd message never stops a folder."""
    flags = flag_names(data.get(b"FLAGS"))
    internal_date = _aware(data.get(b"INTERNALDATE"))
    row: dict[str, Any] = {
        "uid": uid,
        "modseq": modseq_of(data),
        "flags": flags,
        "seen": "\\Seen" in flags,
        "flagged": "\\Flagged" in flags,
        "size": int(data.get(b"RFC822.SIZE") or 0),
        "internal_date": internal_date,
        "date": internal_date,
        "message_id_header": None,
        "in_reply_to": None,
        "subject": "",
        "from_addr": "",
        "to_addrs": [],
        "cc_addrs": [],
        "snippet": "",
        "attachments": [],
    }
    try:
        fields = parse.split_header_block(_section(data, b"BODY[HEADER") or b"")
        structure = data.get(b"BODYSTRUCTURE")
        senders = parse.parse_addresses(fields.get("from"), limit=1)
        row.update(
            message_id_header=parse.parse_message_id(fields.get("message-id")),
            in_reply_to=parse.parse_message_id(fields.get("in-reply-to")),
            subject=parse.decode_words(fields.get("subject", b""))[:10_000],
            from_addr=senders[0][:998] if senders else "",
            to_addrs=parse.parse_addresses(fields.get("to")),
            cc_addrs=parse.parse_addresses(fields.get("cc")),
            # Without a usable Date header the arrival time stands in, so every row has a
            # date to sort and page by.
            date=parse.parse_date(fields.get("date")) or internal_date,
            attachments=bodystructure.attachment_names(structure),
            snippet=bodystructure.snippet(structure, _section(data, b"BODY[1]")),
        )
    except Exception:
        log.warning("could not parse message uid=%s; storing it without parsed headers", uid, exc_info=True)
    return row
