"""The base model's features: what of a message becomes a token, and what is left out."""

from __future__ import annotations

from zlib import crc32

from services.spam.features import HASH_MASK, NS_URL_DOMAIN, NS_URL_LABEL, base_features, is_public_ip
from services.spam.parse import parse_message


def feature(token: str, ns: int) -> int:
    return crc32(token.encode(), ns) & HASH_MASK


def features_of_link(href: str) -> set[int]:
    raw = (
        "From: a@example.org\r\nSubject: x\r\nContent-Type: text/html\r\n\r\n"
        f'<html><body><a href="{href}">here</a></body></html>'
    ).encode()
    return base_features(parse_message(raw))


def test_link_host_labels_are_tokens_but_not_mailing_list_servers() -> None:
    feats = features_of_link("https://secure-login.docs.example.com/x")
    assert {feature("secure-login", NS_URL_LABEL), feature("docs", NS_URL_LABEL)} <= feats
    assert feature("example.com", NS_URL_DOMAIN) in feats
    listy = features_of_link("https://lists.example.org/mailman/listinfo/dev")
    assert feature("lists", NS_URL_LABEL) not in listy
    assert feature("example", NS_URL_LABEL) in listy


def test_only_public_addresses_count_as_ip_links() -> None:
    assert feature("ip-host", NS_URL_DOMAIN) in features_of_link("http://45.61.136.7/login")
    assert feature("ip-host", NS_URL_DOMAIN) not in features_of_link("http://192.168.1.1/cgi-bin/luci")
    assert is_public_ip("203.0.113.7")
    assert not any(
        is_public_ip(h) for h in ("10.0.0.1", "127.0.0.1", "172.31.9.9", "169.254.1.1", "100.64.0.1")
    )
