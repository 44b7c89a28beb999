"""SMTP connections (aiosmtplib): verify a login now, send mail in a later step."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiosmtplib

from services.errors import AuthenticationFailed, MailError, PermanentMailError, TransientMailError
from services.mail.hosts import PinnedHost, connect_pinned_async, resolve_host


@dataclass(frozen=True)
class SmtpEndpoint:
    host: str
    port: int
    tls: str  # "ssl" | "starttls" | "none"
    username: str
    password: str


def _cause_of_type(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    for _ in range(5):  # a short chain: the wrapper and what it wraps
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def classify_smtp_error(exc: BaseException, what: str) -> MailError:
    """SMTP 4xx, network faults and timeouts are transient; 5xx and bad logins are not."""
    if isinstance(exc, MailError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return AuthenticationFailed(f"{what}: the SMTP server refused the login: {exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        message = f"{what}: the SMTP server answered {exc.code} {exc.message}"
        return TransientMailError(message) if 400 <= exc.code < 500 else PermanentMailError(message)
    cert_error = _cause_of_type(exc, ssl.SSLCertVerificationError)
    if cert_error is not None:  # aiosmtplib wraps a failed implicit-TLS handshake in SMTPConnectError
        return PermanentMailError(f"{what}: the SMTP server's TLS certificate is not valid: {cert_error}")
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return TransientMailError(f"{what}: timed out talking to the SMTP server")
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, OSError)):
        return TransientMailError(f"{what}: SMTP connection failed: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException):
        return PermanentMailError(f"{what}: {exc}")
    return PermanentMailError(f"{what}: {type(exc).__name__}: {exc}")


async def connect_smtp(pinned: PinnedHost, endpoint: SmtpEndpoint, *, timeout: float) -> aiosmtplib.SMTP:
    """An SMTP client connected to a pinned address, TLS negotiated as configured.

    aiosmtplib is handed a socket already connected to the pinned address (no lookup of its
    own) and the host name: it uses ``hostname`` as ``server_hostname`` for implicit TLS
    and for STARTTLS, so the certificate is checked against the name and SNI carries it."""
    sock = await connect_pinned_async(pinned, timeout)
    client = aiosmtplib.SMTP(
        hostname=pinned.name,
        sock=sock,
        use_tls=endpoint.tls == "ssl",
        start_tls=endpoint.tls == "starttls",
        timeout=timeout,
        tls_context=ssl.create_default_context() if endpoint.tls != "none" else None,
    )
    try:
        await client.connect()
    except BaseException:
        client.close()
        sock.close()  # aiosmtplib owns the socket only once its transport exists
        raise
    return client


async def _verify(pinned: PinnedHost, endpoint: SmtpEndpoint, timeout: float) -> list[str]:
    client = await connect_smtp(pinned, endpoint, timeout=timeout)
    try:
        if client.last_ehlo_response is None:  # connect() greets only when it negotiated TLS
            await client.ehlo()
        extensions = sorted(client.esmtp_extensions)
        if endpoint.username:
            await client.login(endpoint.username, endpoint.password)
        return extensions
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()


def verify_smtp(endpoint: SmtpEndpoint, *, timeout: float, allow_private: bool) -> list[str]:
    """Connect, negotiate TLS as configured, log in; return the server's ESMTP extensions.

    The host is resolved once and checked (:func:`resolve_host`); the connection goes to
    that answer, with the name kept for TLS."""
    pinned = resolve_host(
        endpoint.host, endpoint.port, allow_private=allow_private, field="smtp.host", tls=endpoint.tls
    )
    return verify_pinned_smtp(pinned, endpoint, timeout=timeout)


def verify_pinned_smtp(pinned: PinnedHost, endpoint: SmtpEndpoint, *, timeout: float) -> list[str]:
    """:func:`verify_smtp` for an already checked :class:`PinnedHost`."""
    try:
        return asyncio.run(_verify(pinned, endpoint, timeout))
    except Exception as exc:
        raise classify_smtp_error(exc, "SMTP login") from exc
