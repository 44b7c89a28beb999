"""A small asyncio IMAP client: just what waiting for changes needs (LOGIN, CAPABILITY,
ENABLE, NOTIFY, EXAMINE, IDLE, STATUS, LIST, NOOP).

One connection costs a socket, a stream reader and a few small objects (no thread), so a
watcher process holds thousands. Responses are read a line at a time; a literal
(``{n}``) is read whole and put back into the line as a quoted string, so parsing a
response never has to know about literals.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from imapclient import imap_utf7

from services.mail.hosts import PinnedHost
from services.mail.imap import ImapEndpoint

#: Longest line or literal accepted from a server (a STATUS or LIST line is far shorter).
MAX_LINE = 256 * 1024

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
_TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|(\()|(\))|([^\s()"]+))')


class ImapFailure(Exception):
    """The server refused a command (NO / BAD) or closed the connection (BYE)."""


class LoginRefused(ImapFailure):
    """The server refused our credentials: retrying at once would not help."""


@dataclass(frozen=True)
class Untagged:
    """One untagged response: ``kind`` is its keyword (``STATUS``, ``LIST``, ``EXISTS``…)
    and ``mailbox`` the decoded mailbox name for STATUS and LIST."""

    kind: str
    mailbox: str | None
    text: str


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_mailbox(name: str) -> str:
    return quote(imap_utf7.encode(name).decode("ascii"))


def tokens(text: str) -> list[str | None]:
    """Atoms and quoted strings of ``text``; ``None`` for each parenthesis (list markers)."""
    found: list[str | None] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            break
        pos = match.end()
        quoted, opening, closing, atom = match.groups()
        if quoted is not None:
            found.append(re.sub(r"\\(.)", r"\1", quoted))
        elif opening or closing:
            found.append(None)
        elif atom is not None:
            found.append(atom)
    return found


def _decode(name: str) -> str:
    decoded: str = imap_utf7.decode(name.encode("ascii", "replace"))
    return decoded


def parse_untagged(line: str) -> Untagged:
    """``line`` without its ``* `` and CRLF."""
    words = line.split(" ", 2)
    if words[0].isdigit() and len(words) > 1:  # * 3 EXISTS, * 4 FETCH (...)
        return Untagged(words[1].upper(), None, line)
    kind = words[0].upper()
    mailbox: str | None = None
    if kind == "STATUS":
        parts = tokens(line[len("STATUS") :])
        mailbox = _decode(parts[0]) if parts and parts[0] is not None else None
    elif kind in {"LIST", "LSUB"}:
        # LIST (flags) "delimiter" name [extended data]: the flags hold no nested list.
        parts = tokens(line[len(kind) :])
        markers = [i for i, part in enumerate(parts) if part is None][:2]
        rest = parts[markers[1] + 1 :] if len(markers) == 2 else []
        if len(rest) >= 2 and rest[1] is not None:
            mailbox = _decode(rest[1])
    return Untagged(kind, mailbox, line)


def status_values(line: str) -> dict[str, int]:
    """``STATUS name (MESSAGES 3 UIDNEXT 9)`` → ``{"MESSAGES": 3, "UIDNEXT": 9}``."""
    inner = line[line.rfind("(") + 1 : line.rfind(")")].split()
    return {
        inner[i].upper(): int(inner[i + 1]) for i in range(0, len(inner) - 1, 2) if inner[i + 1].isdigit()
    }


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive after 60 s of silence, 3 probes 20 s apart: a connection to a server
    that vanished (no reset) is noticed within about 2 minutes, not at the next NOOP."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


class ImapConnection:
    """One logged-in connection. ``on_untagged`` sees every untagged response, whenever it
    arrives (during a command, or while idling)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.capabilities: frozenset[str] = frozenset()
        self.on_untagged: Callable[[Untagged], None] = lambda _u: None
        self._tag = 0

    @classmethod
    async def open(cls, pinned: PinnedHost, endpoint: ImapEndpoint, *, timeout: float) -> ImapConnection:
        """Connect to the pinned addresses (TLS as ``endpoint`` says, the certificate checked
        against the name), read the greeting and log in."""
        context = ssl.create_default_context() if endpoint.tls in {"ssl", "starttls"} else None
        last: Exception | None = None
        conn: ImapConnection | None = None
        for _family, sockaddr in pinned.sockaddrs:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        str(sockaddr[0]),
                        pinned.port,
                        ssl=context if endpoint.tls == "ssl" else None,
                        server_hostname=pinned.name if endpoint.tls == "ssl" else None,
                        limit=MAX_LINE,
                    ),
                    timeout,
                )
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            _keepalive(writer)
            conn = cls(reader, writer)
            break
        if conn is None:
            raise last or OSError("no address to connect to")
        try:
            greeting = await asyncio.wait_for(conn._line(), timeout)
            if not greeting.startswith("* OK"):
                raise ImapFailure(f"greeting: {greeting[:200]}")
            if endpoint.tls == "starttls":
                await asyncio.wait_for(conn.command("STARTTLS"), timeout)
                assert context is not None
                await conn.writer.start_tls(context, server_hostname=pinned.name)
            conn.capabilities = frozenset()  # the greeting's are not the logged-in session's
            login = f"LOGIN {quote(endpoint.username)} {quote(endpoint.password)}"
            try:
                await asyncio.wait_for(conn.command(login), timeout)
            except ImapFailure as exc:
                if "[UNAVAILABLE]" in str(exc).upper() or "[LIMIT]" in str(exc).upper():
                    raise
                raise LoginRefused(str(exc)) from None
            if not conn.capabilities:
                await asyncio.wait_for(conn.command("CAPABILITY"), timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _line(self) -> str:
        """One response line, literals inlined as quoted strings, CRLF removed."""
        raw = await self.reader.readline()
        if not raw:
            raise ConnectionError("the IMAP server closed the connection")
        pieces: list[bytes] = []
        while True:
            literal = _LITERAL.search(raw)
            if literal is None:
                pieces.append(raw.rstrip(b"\r\n"))
                break
            size = int(literal.group(1))
            if size > MAX_LINE:
                raise ImapFailure("literal too large")
            data = await self.reader.readexactly(size)
            text = data.decode("utf-8", "replace").replace("\\", "\\\\").replace('"', '\\"')
            pieces.append(raw[: literal.start()] + b'"' + text.encode() + b'"')
            raw = await self.reader.readline()
            if not raw:
                raise ConnectionError("the IMAP server closed the connection")
        line = b"".join(pieces).decode("utf-8", "replace")
        if line.startswith("* "):
            self._untagged(line[2:])
        return line

    def _untagged(self, body: str) -> None:
        head = body.split(" ", 1)[0].upper()
        if head == "CAPABILITY":
            self.capabilities = frozenset(body.upper().split()[1:])
        elif head in {"OK", "PREAUTH"} and "[CAPABILITY " in body.upper():
            start = body.upper().index("[CAPABILITY ") + len("[CAPABILITY ")
            self.capabilities = frozenset(body[start : body.index("]", start)].upper().split())
        elif head == "BYE":
            return
        self.on_untagged(parse_untagged(body))

    def _next_tag(self) -> str:
        self._tag += 1
        return f"W{self._tag}"

    async def send(self, text: str) -> str:
        tag = self._next_tag()
        self.writer.write(f"{tag} {text}\r\n".encode())
        await self.writer.drain()
        return tag

    async def command(self, text: str) -> str:
        """Send ``text`` and wait for its tagged answer; returns the OK line."""
        tag = await self.send(text)
        return await self.wait_tagged(tag)

    async def wait_tagged(self, tag: str) -> str:
        while True:
            line = await self._line()
            if line.startswith("* BYE"):
                raise ImapFailure(line[2:200])
            if line.startswith(tag + " "):
                status, _, rest = line[len(tag) + 1 :].partition(" ")
                if "[CAPABILITY " in rest.upper():
                    start = rest.upper().index("[CAPABILITY ") + len("[CAPABILITY ")
                    self.capabilities = frozenset(rest[start : rest.index("]", start)].upper().split())
                if status.upper() != "OK":
                    raise ImapFailure(f"{status} {rest[:300]}")
                return line

    async def commands(self, texts: list[str]) -> None:
        """Send ``texts`` pipelined (all at once) and wait for every answer; a NO for one of
        them (a folder deleted meanwhile) does not stop the others."""
        tags = [self._next_tag() for _ in texts]
        self.writer.write(
            b"".join(f"{tag} {text}\r\n".encode() for tag, text in zip(tags, texts, strict=True))
        )
        await self.writer.drain()
        pending = set(tags)
        while pending:
            line = await self._line()
            if line.startswith("* BYE"):
                raise ImapFailure(line[2:200])
            tag = line.split(" ", 1)[0]
            pending.discard(tag)

    async def idle(self, seconds: float) -> None:
        """IDLE for ``seconds`` (untagged responses reach ``on_untagged`` meanwhile), then DONE."""
        tag = await self.send("IDLE")
        while True:
            line = await self._line()
            if line.startswith("+"):
                break
            if line.startswith(tag + " "):
                raise ImapFailure(f"IDLE refused: {line[:200]}")
        await self.listen(seconds)
        self.writer.write(b"DONE\r\n")
        await self.writer.drain()
        await self.wait_tagged(tag)

    async def listen(self, seconds: float) -> None:
        """Read untagged responses for ``seconds`` without sending anything (NOTIFY, IDLE)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                line = await asyncio.wait_for(self._line(), left)
            except TimeoutError:
                return
            if line.startswith("* BYE"):
                raise ImapFailure(line[2:200])

    def close(self) -> None:
        self.writer.close()
