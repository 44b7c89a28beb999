"""Real-world mail: the public SpamAssassin corpus (shared/corpora) — odd charsets, broken
headers, HTML-only bodies, attachments — synced through Dovecot and compared with what
Python's own email parser reads from the same bytes."""

from __future__ import annotations

import email
import email.policy
import re
import tarfile
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from tests.services.mailboxes import Mailbox

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "spamassassin-dev.tar.gz"


def corpus_messages(limit: int) -> list[bytes]:
    found: list[tuple[str, bytes]] = []
    # In archive order: a gzip stream cannot seek back cheaply.
    with tarfile.open(CORPUS) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".eml"):
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                found.append((member.name, data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")))
    return [data for _, data in sorted(found)[:limit]]


def header_text(raw: bytes, name: str) -> str:
    value = email.message_from_bytes(raw, policy=email.policy.compat32).get(name)
    if value is None:
        return ""
    try:
        return " ".join(str(make_header(decode_header(str(value)))).split())
    except (LookupError, UnicodeError, ValueError):
        return " ".join(str(value).split())


def python_date(raw: bytes) -> datetime | None:
    value = email.message_from_bytes(raw, policy=email.policy.compat32).get("Date")
    try:
        parsed = parsedate_to_datetime(str(value)) if value else None
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or parsed.tzinfo is None:
        return None  # no zone: readers may rightly disagree on what it means
    return parsed.astimezone(UTC)


def skeleton(text: str) -> str:
    """The printable ASCII of a header with every run of anything else as one "?": raw
    8-bit headers declare no charset, so decoders may rightly differ on those characters
    (Mailroom reads them as Latin-1, compat32 gives U+FFFD), but not on the rest."""
    return re.sub(r"[^\x20-\x7e]+", "?", " ".join(text.split()))


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.exists(), reason="the shared corpus is not beside this checkout")
def test_the_whole_corpus_syncs_and_reads_like_pythons_parser(mailbox: Mailbox) -> None:
    raw = corpus_messages(limit=5000)
    assert len(raw) > 3000
    uids = mailbox.append("INBOX", raw)
    summary = mailbox.sync()
    assert summary["failed_folders"] == []
    stored = {m.uid: m for m in mailbox.messages("INBOX")}
    assert len(stored) == len(raw) == len(uids)
    agree = dated = dates_agree = 0
    for uid, data in zip(uids, raw, strict=True):
        row = stored[uid]
        assert row.size == len(data)
        expected = header_text(data, "Subject")
        if skeleton(row.subject) == skeleton(expected):
            agree += 1

        assert len(row.snippet) <= 300
        expected_date = python_date(data)
        if expected_date is not None:
            dated += 1
            dates_agree += row.date is not None and abs((row.date - expected_date).total_seconds()) < 1
    # Subjects decode like the standard library's for (nearly) every message; the few that
    # may differ are malformed encoded-words that the two decoders repair differently.
    assert agree / len(raw) > 0.995, f"{agree} of {len(raw)} subjects agree"
    assert dates_agree / dated > 0.99, f"{dates_agree} of {dated} dates agree"
    with_attachments = [m for m in stored.values() if m.attachments]
    assert with_attachments, "the corpus has messages with attachments"
    assert sum(1 for m in stored.values() if m.snippet) / len(stored) > 0.9
