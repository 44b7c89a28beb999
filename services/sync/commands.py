"""The IMAP commands a sync issues, on top of imapclient, and a counter of them.

Two imapclient gaps are filled here, both through its ``_imap`` (imaplib) connection:

* ``IMAPClient.fetch`` in 4.x keeps only the ids it was given as ints, so a UID *range*
  (``501:*``) cannot be fetched with it; :func:`uid_fetch` sends the same command, parses
  the answer with the fast parser of :mod:`services.sync.wire` (imapclient's as the
  fallback) and keeps every answer that carries a UID.
* QRESYNC's ``VANISHED`` answers are not parsed by imapclient; imaplib files them under
  ``untagged_responses["VANISHED"]``, from where :func:`take_vanished` collects them.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import imapclient
from imapclient.response_parser import gen_parsed_response
from imapclient.response_types import BodyData
from imapclient.util import assert_imap_protocol

from services.errors import PermanentMailError
from services.sync.wire import WireError, internal_date, parse_fetch_fast

log = logging.getLogger(__name__)

STATUS_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN")


class CommandCounter:
    """Counts the commands a client sends, by name (``FETCH``, ``SELECT``, …).

    It wraps the imaplib connection's ``send`` once the client is logged in (so LOGIN and
    the CAPABILITY before it are not counted): every command line starts with the
    connection's tag prefix, so continuation data (literals) is never counted. ``UID X``
    counts as ``X``; EXAMINE (a read-only SELECT) counts as EXAMINE."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def attach(self, client: imapclient.IMAPClient) -> None:
        imap = client._imap
        original = imap.send
        prefix: bytes = imap.tagpre

        def send(data: bytes) -> None:
            if data.startswith(prefix):
                words = data.split(None, 3)
                name = words[1] if len(words) > 1 else b""
                if name.upper() == b"UID" and len(words) > 2:
                    name = words[2]
                self.counts[name.decode("ascii", "replace").upper()] += 1
            original(data)

        imap.send = send

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_command": dict(sorted(self.counts.items()))}


@dataclass(frozen=True)
class Capabilities:
    condstore: bool
    qresync: bool
    special_use: bool


def prepare(client: imapclient.IMAPClient) -> tuple[Capabilities, list[str]]:
    """Read CAPABILITY and enable QRESYNC where offered (it implies CONDSTORE), else
    CONDSTORE; must run before the first SELECT. Returns what sync may use and the raw
    capability list."""
    raw = sorted(c.decode() if isinstance(c, bytes) else str(c) for c in client.capabilities())
    names = {c.upper() for c in raw}
    qresync = False
    wanted = "QRESYNC" if "QRESYNC" in names else "CONDSTORE" if "CONDSTORE" in names else None
    if wanted and "ENABLE" in names:
        # Enabled, the server sends HIGHESTMODSEQ on SELECT and MODSEQ with FETCH.
        qresync = b"QRESYNC" in {e.upper() for e in client.enable(wanted)}
    caps = Capabilities(
        condstore=qresync or "CONDSTORE" in names,
        qresync=qresync,
        special_use="SPECIAL-USE" in names,
    )
    return caps, raw


def folder_status(client: imapclient.IMAPClient, name: str, caps: Capabilities) -> dict[str, int]:
    """STATUS of one folder as ``{"MESSAGES": …, "UIDNEXT": …, "UIDVALIDITY": …,
    "UNSEEN": …[, "HIGHESTMODSEQ": …]}``."""
    items = STATUS_ITEMS + (("HIGHESTMODSEQ",) if caps.condstore else ())
    raw = client.folder_status(name, items)
    return {_key(k): int(v) for k, v in raw.items() if isinstance(v, int) or str(v).isdigit()}


def _key(key: Any) -> str:
    return (key.decode() if isinstance(key, bytes) else str(key)).upper()


@dataclass(frozen=True)
class Selected:
    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None


def examine(client: imapclient.IMAPClient, name: str) -> Selected:
    """Select ``name`` read-only (sync changes nothing, and EXAMINE leaves \\Recent alone)."""
    client._imap.untagged_responses.pop("VANISHED", None)
    response = client.select_folder(name, readonly=True)
    uidvalidity = response.get(b"UIDVALIDITY")
    if not isinstance(uidvalidity, int):
        raise PermanentMailError(f"folder {name!r}: the server sent no UIDVALIDITY")
    uidnext = response.get(b"UIDNEXT")
    modseq = response.get(b"HIGHESTMODSEQ")
    return Selected(
        uidvalidity=uidvalidity,
        uidnext=uidnext if isinstance(uidnext, int) else None,
        exists=int(response.get(b"EXISTS", 0)),
        highestmodseq=modseq if isinstance(modseq, int) and modseq > 0 else None,
    )


