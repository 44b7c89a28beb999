"""A small client of SpamAssassin's spamd (the spamc protocol, SPAMC/1.5, over TCP).

Optional: where ``MAILROOM_SPAMD_URL`` is set, spamd's verdict joins the score as one more
indicator, ``spamassassin``. A spamd that is absent, slow or answers nonsense changes
nothing else: :meth:`SpamdClient.check` then returns ``None``.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.spam.verdict import Indicator

DEFAULT_PORT = 783
MAX_SEND_BYTES = 512 * 1024
MAX_REPLY_BYTES = 64 * 1024
# Log-odds per point of spamd's score above or below its own threshold, and the cap.
WEIGHT_PER_POINT = 0.4
MAX_WEIGHT = 3.0
_SPAM_LINE = re.compile(rb"Spam:\s*(True|False|Yes|No)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)", re.I)


@dataclass(frozen=True)
class SpamdResult:
    score: float
    threshold: float
    symbols: tuple[str, ...] = ()

    def indicator(self) -> Indicator:
        weight = max(-MAX_WEIGHT, min(MAX_WEIGHT, (self.score - self.threshold) * WEIGHT_PER_POINT))
        detail = f"{self.score:g}/{self.threshold:g}"
        if self.symbols:
            detail += " " + ",".join(self.symbols)
        return Indicator("spamassassin", weight, detail[:200])


class SpamdClient:
    """Asks one spamd at ``host:port``; every call has ``timeout`` seconds in total."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, timeout: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    @classmethod
    def from_url(cls, url: str, timeout: float = 2.0) -> SpamdClient:
        """``spamd://host:port`` (or ``tcp://``, or plain ``host:port``)."""
        parts = urlsplit(url if "://" in url else f"spamd://{url}")
        if not parts.hostname:
            raise ValueError(f"no host in spamd address {url!r}")
        return cls(parts.hostname, parts.port or DEFAULT_PORT, timeout)

    def check(self, raw: bytes) -> SpamdResult | None:
        """spamd's score and rule names for ``raw``, or ``None`` if it cannot be had."""
        body = raw[:MAX_SEND_BYTES]
        request = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(body) + body
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
                sock.settimeout(self.timeout)
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                chunks: list[bytes] = []
                size = 0
                while size < MAX_REPLY_BYTES:
                    chunk = sock.recv(8192)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
        except OSError:
            return None
        return parse_reply(b"".join(chunks))


def parse_reply(reply: bytes) -> SpamdResult | None:
    """Read spamd's answer to SYMBOLS or CHECK; ``None`` unless it is a 0 EX_OK with a score."""
    head, _, body = reply.replace(b"\r\n", b"\n").partition(b"\n\n")
    lines = head.split(b"\n")
    if not lines or not lines[0].startswith(b"SPAMD/") or b" 0 " not in lines[0] + b" ":
        return None
    for line in lines[1:]:
        m = _SPAM_LINE.search(line)
        if m:
            try:
                score, threshold = float(m.group(2)), float(m.group(3))
            except ValueError:
                return None
            symbols = tuple(s.strip()[:40] for s in body.decode("ascii", "replace").split(",") if s.strip())
            return SpamdResult(score, threshold, symbols[:20])
    return None
