"""TLS over a pinned connection still checks the certificate against the host name and
sends it as SNI, for IMAP (implicit TLS and STARTTLS) and SMTP (implicit TLS and STARTTLS).

A real TLS layer sits in front of real servers: a TLS-terminating relay to the session's
Dovecot, an in-process aiosmtpd. Certificates come from a throw-away CA made here, trusted
through ``SSL_CERT_FILE`` (which ``ssl.create_default_context()`` reads), and carry only a
DNS name, no IP address: a client that checked against the pinned address would fail.
"""

from __future__ import annotations

import datetime as dt
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

from services.errors import PermanentMailError
from services.mail.hosts import pin
from services.mail.imap import ImapEndpoint, pinned_imap_session
from services.mail.smtp import SmtpEndpoint, verify_pinned_smtp
from tests.servers.dovecot import DovecotServer
from tests.servers.ports import free_port
from tests.servers.smtp import SmtpServer


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
    """TLS on a free port, relayed in plain text to a real server (Dovecot). Implicit TLS,
    or with ``starttls`` an IMAP greeting that offers STARTTLS and answers CAPABILITY and
    STARTTLS itself, then relays the TLS session to Dovecot (whose own greeting is
    swallowed, as the client had its greeting already)."""

    def __init__(self, context: ssl.SSLContext, target: tuple[str, int], *, starttls: bool = False) -> None:
        self.context, self.target, self.starttls = context, target, starttls
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
            if self.starttls:
                self._plain_prelude(raw)
            client = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        upstream = socket.create_connection(self.target)
        if self.starttls:
            upstream.makefile("rb").readline()  # Dovecot's greeting
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)

    @staticmethod
    def _plain_prelude(raw: socket.socket) -> None:
        raw.sendall(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] relay ready\r\n")
        lines = raw.makefile("rb")
        while line := lines.readline():
            tag, command = line.decode().split()[:2]
            if command.upper() == "STARTTLS":
                raw.sendall(f"{tag} OK begin TLS\r\n".encode())
                return
            raw.sendall(f"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n{tag} OK done\r\n".encode())
        raise OSError("client left before STARTTLS")

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


def test_imap_starttls_checks_the_name_on_the_pinned_connection(
    pki: Pki, dovecot: DovecotServer, mailbox_user: tuple[str, str]
) -> None:
    context = pki.server_context("localhost")
    sni = SniLog(context)
    relay = TlsRelay(context, (dovecot.host, dovecot.port), starttls=True)
    try:
        endpoint = ImapEndpoint("localhost", relay.port, "starttls", *mailbox_user)
        with pinned_imap_session(pin("localhost", relay.port, ["127.0.0.1"]), endpoint, timeout=5) as client:
            assert client.socket().getpeername()[0] == "127.0.0.1"
            client.noop()  # logged in to Dovecot through the upgraded connection
        assert sni.names == ["localhost"]
        other = ImapEndpoint("pinned.invalid", relay.port, "starttls", *mailbox_user)
        pinned = pin("pinned.invalid", relay.port, ["127.0.0.1"])
        with (
            pytest.raises(PermanentMailError, match="certificate"),
            pinned_imap_session(pinned, other, timeout=5),
        ):
            pass
    finally:
        relay.close()


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


def test_ssl_against_a_plain_port_fails_at_once_naming_the_setting(
    dovecot: DovecotServer, smtp: SmtpServer, mailbox_user: tuple[str, str]
) -> None:
    """``tls: ssl`` against the plain ports of the test Dovecot and aiosmtpd: OpenSSL's
    WRONG_VERSION_NUMBER is a configuration error, permanent (no retries for minutes), and
    the message says which setting to check."""
    imap = ImapEndpoint("127.0.0.1", dovecot.port, "ssl", *mailbox_user)
    with (
        pytest.raises(PermanentMailError) as imap_error,
        pinned_imap_session(pin("127.0.0.1", dovecot.port, ["127.0.0.1"]), imap, timeout=5),
    ):
        pass
    smtp_endpoint = SmtpEndpoint("127.0.0.1", smtp.port, "ssl", "smtpuser", "smtppass")
    with pytest.raises(PermanentMailError) as smtp_error:
        verify_pinned_smtp(pin("127.0.0.1", smtp.port, ["127.0.0.1"]), smtp_endpoint, timeout=5)
    for caught, field in ((imap_error, "imap.tls"), (smtp_error, "smtp.tls")):
        assert not caught.value.transient and caught.value.kind == "tls"
        assert "WRONG_VERSION_NUMBER" in caught.value.message
        assert f"check the account's {field} setting" in caught.value.message
