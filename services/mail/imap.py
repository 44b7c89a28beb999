"""IMAP connections for every task that reads a mailbox (verify, sync, fetch a body)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import imapclient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from services.errors import AuthenticationFailed, MailError, PermanentMailError, TransientMailError
from services.mail.hosts import check_host


@dataclass(frozen=True)
class ImapEndpoint:
    host: str
    port: int
    tls: str  # "ssl" | "starttls" | "none"
    username: str
    password: str


def classify_imap_error(exc: BaseException, what: str) -> MailError:
    """Turn a low-level IMAP or socket fault into a transient or permanent Mailroom error."""
    if isinstance(exc, MailError):
        return exc
    text = str(exc)
    if isinstance(exc, LoginError):
        return AuthenticationFailed(f"{what}: the IMAP server refused the login: {text}")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransientMailError(f"{what}: timed out talking to the IMAP server")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return PermanentMailError(f"{what}: the IMAP server's TLS certificate is not valid: {text}")
    if isinstance(exc, (ConnectionError, OSError, IMAPClientAbortError)):
        return TransientMailError(f"{what}: IMAP connection failed: {text or type(exc).__name__}")
    if isinstance(exc, IMAPClientError):
        upper = text.upper()
        if any(code in upper for code in ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]", "[SERVERBUG]")):
            return TransientMailError(f"{what}: the IMAP server is unavailable: {text}")
        if "[AUTHENTICATIONFAILED]" in upper or "[AUTHORIZATIONFAILED]" in upper:
            return AuthenticationFailed(f"{what}: the IMAP server refused the login: {text}")
        return PermanentMailError(f"{what}: the IMAP server answered: {text}")
    return PermanentMailError(f"{what}: {type(exc).__name__}: {text}")


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


@contextmanager
def imap_session(
    endpoint: ImapEndpoint, *, timeout: float, allow_private: bool
) -> Iterator[imapclient.IMAPClient]:
    """A logged-in IMAP client; faults come out as transient or permanent Mailroom errors."""
    check_host(endpoint.host, endpoint.port, allow_private=allow_private, field="imap_host")
    client: imapclient.IMAPClient | None = None
    try:
        client = imapclient.IMAPClient(
            endpoint.host,
            port=endpoint.port,
            ssl=endpoint.tls == "ssl",
            ssl_context=_tls_context() if endpoint.tls == "ssl" else None,
            timeout=timeout,
            use_uid=True,
        )
        if endpoint.tls == "starttls":
            client.starttls(_tls_context())
        client.login(endpoint.username, endpoint.password)
    except Exception as exc:
        _close(client)
        raise classify_imap_error(exc, "login") from exc
    try:
        yield client
    except (IMAPClientError, OSError) as exc:
        raise classify_imap_error(exc, "IMAP") from exc
    finally:
        _close(client)


def _close(client: imapclient.IMAPClient | None) -> None:
    if client is None:
        return
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - the connection may already be gone
        try:
            client.shutdown()
        except Exception:  # noqa: BLE001
            pass


def capabilities(client: imapclient.IMAPClient) -> list[str]:
    return sorted(c.decode() if isinstance(c, bytes) else str(c) for c in client.capabilities())
