"""SMTP connections (aiosmtplib): verify a login, and send mail over connections a worker
process reuses per account (bounded by idle time and messages per connection)."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from dataclasses import dataclass, field

import aiosmtplib

from services.errors import AuthenticationFailed, MailError, PermanentMailError, TransientMailError
from services.mail.hosts import PinnedHost, connect_pinned_async, resolve_host
from services.mail.tls import mismatch_message, tls_mismatch


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


#: What a conversation with an SMTP server raises when the server or the network is at
#: fault; anything else out of a send or a verify is a bug of ours, left unclassified so that
#: the task ends ``internal_error`` (tasks.lifecycle) instead of blaming the server.
SMTP_FAULTS: tuple[type[BaseException], ...] = (MailError, aiosmtplib.SMTPException, OSError, TimeoutError)


def classify_smtp_error(exc: BaseException, what: str) -> MailError:
    """SMTP 4xx, network faults and timeouts are transient; 5xx and bad logins are not.
    ``exc`` is one of :data:`SMTP_FAULTS`."""
    if isinstance(exc, MailError):
        return exc
    return _classify_smtp(exc, what)


def _classify_smtp(exc: BaseException, what: str) -> MailError:
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        message = f"{what}: the SMTP server refused the login: {exc.code} {exc.message}"
        return AuthenticationFailed(message).tagged("smtp", "auth")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        message = f"{what}: the SMTP server answered {exc.code} {exc.message}"
        if 400 <= exc.code < 500:
            return TransientMailError(message).tagged("smtp", "smtp_4xx")
        return PermanentMailError(message).tagged("smtp", "smtp_5xx")
    cert_error = _cause_of_type(exc, ssl.SSLCertVerificationError)
    if cert_error is not None:  # aiosmtplib wraps a failed implicit-TLS handshake in SMTPConnectError
        message = f"{what}: the SMTP server's TLS certificate is not valid: {cert_error}"
        return PermanentMailError(message).tagged("smtp", "tls")
    mismatch = tls_mismatch(exc)
    if mismatch is not None:
        return PermanentMailError(mismatch_message(what, "SMTP", mismatch)).tagged("smtp", "tls")
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return TransientMailError(f"{what}: timed out talking to the SMTP server").tagged("smtp", "timeout")
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, OSError)):
        return TransientMailError(f"{what}: SMTP connection failed: {exc}").tagged("smtp", "connect")
    return PermanentMailError(f"{what}: {exc}").tagged("smtp", "other")


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
    except SMTP_FAULTS as exc:
        raise classify_smtp_error(exc, "SMTP login") from exc


# --- sending --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendOutcome:
    """What the server answered: its reply to DATA, and recipients it refused while it
    accepted others (address → "code text")."""

    reply: str
    refused: dict[str, str]


@dataclass
class _Pooled:
    client: aiosmtplib.SMTP
    opened: float
    used: float
    sent: int = 0


#: Before a connection idle longer than this is used again, a NOOP checks it is still alive
#: (a server's own idle timeout may have closed it); fresher ones go straight to MAIL.
NOOP_AFTER_IDLE = 2.0


@dataclass
class SmtpPool:
    """One process's SMTP connections, one per key (account and endpoint), reused for the
    account's next message. A connection idle longer than ``idle_seconds`` or that carried
    ``max_messages`` is closed; any fault closes it too, so a broken one is never reused.
    Not thread-safe: :func:`process_pool` gives each thread its own."""

    idle_seconds: float
    max_messages: int
    _conns: dict[tuple[object, ...], _Pooled] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None

    def run(self, coro: object) -> object:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)  # type: ignore[arg-type]

    def send(
        self,
        key: tuple[object, ...],
        pinned: PinnedHost,
        endpoint: SmtpEndpoint,
        *,
        timeout: float,
        sender: str,
        recipients: list[str],
        raw: bytes,
    ) -> SendOutcome:
        """Send ``raw`` unchanged to ``recipients``. Raises a transient or permanent
        :class:`MailError`; all recipients refused is one error listing each of them."""
        try:
            return self.run(self._send(key, pinned, endpoint, timeout, sender, recipients, raw))  # type: ignore[return-value]
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = {r.recipient: f"{r.code} {r.message}" for r in exc.recipients}
            transient = all(400 <= r.code < 500 for r in exc.recipients)
            kind = TransientMailError if transient else PermanentMailError
            first = exc.recipients[0] if exc.recipients else None
            text = f"{first.code} {first.message}" if first else "no recipient accepted"
            raise kind(
                f"send: the SMTP server refused every recipient: {text}", details={"refused": refused}
            ) from exc
        except SMTP_FAULTS as exc:
            raise classify_smtp_error(exc, "send") from exc

    async def _send(
        self,
        key: tuple[object, ...],
        pinned: PinnedHost,
        endpoint: SmtpEndpoint,
        timeout: float,
        sender: str,
        recipients: list[str],
        raw: bytes,
    ) -> SendOutcome:
        pooled = await self._checkout(key, pinned, endpoint, timeout)
        try:
            refused, reply = await pooled.client.sendmail(sender, recipients, raw)
        except BaseException:
            self._drop(key)
            raise
        pooled.sent += 1
        pooled.used = time.monotonic()
        if pooled.sent >= self.max_messages:
            await self._quit(key)
        return SendOutcome(reply=reply, refused={k: f"{v.code} {v.message}" for k, v in refused.items()})

    async def _checkout(
        self, key: tuple[object, ...], pinned: PinnedHost, endpoint: SmtpEndpoint, timeout: float
    ) -> _Pooled:
        now = time.monotonic()
        for stale_key, stale in list(self._conns.items()):
            if now - stale.used > self.idle_seconds:
                await self._quit(stale_key)
        pooled = self._conns.get(key)
        if pooled is not None and now - pooled.used > NOOP_AFTER_IDLE:
            try:
                await pooled.client.noop()
            except (aiosmtplib.SMTPException, OSError):
                self._drop(key)
                pooled = None
        if pooled is None:
            client = await connect_smtp(pinned, endpoint, timeout=timeout)
            try:
                if client.last_ehlo_response is None:
                    await client.ehlo()
                if endpoint.username:
                    await client.login(endpoint.username, endpoint.password)
            except BaseException:
                client.close()
                raise
            pooled = self._conns[key] = _Pooled(client, now, now)
        return pooled

    async def _quit(self, key: tuple[object, ...]) -> None:
        pooled = self._conns.pop(key, None)
        if pooled is None:
            return
        try:
            await pooled.client.quit()
        except (aiosmtplib.SMTPException, OSError):
            pooled.client.close()

    def _drop(self, key: tuple[object, ...]) -> None:
        pooled = self._conns.pop(key, None)
        if pooled is not None:
            pooled.client.close()

    def close_all(self) -> None:
        for key in list(self._conns):
            self.run(self._quit(key))


#: Pools by (process, thread). A pool is not thread-safe (one event loop, connections used
#: without a lock), and `mailroom run`'s send worker runs its tasks on several threads of one
#: process (tasks/embedded.py): each thread keeps a pool of its own.
_pools: dict[tuple[int, int], SmtpPool] = {}
_pools_lock = threading.Lock()


def process_pool(idle_seconds: float, max_messages: int) -> SmtpPool:
    """This thread's :class:`SmtpPool` in this process (a forked child gets its own, never
    its parent's; each thread of a threaded worker its own, never another thread's)."""
    key = (os.getpid(), threading.get_ident())
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            for inherited in [k for k in _pools if k[0] != key[0]]:
                del _pools[inherited]
            pool = _pools[key] = SmtpPool(idle_seconds, max_messages)
    return pool
