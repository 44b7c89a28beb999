"""score_message as a whole: tenant layers learn only for their own tenant, sender lists
override the score, spamd joins as one indicator and its absence changes nothing."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from services.spam import (
    DEFAULT_THRESHOLD,
    LayerFormatError,
    SenderLists,
    SpamdClient,
    TenantLayer,
    score_message,
)
from services.spam.layer import MAX_DELTA, MAX_FEATURES
from services.spam.spamd import parse_reply
from tests.test_spam_rules import message

NEWSLETTER = message(
    "This week in gardening: tomatoes, late roses and how to keep slugs away from the beans.",
    sender="Garden Club <news@gardenclub.example>",
    subject="This week in the garden",
)
OTHER = message(
    "The quarterly figures are in the shared folder; the summary is on page two.",
    sender="Finance <finance@corp.example>",
    subject="Quarterly figures",
)


def test_verdict_is_a_probability_with_indicators() -> None:
    verdict = score_message(NEWSLETTER)
    assert 0.0 <= verdict.score <= 1.0
    names = [i.name for i in verdict.indicators]
    assert names[0] == "statistical_tokens"
    assert verdict.limits == ()
    assert verdict.is_spam(DEFAULT_THRESHOLD) == (verdict.score >= DEFAULT_THRESHOLD)


def test_learning_spam_moves_only_that_tenants_verdicts() -> None:
    tenant_a = TenantLayer()
    tenant_b = TenantLayer()
    before = score_message(NEWSLETTER).score
    assert before < DEFAULT_THRESHOLD

    tenant_a.learn(NEWSLETTER, is_spam=True)

    assert score_message(NEWSLETTER, layer=tenant_a).is_spam(DEFAULT_THRESHOLD)
    # Another tenant, and the base model, are untouched.
    assert score_message(NEWSLETTER, layer=tenant_b).score == pytest.approx(before)
    assert score_message(NEWSLETTER).score == pytest.approx(before)
    assert len(tenant_b) == 0
    detail = next(i.detail for i in score_message(NEWSLETTER, layer=tenant_a).indicators)
    assert "this tenant's lessons" in detail


def test_learning_ham_brings_a_message_back() -> None:
    spammy = message(
        "Act now! Limited offer: buy cheap watches, click here to order, free shipping, money back!",
        sender="Deals <deals@shop.example>",
        subject="Limited offer just for you",
    )
    assert score_message(spammy).is_spam(DEFAULT_THRESHOLD)
    layer = TenantLayer()
    layer.learn(spammy, is_spam=False)
    assert not score_message(spammy, layer=layer).is_spam(DEFAULT_THRESHOLD)


def test_learning_lands_on_the_tenants_own_threshold() -> None:
    strict = TenantLayer()
    strict.learn(NEWSLETTER, is_spam=True, threshold=0.95)
    assert score_message(NEWSLETTER, layer=strict).is_spam(0.95)


def test_a_lesson_is_bounded_and_mostly_about_that_message() -> None:
    layer = TenantLayer()
    for _ in range(5):
        layer.learn(NEWSLETTER, is_spam=True)
    assert all(abs(d) <= MAX_DELTA for d in layer.deltas.values())
    # A message about something else moves far less than the one that was taught.
    moved_other = abs(score_message(OTHER, layer=layer).score - score_message(OTHER).score)
    moved_taught = abs(score_message(NEWSLETTER, layer=layer).score - score_message(NEWSLETTER).score)
    assert moved_other < moved_taught


def test_layer_bytes_round_trip_and_stay_bounded() -> None:
    layer = TenantLayer()
    layer.learn(NEWSLETTER, is_spam=True)
    layer.learn(OTHER, is_spam=False)
    data = layer.to_bytes()
    again = TenantLayer.from_bytes(data)
    assert again == TenantLayer.from_bytes(again.to_bytes())
    assert again.to_bytes() == data
    assert score_message(NEWSLETTER, layer=again).score == pytest.approx(
        score_message(NEWSLETTER, layer=layer).score, abs=1e-4
    )
    assert TenantLayer.from_bytes(b"") == TenantLayer()
    big = TenantLayer({i: 0.5 + i * 1e-6 for i in range(MAX_FEATURES + 500)})
    big._prune()
    assert len(big) == MAX_FEATURES
    assert len(big.to_bytes()) <= 10 + 8 * MAX_FEATURES


@pytest.mark.parametrize(
    "data", [b"junk", b"MRTL1\n\x05\x00\x00\x00", b"MRTL1\n\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\xc0\x7f"]
)
def test_layer_refuses_foreign_bytes(data: bytes) -> None:
    with pytest.raises(LayerFormatError):
        TenantLayer.from_bytes(data)


def test_sender_lists_override_and_block_wins() -> None:
    blocked = score_message(NEWSLETTER, lists=SenderLists(block=frozenset({"gardenclub.example"})))
    assert blocked.score == 1.0
    assert blocked.indicators[0].name == "sender_blocked"
    assert blocked.indicators[0].detail == "gardenclub.example"

    spammy = message(
        "Cheap watches! Click here, limited offer, order now!", sender="Deals <d@mail.shop.example>"
    )
    allowed = score_message(spammy, lists=SenderLists(allow=frozenset({"shop.example"})))
    assert allowed.score == 0.0
    assert allowed.indicators[0].name == "sender_allowed"

    both = SenderLists(allow=frozenset({"d@mail.shop.example"}), block=frozenset({"shop.example"}))
    assert score_message(spammy, lists=both).score == 1.0
    unrelated = SenderLists(block=frozenset({"other.example"}), allow=frozenset({"x@other.example"}))
    assert score_message(spammy, lists=unrelated).score == score_message(spammy).score


# --- spamd -------------------------------------------------------------------------------------
# SpamAssassin is an outside program that may not be installed where the tests run; this
# stand-in speaks its spamc protocol (SPAMD/1.1 replies) on a real socket.


class _Spamd(socketserver.BaseRequestHandler):
    reply = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9.5 / 5.0\r\n\r\nHTML_MESSAGE,URIBL_BLOCKED"

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(4096)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"SYMBOLS SPAMC/1.5")
        length = int(head.split(b"Content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += self.request.recv(4096)
        self.request.sendall(self.reply)


@pytest.fixture
def spamd() -> Iterator[SpamdClient]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Spamd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SpamdClient.from_url(f"spamd://127.0.0.1:{server.server_address[1]}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_spamd_joins_as_one_indicator(spamd: SpamdClient) -> None:
    plain = score_message(NEWSLETTER)
    verdict = score_message(NEWSLETTER, spamd=spamd)
    sa = [i for i in verdict.indicators if i.name == "spamassassin"]
    assert len(sa) == 1
    assert sa[0].weight > 0
    assert sa[0].detail.startswith("9.5/5 HTML_MESSAGE,URIBL_BLOCKED")
    assert verdict.score > plain.score
    assert [i for i in verdict.indicators if i.name != "spamassassin"] == list(plain.indicators)


def test_unreachable_spamd_changes_nothing() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = SpamdClient("127.0.0.1", port, timeout=0.5)
    assert score_message(NEWSLETTER, spamd=client) == score_message(NEWSLETTER)


@pytest.mark.parametrize(
    "reply",
    [
        b"",
        b"garbage",
        b"SPAMD/1.1 76 EX_PROTOCOL\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; x / y\r\n\r\n",
    ],
)
def test_spamd_replies_that_are_not_a_score(reply: bytes) -> None:
    assert parse_reply(reply) is None


def test_spamd_address_forms() -> None:
    assert (
        SpamdClient.from_url("spamd://sa.internal:7830").port,
        SpamdClient.from_url("sa.internal").port,
    ) == (
        7830,
        783,
    )
    with pytest.raises(ValueError):
        SpamdClient.from_url("spamd://:783")
