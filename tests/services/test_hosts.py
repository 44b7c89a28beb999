"""The mail-host guard: which addresses are refused, that a connection goes to the address
that was checked (no second lookup), and that TLS still checks the host name.

IMAP runs against the session's real Dovecot, SMTP against the session's aiosmtpd. The TLS
tests put a real TLS layer in front of them (a TLS-terminating relay to Dovecot, an
in-process aiosmtpd with STARTTLS or implicit TLS), with a throw-away CA made here and
trusted through ``SSL_CERT_FILE``, which ``ssl.create_default_context()`` reads.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.errors import MailError, PermanentMailError, ValidationFailed
from services.mail.hosts import is_public_address, pin, resolve_host
from services.mail.imap import ImapEndpoint, imap_session, pinned_imap_session
from services.mail.smtp import SmtpEndpoint, verify_pinned_smtp, verify_smtp
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port
from tests.servers.smtp import SmtpServer

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
    assert caught.value.details == {"field": "imap.host"}
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
    assert caught.value.details == {"field": "smtp.tls"}
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
    assert caught.value.details == {"field": "imap.host"}
    with pytest.raises(ValidationFailed) as caught:
        verify_smtp(SmtpEndpoint("8.8.8.8", 25, "none", "", ""), timeout=2, allow_private=True)
    assert caught.value.details == {"field": "smtp.tls"}


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


# --- TLS keeps the name ----------------------------------------------------------------------


class Pki:
    """A throw-away CA and server certificates for one DNS name each (no IP address SANs,
    so a client that checked against the pinned address instead of the name would fail)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mailroom test CA")])
        now = dt.datetime.now(dt.UTC)
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def server_context(self, dns_name: str) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        cert_file = self.dir / f"{dns_name}.pem"
        key_file = self.dir / f"{dns_name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        return context


class SniLog:
    """Records the server name each TLS client sent."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.names: list[str | None] = []
        context.sni_callback = self._seen

    def _seen(self, sock: Any, name: str | None, context: Any) -> None:
        self.names.append(name)


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Pki:
    authority = Pki(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.ca_file))  # read by create_default_context()
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return authority


class TlsRelay:
    """Implicit TLS on a free port, relayed in plain text to a real server (Dovecot)."""

    def __init__(self, context: ssl.SSLContext, target: tuple[str, int]) -> None:
        self.context, self.target = context, target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(raw,), daemon=True).start()

    def _relay(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        upstream = socket.create_connection(self.target)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    def close(self) -> None:
        self.listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def imap_tls(pki: Pki, dovecot: DovecotServer) -> Iterator[tuple[TlsRelay, SniLog]]:
    context = pki.server_context("localhost")
    sni = SniLog(context)
    relay = TlsRelay(context, (dovecot.host, dovecot.port))
    yield relay, sni
    relay.close()


def test_imap_tls_checks_the_name_on_the_pinned_connection(
    imap_tls: tuple[TlsRelay, SniLog], mailbox_user: tuple[str, str]
) -> None:
    relay, sni = imap_tls
    pinned = pin("localhost", relay.port, ["127.0.0.1"])
    endpoint = ImapEndpoint("localhost", relay.port, "ssl", *mailbox_user)
    with pinned_imap_session(pinned, endpoint, timeout=5) as client:
        assert client.socket().getpeername()[0] == "127.0.0.1"
        client.noop()
    assert sni.names == ["localhost"]


def test_imap_tls_refuses_a_certificate_for_another_name(
    pki: Pki, dovecot: DovecotServer, mailbox_user: tuple[str, str]
) -> None:
    relay = TlsRelay(pki.server_context("mail.elsewhere.test"), (dovecot.host, dovecot.port))
    try:
        endpoint = ImapEndpoint("localhost", relay.port, "ssl", *mailbox_user)
        pinned = pin("localhost", relay.port, ["127.0.0.1"])
        with (
            pytest.raises(PermanentMailError, match="certificate"),
            pinned_imap_session(pinned, endpoint, timeout=5),
        ):
            pass
    finally:
        relay.close()


class _Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # pragma: no cover
        return "250 OK"


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_smtp_tls_checks_the_name_on_the_pinned_connection(pki: Pki, mode: str) -> None:
    context = pki.server_context("localhost")
    sni = SniLog(context)
    port = free_port()
    options: dict[str, Any] = {"ssl_context": context} if mode == "ssl" else {"tls_context": context}
    controller = Controller(_Accept(), hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        sni.names.clear()  # the controller's own readiness probe
        endpoint = SmtpEndpoint("localhost", port, mode, "", "")
        extensions = verify_pinned_smtp(pin("localhost", port, ["127.0.0.1"]), endpoint, timeout=5)
        assert extensions
        assert sni.names == ["localhost"]
        # The same server under a name its certificate does not carry is refused.
        other = SmtpEndpoint("pinned.invalid", port, mode, "", "")
        with pytest.raises(PermanentMailError, match="certificate"):
            verify_pinned_smtp(pin("pinned.invalid", port, ["127.0.0.1"]), other, timeout=5)
    finally:
        controller.stop()
