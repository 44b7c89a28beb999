"""The scoring parser reads what the rules and the model need wherever it falls: a blank line
past the first search window, a list footer on the first line, hidden text of each style in
the order it comes, links written in capitals."""

from __future__ import annotations

import pytest

from services.spam.features import strip_footers, words
from services.spam.parse import parse_message


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("head_bytes", [100, 8_189, 8_190, 8_191, 8_192, 24_570, 24_573, 24_576, 70_000])
def test_the_head_ends_at_the_first_blank_line_wherever_it_falls(newline: str, head_bytes: int) -> None:
    first = f"Subject: hello{newline}X-Pad: "
    pad = "p" * (head_bytes - len(first) - len(newline))
    head = (first + pad + newline).encode()
    assert len(head) == head_bytes
    # The body holds a blank line of the other style, which must not end the head.
    other = "\r\n\r\n" if newline == "\n" else "\n\n"
    raw = head + newline.encode() + f"body text{other}Subject: not a header{newline}".encode()
    parsed = parse_message(raw)
    assert parsed.header("subject") == "hello"
    assert parsed.header("x-pad") == pad
    assert parsed.text.startswith("body text")
    assert "not a header" in parsed.text


def test_a_head_without_blank_line_is_all_head() -> None:
    parsed = parse_message(b"Subject: only a head\r\n" + b"X-Pad: " + b"p" * 20_000 + b"\r\n")
    assert parsed.header("subject") == "only a head"
    assert parsed.text == ""


def test_list_footers_are_cut_on_the_first_line_and_later_ones() -> None:
    assert strip_footers("To unsubscribe from this group, send mail") == ""
    text = "Cheap meds here\nSponsored by: Yahoo\nbuy now"
    assert strip_footers(text) == "Cheap meds here\n"
    assert strip_footers("see ___ and " + "_" * 25 + " inline") == "see ___ and " + "_" * 25 + " inline"
    assert strip_footers("text\n" + "_" * 25 + "\nlist junk") == "text\n"
    assert "junk" not in words(strip_footers("text\n" + "_" * 25 + "  \nlist junk").lower())


def test_hidden_text_of_each_style_is_read_in_document_order() -> None:
    markup = (
        '<div style="font-size: 0px;">first hidden</div><p>shown</p>'
        '<span style="visibility:hidden">second hidden</span>'
        '<td style="display: none">third hidden</td>'
        '<div style="font-size: 12px;">not hidden</div>'
    )
    raw = f"Subject: x\r\nContent-Type: text/html\r\n\r\n<html><body>{markup}</body></html>".encode()
    assert parse_message(raw).hidden_text == "first hidden second hidden third hidden"


def test_links_in_text_are_found_in_any_case() -> None:
    raw = b"Subject: x\r\n\r\nGo to HTTP://Example.COM/a or Https://example.org/b, then http://example.net."
    assert parse_message(raw).urls == ["HTTP://Example.COM/a", "Https://example.org/b", "http://example.net"]