def uid_fetch(
    client: imapclient.IMAPClient, uid_set: str, items: str, modifiers: str | None = None
) -> dict[int, dict[bytes, Any]]:
    """``UID FETCH <uid_set> <items> [<modifiers>]`` → ``{uid: {item: value}}``.

    Answers without a UID are unsolicited (another session changed a message) and are
    dropped, as imapclient would otherwise file them under their sequence number."""
    imap = client._imap
    args = ["FETCH", uid_set, items] + ([modifiers] if modifiers else [])
    tag = imap._command("UID", *args)
    typ, data = imap._command_complete("FETCH", tag)
    client._checkok("fetch", typ, data)
    typ, data = imap._untagged_response(typ, data, "FETCH")
    return parse_fetch(data)


def parse_fetch(data: list[Any]) -> dict[int, dict[bytes, Any]]:
    """Parse FETCH responses keyed by UID (INTERNALDATE kept timezone-aware) with the fast
    parser, or with imapclient's when the fast one does not understand the response."""
    try:
        return parse_fetch_fast(data)
    except WireError as exc:
        log.info("falling back to imapclient's FETCH parser: %s", exc)
    out: dict[int, dict[bytes, Any]] = {}
    if data == [None]:
        return out
    response = gen_parsed_response(data)
    for _seq in response:
        attributes = next(response)
        assert_imap_protocol(isinstance(attributes, tuple) and len(attributes) % 2 == 0)
        values: dict[bytes, Any] = {}
        uid: int | None = None
        for i in range(0, len(attributes), 2):
            word = attributes[i].upper()
            value = attributes[i + 1]
            if word == b"UID":
                uid = int(value)
            elif word == b"BODYSTRUCTURE":
                values[word] = BodyData.create(value)
            elif word == b"INTERNALDATE":
                values[word] = internal_date(value)
            else:
                values[word] = value
        if uid is not None:
            out.setdefault(uid, {}).update(values)
    return out


def uid_search(client: imapclient.IMAPClient, uid_range: str) -> list[int]:
    """The UIDs that exist in ``uid_range`` (``UID SEARCH UID <range>``), ascending."""
    return sorted(int(u) for u in client.search(["UID", uid_range]))


def take_vanished(client: imapclient.IMAPClient) -> list[tuple[int, int]]:
    """The UID ranges of every ``VANISHED`` (and ``VANISHED (EARLIER)``) answer received
    since the last call, removed from imaplib's buffer."""
    ranges: list[tuple[int, int]] = []
    for line in client._imap.untagged_responses.pop("VANISHED", []) or []:
        text = line.decode("ascii", "replace") if isinstance(line, bytes) else str(line)
        if text.upper().startswith("(EARLIER)"):
            text = text[len("(EARLIER)") :]
        ranges.extend(parse_uid_set(text.strip()))
    return ranges


def parse_uid_set(text: str) -> list[tuple[int, int]]:
    """``"1:3,7"`` → ``[(1, 3), (7, 7)]`` (either end of a range may come first)."""
    ranges = []
    for item in text.split(","):
        if not item:
            continue
        low, _, high = item.partition(":")
        a, b = int(low), int(high or low)
        ranges.append((min(a, b), max(a, b)))
    return ranges


def in_ranges(uids: Iterable[int], ranges: list[tuple[int, int]]) -> list[int]:
    """The members of ``uids`` that fall in any of ``ranges``."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    starts = [low for low, _ in merged]
    out = []
    for uid in uids:
        i = bisect.bisect_right(starts, uid) - 1
        if i >= 0 and uid <= merged[i][1]:
            out.append(uid)
    return out


def uid_set(uids: Iterable[int]) -> str:
    """A compact UID set (``"1:5,9,12:14"``) for a command line."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    start = prev = None
    for uid in ordered:
        if start is None:
            start = prev = uid
        elif uid == prev + 1:  # type: ignore[operator]
            prev = uid
        else:
            parts.append(f"{start}:{prev}" if start != prev else str(start))
            start = prev = uid
    if start is not None:
        parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts)
