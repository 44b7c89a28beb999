"""The mail-host guard: which addresses are refused, and that a connection goes to the
address that was checked (no second lookup). IMAP runs against the session's real Dovecot,
SMTP against the session's aiosmtpd. TLS over pinned connections: test_hosts_tls.py.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from services.errors import MailError, ValidationFailed
from services.mail.hosts import is_public_address, pin, resolve_host
from services.mail.imap import ImapEndpoint, imap_session, pinned_imap_session
from services.mail.smtp import SmtpEndpoint, verify_pinned_smtp, verify_smtp
from tests.servers.dovecot import DovecotServer
from tests.servers.smtp import SmtpServer
from tests.support import fields_of

REFUSED = [
    "100.64.0.1",  # carrier-grade NAT
    "100.127.255.254",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "127.0.0.1",
    "0.0.0.0",
    "192.0.0.1",
    "192.0.0.9",
    "198.18.0.1",
    "198.19.255.255",
    "240.0.0.1",
    "255.255.255.255",
    "224.0.0.1",  # multicast
    "239.255.255.250",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fe80::1%1",
    "fec0::1",  # site-local
    "ff02::1",  # multicast
    "::ffff:10.0.0.1",  # v4-mapped private
    "::ffff:127.0.0.1",
    "::a00:1",  # v4-compatible
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::6440:1",  # NAT64 of 100.64.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64
    "2002:a00:1::",  # 6to4 of 10.0.0.1
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2001:0:4136:e378::1",  # Teredo
    "2001:db8::1",  # documentation
]
ACCEPTED = [
    "8.8.8.8",
    "1.1.1.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_non_global_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)
    with pytest.raises(ValidationFailed) as caught:
        resolve_host(address.split("%", maxsplit=1)[0], 993, allow_private=False, field="imap.host")
    assert fields_of(caught.value.details) == ["imap.host"]
    assert "private or loopback" in caught.value.message
    # Allowed when the operator says so, and still pinned to the literal.
    literal = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
    pinned = resolve_host(str(literal), 993, allow_private=True, field="imap.host")
    assert [ipaddress.ip_address(a) for a in pinned.addresses] == [literal]


@pytest.mark.parametrize("address", ACCEPTED)
def test_public_addresses_are_accepted(address: str) -> None:
    assert is_public_address(address)
    pinned = resolve_host(address, 465, allow_private=False, field="smtp.host", tls="ssl")
    assert pinned.name == address and pinned.port == 465 and len(pinned.addresses) == 1


def test_plain_text_only_for_non_public_hosts() -> None:
    with pytest.raises(ValidationFailed) as caught:
        resolve_host("8.8.8.8", 25, allow_private=True, field="smtp.host", tls="none")
    assert fields_of(caught.value.details) == ["smtp.tls"]
    assert resolve_host("127.0.0.1", 25, allow_private=True, field="smtp.host", tls="none").addresses == [
        "127.0.0.1"
    ]


def test_task_time_connections_apply_the_same_rules(dovecot: DovecotServer, smtp: SmtpServer) -> None:
    """The worker's connections go through resolve_host too: a stored account pointing at a
    private host is refused when private hosts are off, and plain text to a public address
    is refused before any packet is sent."""
    imap = ImapEndpoint("127.0.0.1", dovecot.port, "none", "u", "p")
    with pytest.raises(ValidationFailed) as caught, imap_session(imap, timeout=2, allow_private=False):
        pass
    assert fields_of(caught.value.details) == ["imap.host"]
    with pytest.raises(ValidationFailed) as caught:
        verify_smtp(SmtpEndpoint("8.8.8.8", 25, "none", "", ""), timeout=2, allow_private=True)
    assert fields_of(caught.value.details) == ["smtp.tls"]


# --- the connection goes to the checked address ---------------------------------------------


class RebindingResolver:
    """A DNS stand-in that answers a name once with the real server and afterwards with an
    address where nothing listens, as a rebinding attacker's DNS does."""

    def __init__(self, name: str, first: str, later: str) -> None:
        self.name, self.first, self.later = name, first, later
        self.lookups = 0
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.name:
            return self.real(host, port, *args, **kwargs)
        self.lookups += 1
        address = self.first if self.lookups == 1 else self.later
        return self.real(address, port, *args, **kwargs)


def test_imap_connects_to_the_address_it_checked(
    dovecot: DovecotServer, mailbox_user: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = RebindingResolver("mail.rebind.test", "127.0.0.1", "127.0.0.2")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    endpoint = ImapEndpoint("mail.rebind.test", dovecot.port, "none", *mailbox_user)
    with imap_session(endpoint, timeout=5, allow_private=True) as client:
        assert client.socket().getpeername()[0] == "127.0.0.1"
        assert client.host == "mail.rebind.test"
        client.noop()
    assert resolver.lookups == 1


def test_smtp_connects_to_the_address_it_checked(smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = RebindingResolver("mail.rebind.test", "127.0.0.1", "127.0.0.2")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    endpoint = SmtpEndpoint("mail.rebind.test", smtp.port, "none", "smtpuser", "smtppass")
    assert "auth" in verify_smtp(endpoint, timeout=5, allow_private=True)
    assert resolver.lookups == 1


def test_rebinding_to_a_private_address_after_the_check_does_not_reach_it(
    dovecot: DovecotServer, smtp: SmtpServer, mailbox_user: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack itself, private hosts refused: the name first answers with a public
    address (the check passes), then with the real servers on loopback. The connection must
    go to the public address it checked (which fails here), never to the servers."""
    resolver = RebindingResolver("mail.rebind.test", "8.8.8.8", "127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    imap = ImapEndpoint("mail.rebind.test", dovecot.port, "ssl", *mailbox_user)
    with pytest.raises(MailError), imap_session(imap, timeout=2, allow_private=False):
        pass
    assert resolver.lookups == 1
    resolver = RebindingResolver("mail.rebind.test", "8.8.8.8", "127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    smtp_endpoint = SmtpEndpoint("mail.rebind.test", smtp.port, "ssl", "smtpuser", "smtppass")
    with pytest.raises(MailError):
        verify_smtp(smtp_endpoint, timeout=2, allow_private=False)
    assert resolver.lookups == 1


def test_pinned_address_is_used_even_when_the_name_resolves_elsewhere(
    dovecot: DovecotServer, smtp: SmtpServer, mailbox_user: tuple[str, str]
) -> None:
    """A name that does not resolve at all, pinned to the real servers: the connection
    can only work if nothing looks the name up again."""
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("pinned.invalid", 143)
    imap = ImapEndpoint("pinned.invalid", dovecot.port, "none", *mailbox_user)
    with pinned_imap_session(pin("pinned.invalid", dovecot.port, ["127.0.0.1"]), imap, timeout=5) as client:
        assert client.socket().getpeername()[0] == "127.0.0.1"
    endpoint = SmtpEndpoint("pinned.invalid", smtp.port, "none", "smtpuser", "smtppass")
    assert "auth" in verify_pinned_smtp(pin("pinned.invalid", smtp.port, ["127.0.0.1"]), endpoint, timeout=5)


def test_real_lookup_of_localhost_is_pinned(dovecot: DovecotServer, mailbox_user: tuple[str, str]) -> None:
    pinned = resolve_host("localhost", dovecot.port, allow_private=True, field="imap.host", tls="none")
    assert pinned.addresses and all(not is_public_address(a) for a in pinned.addresses)
    imap = ImapEndpoint("localhost", dovecot.port, "none", *mailbox_user)
    with pinned_imap_session(pinned, imap, timeout=5) as client:
        assert client.socket().getpeername()[0] in pinned.addresses
