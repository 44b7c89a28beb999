"""The parsing pieces of sync, on their own: header fields, dates, addresses, BODYSTRUCTURE,
snippets, the fast FETCH parser (checked against imapclient's) and UID sets. Pure
functions, no servers."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime

import pytest
from imapclient.response_parser import parse_fetch_response

from services.sync import bodystructure, parse
from services.sync.commands import in_ranges, parse_fetch, parse_uid_set, uid_set
from services.sync.wire import WireError, parse_fetch_fast


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"plain subject", "plain subject"),
        (b"=?utf-8?q?H=C3=A9llo_world?=", "Héllo world"),
        (b"=?UTF-8?B?w6k=?= =?UTF-8?B?w6k=?=  tail", "éé  tail"),  # space between words dropped
        (b"Re: =?iso-8859-1?q?caf=E9?= ok", "Re: café ok"),
        (b"=?x-unknown?q?odd?=", "odd"),
        (b"=?utf-8?b?!!!?=", "=?utf-8?b?!!!?="),  # undecodable: left as it is
        (b"caf\xe9 cr\xe8me", "café crème"),  # raw Latin-1
        ("Grüße".encode(), "Grüße"),  # raw UTF-8 (RFC 6532)
        (b"a\x00b", "ab"),  # PostgreSQL refuses NUL
    ],
)
def test_decode_words(raw: bytes, text: str) -> None:
    assert parse.decode_words(raw) == text


def test_decode_words_joins_a_character_split_across_words() -> None:
    data = "日本語".encode()
    first, second = base64.b64encode(data[:4]).decode(), base64.b64encode(data[4:]).decode()
    assert parse.decode_words(f"=?utf-8?b?{first}?=\r\n =?utf-8?b?{second}?=".encode()) == "日本語"


def test_split_header_block() -> None:
    block = b"Subject: first\r\n  folded\r\nFrom: a@b\r\nSubject: second\r\n garbage\r\nnot a field\r\n\r\n"
    assert parse.split_header_block(block) == {"subject": b"first  folded", "from": b"a@b"}


@pytest.mark.parametrize(
    "value",
    [
        '"Doe, John" <j@x.org>, =?utf-8?q?J=C3=B6rg?= <jo@x.de>, bare@x.com',
        "Ann <a@b>",
        "a@b, c@d",
        "Jörg Müller <j@m.de>",
        "Name<n@x>",
        ' "A" <a@x> , b@y ',
        "undisclosed-recipients:;",
        "x@y (Comment)",
        '"Esc \\" aped" <e@x>',
        "A B",
    ],
)
def test_address_splitting_agrees_with_the_stdlib(value: str) -> None:
    assert parse._split_addresses(value) == getaddresses([value])


def test_parse_addresses_decodes_names() -> None:
    raw = b'"Doe, John" <j@x.org>, =?utf-8?q?J=C3=B6rg?= <jo@x.de>, bare@x.com'
    assert parse.parse_addresses(raw) == ["Doe, John <j@x.org>", "Jörg <jo@x.de>", "bare@x.com"]
    assert parse.parse_addresses(None) == []


@pytest.mark.parametrize(
    "raw",
    [
        b"Fri, 01 Mar 2024 09:00:00 +0000",
        b"1 Mar 2024 09:00 -0530",
        b"Fri, 01 Mar 2024 23:59:59 +1400",
        b"Mon, 20 Nov 2023 10:00:00 +0100 (CET)",
        b"Fri, 01 Mar 2024 09:00:00 GMT",
        b"Fri,  1 Mar 2024 09:00:00 +0000",
    ],
)
def test_parse_date_agrees_with_the_stdlib(raw: bytes) -> None:
    assert parse.parse_date(raw) == parsedate_to_datetime(raw.decode())


@pytest.mark.parametrize("raw", [b"", b"not a date", b"Fri, 31 Feb 2024 09:00:00 +0000", None])
def test_unusable_dates_are_none(raw: bytes | None) -> None:
    assert parse.parse_date(raw) is None


def test_parse_date_without_zone_is_utc() -> None:
    assert parse.parse_date(b"Fri, 01 Mar 2024 09:00:00 -0000") == datetime(2024, 3, 1, 9, tzinfo=UTC)


def test_internal_date() -> None:
    assert parse.parse_internal_date(b" 3-Nov-2026 09:11:21 -0700") == datetime(
        2026, 11, 3, 16, 11, 21, tzinfo=UTC
    )
    assert parse.parse_internal_date(b"garbage") is None


def test_message_id() -> None:
    assert parse.parse_message_id(b"  <a@b> ") == "<a@b>"
    assert parse.parse_message_id(b"<first@x> <second@x>") == "<first@x>"
    assert parse.parse_message_id(b"no-brackets@x") == "no-brackets@x"
    assert parse.parse_message_id(None) is None


# --- BODYSTRUCTURE (in the shape imapclient and the fast parser return it) -----------------

TEXT = [
    b"text",
    b"plain",
    [b"charset", b"utf-8"],
    None,
    None,
    b"quoted-printable",
    253,
    4,
    None,
    None,
    None,
    None,
]
HTML = [b"text", b"html", [b"charset", b"utf-8"], None, None, b"7bit", 24, 1, None, None, None, None]
PDF = [
    b"application", b"pdf", None, None, None, b"base64", 6, None,
    [b"attachment", [b"filename*", b"utf-8''r%C3%A9sum%C3%A9.pdf"]], None, None,
]  # fmt: skip
CONTINUED = [
    b"image", b"png", [b"name", b"ignored.png"], None, None, b"base64", 6, None,
    [b"inline", [b"filename*0*", b"utf-8''caf%C3%A9", b"filename*1", b"-photo.png"]], None, None,
]  # fmt: skip
NAMED = [b"text", b"csv", [b"name", b"=?utf-8?q?donn=C3=A9es.csv?="], None, None, b"base64", 6, 1, None, None]
FORWARDED = [b"message", b"rfc822", None, None, None, b"7bit", 100, None, None, 5, None, None, None, None]
MIXED = [[[[TEXT, HTML], b"alternative", [b"boundary", b"inner"], None, None, None], PDF, CONTINUED, NAMED,
          FORWARDED], b"mixed", [b"boundary", b"outer"], None, None, None]  # fmt: skip


def test_attachment_names() -> None:
    assert bodystructure.attachment_names(MIXED) == [
        "résumé.pdf",
        "café-photo.png",
        "données.csv",
        "forwarded-message.eml",
    ]
    assert bodystructure.attachment_names(TEXT) == []


def test_snippet_of_a_one_part_message() -> None:
    body = b"Caf=C3=A9 au lait,=\r\n  please.\r\n\r\n" + b"More text. " * 100 + b"=C3"
    text = bodystructure.snippet(TEXT, body)
    assert text.startswith("Café au lait,  please. More text.") or text.startswith(
        "Café au lait, please. More"
    )
    assert len(text) <= bodystructure.SNIPPET_CHARS and text.endswith("…")


def test_snippet_of_base64_cut_mid_quantum() -> None:
    structure = [b"text", b"plain", [b"charset", b"iso-8859-1"], None, None, b"base64", 9, 1]
    assert bodystructure.snippet(structure, base64.b64encode("déjà vu".encode("latin-1"))[:-1]) == "déjà v"


def test_snippet_of_html_only() -> None:
    markup = b"<html><head><style>p {color: red}</style></head><body><p>Hi &amp; bye</p><a hr"
    assert bodystructure.snippet(HTML, markup) == "Hi & bye"


def test_snippet_of_nested_multipart_prefers_the_plain_part() -> None:
    part1 = (
        b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n"
        b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nPlain caf=C3=A9\r\n--inner--\r\n"
    )
    assert bodystructure.snippet(MIXED, part1) == "Plain café"
    assert bodystructure.snippet(MIXED, None) == ""
    assert bodystructure.snippet([[PDF], b"mixed", None, None, None, None], b"%PDF") == ""


# --- the fast FETCH parser ----------------------------------------------------------------

HEADER = b"Subject: hi\r\nFrom: a@b\r\n\r\n"
RESPONSE = [
    (
        b'12 (UID 7 FLAGS (\\Seen $Junk) RFC822.SIZE 451 INTERNALDATE " 3-Nov-2026 09:11:21 +0000" '
        b"MODSEQ (99) BODY[HEADER.FIELDS (SUBJECT FROM)] {%d}" % len(HEADER),
        HEADER,
    ),
    (
        b' BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 3 1 NIL NIL NIL NIL)'
        b'("application" "pdf" ("name" {11}',
        b'we"ird).pdf',
    ),
    b') NIL NIL "base64" 6 NIL ("attachment" ("filename" "q\\"uote")) NIL NIL)'
    b' "mixed" ("boundary" "b") NIL NIL NIL) BODY[1]<0> {3}',
    b"hi\n",
    b")",
    b"13 (FLAGS (\\Recent))",  # unsolicited, no UID: dropped
]


def _fix_literal_framing(data: list[object]) -> list[object]:
    # imaplib pairs a line announcing a literal with the literal itself.
    out: list[object] = []
    for item in data:
        if isinstance(item, bytes) and out and isinstance(out[-1], bytes) and out[-1].endswith(b"{3}"):
            out[-1] = (out[-1], item)
        else:
            out.append(item)
    return out


def _plain(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def test_fast_parser_agrees_with_imapclient() -> None:
    data = _fix_literal_framing(RESPONSE)
    fast = parse_fetch_fast(data)
    reference = parse_fetch_response(data, normalise_times=False, uid_is_key=True)
    assert set(fast) == {7}
    expected = {k: _plain(v) for k, v in reference[7].items() if k != b"SEQ"}
    assert {k: _plain(v) for k, v in fast[7].items()} == expected
    assert fast[7][b"BODYSTRUCTURE"][0][1][2] == [b"name", b'we"ird).pdf']
    assert bodystructure.attachment_names(fast[7][b"BODYSTRUCTURE"]) == ['q"uote']


@pytest.mark.parametrize(
    "data",
    [
        [b"1 (UID 1 FLAGS (\\Seen)"],  # unbalanced
        [b"1 (UID 1 X {5}"],  # literal announced, not delivered
        [b"1 (UID 1 X [weird)"],
        [b"1"],
    ],
)
def test_fast_parser_refuses_what_it_does_not_understand(data: list[object]) -> None:
    with pytest.raises(WireError):
        parse_fetch_fast(data)


def test_parse_fetch_falls_back_to_imapclient() -> None:
    # A section atom with a space before its partial spec is legal-looking enough for
    # imapclient but not for the fast parser.
    data = [b"1 (UID 5 FLAGS (\\Seen) X-ODD [a b] RFC822.SIZE 3)"]
    with pytest.raises(WireError):
        parse_fetch_fast(data)
    parsed = parse_fetch(data)
    assert parsed[5][b"RFC822.SIZE"] == 3


# --- UID sets -----------------------------------------------------------------------------


def test_uid_sets() -> None:
    assert uid_set([5, 1, 2, 3, 9, 12, 13, 14]) == "1:3,5,9,12:14"
    assert uid_set([]) == ""
    assert parse_uid_set("1:3,7,10:8") == [(1, 3), (7, 7), (8, 10)]
    assert in_ranges([1, 2, 4, 7, 9, 11], [(1, 3), (7, 7), (8, 10), (2, 4)]) == [1, 2, 4, 7, 9]


def test_command_uid_sets_stay_within_the_line_limit_and_hold_every_uid() -> None:
    from services.mail_delete_imap import MAX_UID_SET, uid_sets

    # Neighbours are one range however many: one short command.
    assert uid_sets(range(1, 5001)) == ["1:5000"]
    assert uid_sets([]) == []
    # Scattered UIDs (every other one, six digits each) need several commands.
    scattered = list(range(100_000, 104_000, 2))
    sets = uid_sets(reversed(scattered))
    assert len(sets) > 1 and all(len(s) <= MAX_UID_SET for s in sets)
    assert [uid for s in sets for lo, hi in parse_uid_set(s) for uid in range(lo, hi + 1)] == scattered
    # A small limit splits between parts, never inside one.
    assert uid_sets([1, 2, 3, 7, 9, 10], limit=5) == ["1:3,7", "9:10"]
