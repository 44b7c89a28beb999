"""IMAP connections for every task that reads a mailbox (verify, sync, fetch a body)."""

from __future__ import annotations

import ast
import imaplib
import re
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import imapclient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from services.errors import AuthenticationFailed, MailError, PermanentMailError, TransientMailError
from services.mail.hosts import PinnedHost, connect_pinned, resolve_host
from services.mail.tls import mismatch_message, tls_mismatch


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
    return _classify_imap(exc, what, server_text(exc))


#: A Python bytes literal inside an error's text: imaplib puts the server's words in its
#: errors as bytes (``b'[AUTHENTICATIONFAILED] ...'``, ``BAD [b'...']``) and imapclient
#: passes on ``str()`` of them.
_BYTES_LITERAL = re.compile(r"(?<!\w)b'(?:[^'\\]|\\.)*'" + r'|(?<!\w)b"(?:[^"\\]|\\.)*"')


def _decoded(literal: re.Match[str]) -> str:
    try:
        raw = ast.literal_eval(literal.group(0))
    except (ValueError, SyntaxError):
        return literal.group(0)
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else literal.group(0)


def server_text(exc: BaseException) -> str:
    """``exc``'s text with the server's words as text, not as Python bytes notation."""
    if len(exc.args) == 1 and isinstance(exc.args[0], bytes):
        return exc.args[0].decode("utf-8", "replace")
    return _BYTES_LITERAL.sub(_decoded, str(exc))


def _classify_imap(exc: BaseException, what: str, text: str) -> MailError:
    if isinstance(exc, LoginError):
        return AuthenticationFailed(f"{what}: the IMAP server refused the login: {text}").tagged(
            "imap", "auth"
        )
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransientMailError(f"{what}: timed out talking to the IMAP server").tagged("imap", "timeout")
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = f"{what}: the IMAP server's TLS certificate is not valid: {text}"
        return PermanentMailError(message).tagged("imap", "tls")
    mismatch = tls_mismatch(exc)
    if mismatch is not None:
        return PermanentMailError(mismatch_message(what, "IMAP", mismatch)).tagged("imap", "tls")
    if isinstance(exc, (ConnectionError, OSError, IMAPClientAbortError)):
        message = f"{what}: IMAP connection failed: {text or type(exc).__name__}"
        return TransientMailError(message).tagged("imap", "connect")
    if isinstance(exc, IMAPClientError):
        upper = text.upper()
        if any(code in upper for code in ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]", "[SERVERBUG]")):
            message = f"{what}: the IMAP server is unavailable: {text}"
            return TransientMailError(message).tagged("imap", "unavailable")
        if "[AUTHENTICATIONFAILED]" in upper or "[AUTHORIZATIONFAILED]" in upper:
            message = f"{what}: the IMAP server refused the login: {text}"
            return AuthenticationFailed(message).tagged("imap", "auth")
        return PermanentMailError(f"{what}: the IMAP server answered: {text}").tagged("imap", "rejected")
    return PermanentMailError(f"{what}: {type(exc).__name__}: {text}").tagged("imap", "other")


def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _PinnedIMAP4(imaplib.IMAP4):
    """imaplib's connection, made to a pinned address: ``self.host`` stays the name, so
    implicit TLS here and imaplib's STARTTLS both check the certificate against the name
    and send it as SNI."""

    def __init__(self, pinned: PinnedHost, timeout: float | None, ssl_context: ssl.SSLContext | None) -> None:
        self._pinned = pinned
        self._connect_timeout = timeout
        self._implicit_tls = ssl_context
        super().__init__(pinned.name, pinned.port, timeout=timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = connect_pinned(self._pinned, timeout if timeout is not None else self._connect_timeout)
        if self._implicit_tls is None:
            return sock
        try:
            return self._implicit_tls.wrap_socket(sock, server_hostname=self._pinned.name)
        except BaseException:
            sock.close()
            raise


class PinnedIMAPClient(imapclient.IMAPClient):
    """An IMAPClient whose connection goes to a :class:`PinnedHost`'s addresses, never to a
    second lookup of the name."""

    def __init__(self, pinned: PinnedHost, *, ssl_context: ssl.SSLContext | None, timeout: float) -> None:
        self._pinned = pinned
        super().__init__(
            pinned.name,
            port=pinned.port,
            ssl=ssl_context is not None,
            ssl_context=ssl_context,
            timeout=timeout,
            use_uid=True,
        )

    def _create_IMAP4(self) -> imaplib.IMAP4:  # imapclient's hook for making the connection
        connect_timeout = getattr(self._timeout, "connect", None)
        return _PinnedIMAP4(self._pinned, connect_timeout, self.ssl_context if self.ssl else None)


@contextmanager
def imap_session(
    endpoint: ImapEndpoint, *, timeout: float, allow_private: bool
) -> Iterator[imapclient.IMAPClient]:
    """A logged-in IMAP client; faults come out as transient or permanent Mailroom errors.

    The host is resolved once and checked (:func:`resolve_host`); the connection goes to
    that answer, with the name kept for TLS."""
    pinned = resolve_host(
        endpoint.host, endpoint.port, allow_private=allow_private, field="imap.host", tls=endpoint.tls
    )
    with pinned_imap_session(pinned, endpoint, timeout=timeout) as client:
        yield client


def login_pinned(pinned: PinnedHost, endpoint: ImapEndpoint, *, timeout: float) -> imapclient.IMAPClient:
    """A client connected to ``pinned`` (TLS as ``endpoint`` says) and logged in; the
    caller closes it. Faults come out classified, as for :func:`imap_session`."""
    client: imapclient.IMAPClient | None = None
    try:
        client = PinnedIMAPClient(
            pinned, ssl_context=_tls_context() if endpoint.tls == "ssl" else None, timeout=timeout
        )
        if endpoint.tls == "starttls":
            client.starttls(_tls_context())
        client.login(endpoint.username, endpoint.password)
    except Exception as exc:
        _close(client)
        raise classify_imap_error(exc, "login") from exc
    return client


@contextmanager
def pinned_imap_session(
    pinned: PinnedHost, endpoint: ImapEndpoint, *, timeout: float
) -> Iterator[imapclient.IMAPClient]:
    """:func:`imap_session` for an already checked :class:`PinnedHost`."""
    client = login_pinned(pinned, endpoint, timeout=timeout)
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
