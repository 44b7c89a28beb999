"""Hostile mail is scored within its bounds, never raises, and the verdict says what was cut.

Each case checks the outcome (a verdict, the limits it names) and that it took a bounded
amount of work: the parser's own time budget is the guard, so these assert the limit it
records rather than a wall-clock duration.
"""

from __future__ import annotations

import base64
import io
import struct
import zipfile

import pytest

from services.spam import score_message
from services.spam.archive import read_zip_directory
from services.spam.parse import MAX_DEPTH, MAX_HEADERS, MAX_PARTS, parse_message
from tests.test_spam_rules import message, with_attachment


def test_ten_thousand_headers() -> None:
    head = "".join(f"X-Filler-{i}: value {i}\r\n" for i in range(10_000))
    raw = (head + "From: a@example.org\r\nSubject: hi\r\n\r\nbody text\r\n").encode()
    parsed = parse_message(raw)
    assert "header_count" in parsed.limits
    assert len(parsed.raw_headers) == MAX_HEADERS
    verdict = score_message(raw)
    assert 0.0 <= verdict.score <= 1.0
    assert "header_count" in verdict.limits


def test_one_header_folded_ten_thousand_times() -> None:
    raw = ("Subject: x\r\n" + " y\r\n" * 10_000 + "From: a@example.org\r\n\r\nbody\r\n").encode()
    parsed = parse_message(raw)
    assert parsed.header("subject").startswith("x y y")
    assert parsed.header("from") == "a@example.org"


def test_deeply_nested_parts() -> None:
    depth = 200
    body = "innermost text\r\n"
    for level in range(depth):
        body = (
            f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n'
            f"--b{level}\r\n{body}\r\n--b{level}--\r\n"
        )
    raw = ("From: a@example.org\r\nSubject: nest\r\nMIME-Version: 1.0\r\n" + body).encode()
    verdict = score_message(raw)
    assert "nesting_depth" in verdict.limits
    assert 0.0 <= verdict.score <= 1.0


def test_many_parts() -> None:
    parts = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n" for i in range(5_000))
    raw = message(parts + "--b--\r\n", content_type='multipart/mixed; boundary="b"')
    parsed = parse_message(raw)
    assert "part_count" in parsed.limits
    assert parsed.text_parts <= MAX_PARTS


def test_twenty_megabyte_attachment() -> None:
    raw = with_attachment("video.bin", b"\x00\x01\x02\x03" * (5 * 1024 * 1024))
    assert len(raw) > 20 * 1024 * 1024
    verdict = score_message(raw)
    assert "message_size" in verdict.limits
    assert 0.0 <= verdict.score <= 1.0


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\x00" * (2 * 1024 * 1024))
    data = bytearray(buf.getvalue())
    # Declare 4 GiB uncompressed in the central directory: what a bomb claims is all we read.
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, 0xFFFFFFF0)
    return bytes(data)


def test_zip_bomb_is_judged_from_its_directory() -> None:
    bomb = _bomb()
    summary = read_zip_directory(bomb)
    assert summary.uncompressed == 0xFFFFFFF0
    assert summary.ratio > 1000
    verdict = score_message(with_attachment("archive.zip", bomb))
    assert any(i.name == "archive_bomb" for i in verdict.indicators)


@pytest.mark.parametrize(
    "data", [b"", b"PK\x05\x06", b"PK\x05\x06" + b"\xff" * 18, b"not a zip at all" * 100]
)
def test_broken_archives_are_unreadable_not_errors(data: bytes) -> None:
    assert not read_zip_directory(data).readable or read_zip_directory(data).entries == 0


@pytest.mark.parametrize("charset", ["x-unknown-42", "zlib_codec", "base64_codec", "rot13", "utf-7", '"'])
def test_bad_and_dangerous_charsets(charset: str) -> None:
    payload = base64.b64encode(b"x\x9c" + b"\xff" * 50).decode()
    raw = message(
        f"{payload}\r\n",
        content_type=f"text/plain; charset={charset}",
        extra="Content-Transfer-Encoding: base64",
        subject=f"=?{charset}?B?{payload}?=",
    )
    verdict = score_message(raw)
    assert 0.0 <= verdict.score <= 1.0
    parsed = parse_message(raw)
    assert isinstance(parsed.text, str)


def test_nul_bytes_and_binary_garbage() -> None:
    raw = message("hello\x00world\x00" * 1000)
    verdict = score_message(raw)
    assert "nul_bytes" in verdict.limits
    for garbage in (
        b"\x00" * 10_000,
        bytes(range(256)) * 200,
        b"\r\n" * 5000,
        b":" * 100_000,
        b"--\r\n" * 1000,
    ):
        assert 0.0 <= score_message(garbage).score <= 1.0


def test_broken_mime_structure() -> None:
    cases = [
        message(
            "no closing boundary\r\n--b\r\nContent-Type: text/plain\r\n\r\ntext",
            content_type="multipart/mixed; boundary=b",
        ),
        message("no boundary parameter", content_type="multipart/alternative"),
        message("=ZZ=\r\n=", content_type="text/plain", extra="Content-Transfer-Encoding: quoted-printable"),
        message("!!!!", content_type="text/plain", extra="Content-Transfer-Encoding: base64"),
        message("<a href='x", content_type="text/html"),
        message("<div style='display:none'>" * 3000, content_type="text/html"),
        message("<a href=http://x>" * 5000, content_type="text/html"),
    ]
    for raw in cases:
        verdict = score_message(raw)
        assert 0.0 <= verdict.score <= 1.0


def test_time_budget_is_recorded_when_it_runs_out() -> None:
    parts = "".join(f"--b\r\nContent-Type: text/html\r\n\r\n<p>{'word ' * 2000}</p>\r\n" for i in range(60))
    raw = message(parts + "--b--\r\n", content_type='multipart/mixed; boundary="b"')
    parsed = parse_message(raw, time_budget=0.0)
    assert "time_budget" in parsed.limits


def test_depth_limit_constant_is_small() -> None:
    assert MAX_DEPTH <= 16
