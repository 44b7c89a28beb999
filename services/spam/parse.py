"""A bounded MIME reader for scoring: what the rules and the model look at, never more.

It reads at most :data:`MAX_BYTES` of a message, :data:`MAX_HEADERS` header fields per part,
:data:`MAX_PARTS` parts, :data:`MAX_DEPTH` levels of nesting and :data:`MAX_TEXT` characters
of decoded text, within a time budget; every cut is named in ``ParsedMessage.limits``.
Archives are never decompressed: a zip attachment is judged from its central directory.
It never raises on what a message contains.
"""

from __future__ import annotations

import binascii
import codecs
import heapq
import html
import itertools
import re
import time
from dataclasses import dataclass, field

from services.spam.archive import ZipSummary, read_zip_directory

MAX_BYTES = 4 * 1024 * 1024
MAX_HEADERS = 500
MAX_HEADER_BYTES = 256 * 1024
MAX_PARTS = 64
MAX_DEPTH = 8
MAX_TEXT = 200_000
MAX_PART_DECODE = 2 * 1024 * 1024
MAX_LINKS = 200
TIME_BUDGET_SECONDS = 0.5

_ENCODED_WORD = re.compile(rb"=\?([^?\s]{1,40})\?([bBqQ])\?([^?\s]{0,2000})\?=")
_PARAM = re.compile(r';\s*([a-zA-Z0-9*_.-]{1,40})\s*=\s*("(?:[^"\\]|\\.){0,1000}"|[^;\s]{0,1000})')
_ADDRESS = re.compile(r"[\w.+'=-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){0,10}")
# Linear patterns only: a run of [^<>] stops at the next "<", so no start is rescanned.
_TAG = re.compile(r"<[^<>]*>")
_ANCHOR_START = re.compile(r"<a[\s>]")
MAX_ANCHORS = 2000
_HREF = re.compile(r"""href\s*=\s*(?:"([^"]{0,4000})"|'([^']{0,4000})'|([^\s>]{1,4000}))""", re.I)
_PASSWORD_INPUT = re.compile(r"<input\b[^>]{0,2000}type\s*=\s*[\"']?password")
# Styles that hide an element, one pattern each: a literal start is found at C speed, where
# one alternation tried a match at every "d", "v" and "f" of the markup. No match of one
# contains the start of another, so merging their matches by position finds what the
# alternation would.
_HIDDEN_STYLES = (
    re.compile(r"display\s*:\s*none"),
    re.compile(r"visibility\s*:\s*hidden"),
    re.compile(r"font-size\s*:\s*0(?:\.\d+)?(?:px|pt|em)?\s*[;\"']"),
)
MAX_HIDDEN_STYLES = 50
_TAG_NAME = re.compile(r"<(\w{1,10})")
# Elements whose content is never shown, hidden or not (Outlook hides its <style> block).
_NEVER_SHOWN = frozenset(["style", "script", "head", "title", "meta"])
# Case-insensitive "https?", spelt out (with the long s that re.I lets match "s"): the
# regex engine has no fast scan for a first letter of either case.
_URL = re.compile(r"[hH][tT][tT][pP][sS\u017f]?://[^\s<>\"'()\[\]{}]{1,2000}")
_FOLDED_WORDS = re.compile(rb"\?=\s+=\?")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")
_WORD = re.compile(r"[^\W\d_]+")


class _Deadline(Exception):
    """The time budget ran out."""


@dataclass(frozen=True)
class Link:
    """A link of the HTML: its target and the text a reader sees."""

    href: str
    text: str


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    zip: ZipSummary | None = None


@dataclass
class ParsedMessage:
    """What scoring reads of one message (top-level header values are decoded text)."""

    raw_headers: list[tuple[str, bytes]] = field(default_factory=list)
    text: str = ""
    html: str = ""
    links: list[Link] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    hidden_text: str = ""
    has_form: bool = False
    has_password_input: bool = False
    text_parts: int = 0
    html_parts: int = 0
    limits: list[str] = field(default_factory=list)
    _lower: str | None = None
    _decoded: dict[str, list[str]] = field(default_factory=dict)
    _by_name: dict[str, list[bytes]] | None = None
    _hosts: list[str] | None = None
    _lower_words: frozenset[str] | None = None
    _sender: tuple[str, str] | None = None

    def lower_text(self) -> str:
        """Subject and the start of the text, lower-cased (what the wording rules read)."""
        if self._lower is None:
            self._lower = (self.header("subject") + "\n" + self.text[:8_000]).lower()
        return self._lower

    def lower_words(self) -> frozenset[str]:
        """The set of lower-case words of the subject and text (those of the features when
        they were computed first, else of :meth:`lower_text`)."""
        if self._lower_words is None:
            self._lower_words = frozenset(_WORD.findall(self.lower_text()))
        return self._lower_words

    def set_lower_words(self, words: frozenset[str]) -> None:
        self._lower_words = words

    def sender(self) -> tuple[str, str]:
        """``(display name, lower-case address)`` of the From header (most rules read it)."""
        if self._sender is None:
            self._sender = address_of(self.header("from"))
        return self._sender

    def header(self, name: str) -> str:
        """The first value of header ``name`` (lower-case), decoded, or ``""``."""
        values = self.header_all(name)
        return values[0] if values else ""

    def header_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (lower-case), decoded, top first."""
        values = self._decoded.get(name)
        if values is None:
            if self._by_name is None:
                self._by_name = {}
                for key, raw in self.raw_headers:
                    self._by_name.setdefault(key, []).append(raw)
            # Decoded on demand: most of a message's headers are never read.
            values = [decode_header_value(raw) for raw in self._by_name.get(name, ())]
            self._decoded[name] = values
        return values

    def url_hosts(self) -> list[str]:
        """The lower-case host of each of the first 100 URLs ("" where there is none)."""
        if self._hosts is None:
            from services.spam.features import url_host

            self._hosts = [url_host(u) for u in self.urls[:100]]
        return self._hosts

    def limit(self, what: str) -> None:
        if what not in self.limits:
            self.limits.append(what)


def decode_charset(data: bytes, charset: str | None, parsed: ParsedMessage | None = None) -> str:
    """Bytes to text in ``charset``; an unknown or non-text codec falls back to UTF-8."""
    name = (charset or "utf-8").strip().strip('"').lower() or "utf-8"
    try:
        info = codecs.lookup(name)
        # Codecs such as zlib_codec or base64_codec are not text encodings: never run them.
        if not getattr(info, "_is_text_encoding", True):
            raise LookupError(name)
    except (LookupError, ValueError):
        if parsed is not None:
            parsed.limit("unknown_charset")
        return data.decode("utf-8", "replace")
    try:
        return data.decode(info.name, "replace")
    except Exception:  # noqa: BLE001 - a codec may fail in ways of its own on hostile bytes
        if parsed is not None:
            parsed.limit("bad_charset")
        return data.decode("utf-8", "replace")


def _decode_word(match: re.Match[bytes]) -> bytes:
    charset = match.group(1).decode("ascii", "replace").split("*", 1)[0]
    payload = match.group(3)
    try:
        if match.group(2) in (b"b", b"B"):
            raw = binascii.a2b_base64(payload + b"=" * (-len(payload) % 4))
        else:
            raw = binascii.a2b_qp(payload, header=True)
    except (binascii.Error, ValueError):
        return payload
    return decode_charset(raw, charset).encode("utf-8", "replace")


def decode_header_value(raw: bytes) -> str:
    """An unfolded header value with RFC 2047 encoded words decoded."""
    if b"=?" in raw:
        raw = _ENCODED_WORD.sub(_decode_word, raw)
        raw = _FOLDED_WORDS.sub(b"?==?", raw)
    return collapse_spaces(raw.decode("utf-8", "replace"))


def collapse_spaces(text: str) -> str:
    """``text`` with each run of whitespace made one space, none at either end."""
    return " ".join(text.split())


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """Head and body at the first blank line, ``\\n\\n`` or ``\\r\\n\\r\\n``. Searched in
    growing windows: a search of the whole part for the line ending it does not use would read
    all of its body."""
    start = 0
    window = 8192
    while True:
        end = start + window
        lf = data.find(b"\n\n", start, end)
        crlf = data.find(b"\r\n\r\n", start, lf + 4 if lf >= 0 else end)
        if crlf >= 0:  # before any "\n\n", which cannot start where "\r\n\r\n" does
            return data[:crlf], data[crlf + 4 :]
        if lf >= 0:
            return data[:lf], data[lf + 2 :]
        if end >= len(data):
            return data, b""
        # A blank line may straddle the window's end: the next one starts 3 bytes before it.
        start = end - 3
        window *= 2


# A field: its name at a line start, then its value with any folded lines.
_FIELD = re.compile(rb"^([!-9;-~]{1,100})[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.M)


def _read_headers(head: bytes, parsed: ParsedMessage) -> list[tuple[str, bytes]]:
    if len(head) > MAX_HEADER_BYTES:
        head = head[:MAX_HEADER_BYTES]
        parsed.limit("header_bytes")
    pairs = _FIELD.findall(head)
    if len(pairs) > MAX_HEADERS:
        del pairs[MAX_HEADERS:]
        parsed.limit("header_count")
    return [(name.lower().decode("ascii"), value.strip()) for name, value in pairs]


def _params(value: str) -> tuple[str, dict[str, str]]:
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(";" + rest):
        key = m.group(1).lower().rstrip("*")
        val = m.group(2)
        if val.startswith('"'):
            val = val[1:-1].replace('\\"', '"')
        if "''" in val and m.group(1).endswith("*"):
            val = val.split("''", 1)[1]
        params.setdefault(key, val)
    return main.strip().lower(), params


def _transfer_decode(body: bytes, cte: str, parsed: ParsedMessage) -> bytes:
    cte = cte.strip().lower()
    try:
        if cte == "base64":
            body = body[: MAX_PART_DECODE * 4 // 3 + 4]
            try:
                # Lenient mode skips line breaks and stray characters; only bad padding fails.
                return binascii.a2b_base64(body)
            except binascii.Error:
                pass
            cleaned = _NOT_BASE64.sub(b"", body)
            if len(cleaned) % 4 == 1:
                cleaned = cleaned[:-1]
            return binascii.a2b_base64(cleaned + b"=" * (-len(cleaned) % 4))
        if cte == "quoted-printable":
            return binascii.a2b_qp(body[:MAX_PART_DECODE])
    except (binascii.Error, ValueError):
        parsed.limit("bad_transfer_encoding")
        return b""
    return body


def _cut_blocks(markup: str, lower: str, opener: str, closer: str) -> tuple[str, str]:
    """``markup`` (and its lower-case twin) without each block from ``opener`` (followed by
    a space, ``>`` or ``/``) to the ``>`` after ``closer``; an unclosed block runs to the
    end. One pass of ``str.find``."""
    if opener not in lower:
        return markup, lower
    keep: list[tuple[int, int]] = []
    pos = 0
    search = 0
    while True:
        start = lower.find(opener, search)
        if start < 0:
            keep.append((pos, len(markup)))
            break
        after = start + len(opener)
        if opener != "<!--" and after < len(lower) and lower[after] not in " \t\r\n>/":
            search = after  # <header> is not <head>
            continue
        keep.append((pos, start))
        end = lower.find(closer, after)
        if end < 0:
            pos = len(markup)
            keep.append((pos, pos))
            break
        gt = lower.find(">", end + len(closer) - 1)
        pos = search = (gt + 1) if gt >= 0 else len(markup)
    return " ".join(markup[a:b] for a, b in keep), " ".join(lower[a:b] for a, b in keep)


def html_to_text(markup: str, lower: str | None = None) -> str:
    """The visible text of an HTML fragment (scripts, styles, head and comments removed);
    ``lower`` is ``markup.lower()`` where the caller has it."""
    if lower is None:
        lower = markup.lower()
    markup, lower = _cut_blocks(markup, lower, "<!--", "-->")
    for tag in ("script", "style", "head"):
        markup, lower = _cut_blocks(markup, lower, f"<{tag}", f"</{tag}")
    return html.unescape(_TAG.sub(" ", markup))


class _Reader:
    def __init__(self, parsed: ParsedMessage, deadline: float) -> None:
        self.parsed = parsed
        self.deadline = deadline
        self.parts = 0
        self.text_chunks: list[str] = []
        self.text_len = 0
        # Each HTML part and its lower-case twin, which the links' reading reuses.
        self.html_chunks: list[tuple[str, str]] = []

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Deadline

    def add_text(self, text: str) -> None:
        room = MAX_TEXT - self.text_len
        if room <= 0:
            self.parsed.limit("text_size")
            return
        if len(text) > room:
            text = text[:room]
            self.parsed.limit("text_size")
        self.text_chunks.append(text)
        self.text_len += len(text)

    def part(self, data: bytes, depth: int, top: bool) -> None:
        self.check_time()
        self.parts += 1
        if self.parts > MAX_PARTS:
            self.parsed.limit("part_count")
            return
        head, body = _split_head(data)
        fields = _read_headers(head, self.parsed)
        if top:
            self.parsed.raw_headers = fields
        ctype_raw = ""
        cte = ""
        disposition = ""
        for name, value in fields:
            if name == "content-type" and not ctype_raw:
                ctype_raw = decode_header_value(value)
            elif name == "content-transfer-encoding" and not cte:
                cte = value.decode("ascii", "replace")
            elif name == "content-disposition" and not disposition:
                disposition = decode_header_value(value)
        ctype, params = _params(ctype_raw or "text/plain")
        disp, dparams = _params(disposition)
        filename = dparams.get("filename") or params.get("name") or ""

        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "")
            if depth >= MAX_DEPTH:
                self.parsed.limit("nesting_depth")
                return
            if not boundary:
                self.add_text(body[:MAX_PART_DECODE].decode("utf-8", "replace"))
                return
            for sub in _split_multipart(body, boundary.encode("utf-8", "replace")):
                self.part(sub, depth + 1, False)
            return
        if ctype == "message/rfc822" and not filename:
            if depth >= MAX_DEPTH:
                self.parsed.limit("nesting_depth")
                return
            self.part(body, depth + 1, False)
            return

        is_attachment = bool(filename) or disp == "attachment"
        if is_attachment or not (ctype.startswith("text/") or ctype == ""):
            self.attachment(body, cte, ctype, filename)
            return
        if len(body) > MAX_PART_DECODE:
            body = body[:MAX_PART_DECODE]
            self.parsed.limit("part_size")
        decoded = _transfer_decode(body, cte, self.parsed)
        text = decode_charset(decoded, params.get("charset"), self.parsed)
        if "\x00" in text:
            text = text.replace("\x00", " ")
            self.parsed.limit("nul_bytes")
        if ctype == "text/html":
            self.parsed.html_parts += 1
            markup = text[:MAX_TEXT]
            lower = markup.lower()
            self.html_chunks.append((markup, lower))
            self.add_text(html_to_text(markup, lower))
        else:
            self.parsed.text_parts += 1
            self.add_text(text)

    def html(self) -> tuple[str, str]:
        """The HTML parts joined, and lower-cased."""
        if len(self.html_chunks) == 1:
            return self.html_chunks[0]
        # Lower-cased whole: str.lower() of a final sigma depends on the letter after it.
        markup = "".join(markup for markup, _ in self.html_chunks)
        return markup, markup.lower()

    def attachment(self, body: bytes, cte: str, ctype: str, filename: str) -> None:
        encoded_size = len(body)
        size = encoded_size * 3 // 4 if cte.strip().lower() == "base64" else encoded_size
        summary = None
        lower = filename.lower()
        if ctype in ("application/zip", "application/x-zip-compressed") or lower.endswith(".zip"):
            if encoded_size > MAX_PART_DECODE * 4:
                self.parsed.limit("archive_not_read")
            else:
                summary = read_zip_directory(_transfer_decode(body, cte, self.parsed))
        self.parsed.attachments.append(Attachment(filename[:200], ctype, size, summary))


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    delimiter = b"--" + boundary
    pieces: list[bytes] = []
    pos = body.find(delimiter)
    if pos < 0:
        return [body] if body.strip() else []
    while pos >= 0 and len(pieces) <= MAX_PARTS:
        start = body.find(b"\n", pos)
        if start < 0:
            break
        if body[pos + len(delimiter) : pos + len(delimiter) + 2] == b"--":
            break
        nxt = body.find(b"\n" + delimiter, start)
        end = nxt if nxt >= 0 else len(body)
        pieces.append(body[start + 1 : end].rstrip(b"\r"))
        pos = nxt + 1 if nxt >= 0 else -1
    return pieces


def parse_message(raw: bytes, *, time_budget: float = TIME_BUDGET_SECONDS) -> ParsedMessage:
    """Read ``raw`` within the bounds above; never raises on the message's content."""
    parsed = ParsedMessage()
    if len(raw) > MAX_BYTES:
        raw = raw[:MAX_BYTES]
        parsed.limit("message_size")
    reader = _Reader(parsed, time.monotonic() + time_budget)
    try:
        reader.part(raw, 0, True)
        markup, lower = reader.html()
        parsed.html = markup
        if markup:
            _read_html(markup, lower, parsed, reader)
        parsed.text = "".join(reader.text_chunks)
        reader.check_time()
        seen = {link.href for link in parsed.links}
        urls = _URL.finditer(parsed.text[:MAX_TEXT]) if "://" in parsed.text else ()
        for m in urls:
            if len(parsed.urls) >= MAX_LINKS:
                break
            url = m.group(0).rstrip(".,;:!?")
            if url not in seen:
                seen.add(url)
                parsed.urls.append(url)
    except _Deadline:
        parsed.limit("time_budget")
        parsed.text = "".join(reader.text_chunks)
    except RecursionError:
        parsed.limit("nesting_depth")
        parsed.text = "".join(reader.text_chunks)
    return parsed


def _read_html(markup: str, lower: str, parsed: ParsedMessage, reader: _Reader) -> None:
    pos = 0
    for _ in range(MAX_ANCHORS):
        m = _ANCHOR_START.search(lower, pos)
        if m is None:
            break
        open_end = lower.find(">", m.start(), m.start() + 4000)
        if open_end < 0:
            break
        close = lower.find("</a", open_end, open_end + 4000)
        pos = open_end + 1
        if close < 0:
            continue
        if len(parsed.links) >= MAX_LINKS:
            parsed.limit("link_count")
            break
        href_m = _HREF.search(markup, m.start(), open_end)
        if not href_m:
            continue
        href = html.unescape(href_m.group(1) or href_m.group(2) or href_m.group(3) or "").strip()
        text = _visible_words(markup[open_end + 1 : close])
        parsed.links.append(Link(href[:2000], text[:300]))
        if href.lower().startswith(("http://", "https://")):
            parsed.urls.append(href[:2000])
    reader.check_time()
    parsed.has_form = "<form" in lower
    parsed.has_password_input = "<input" in lower and _PASSWORD_INPUT.search(lower) is not None
    hidden: list[str] = []
    hits = heapq.merge(*(style.finditer(lower) for style in _HIDDEN_STYLES), key=re.Match.start)
    for hit in itertools.islice(hits, MAX_HIDDEN_STYLES):
        # The element whose style hides it: its start tag, then up to its end tag.
        start = lower.rfind("<", max(0, hit.start() - 2000), hit.start())
        name = _TAG_NAME.match(lower, start) if start >= 0 else None
        open_end = lower.find(">", hit.end(), hit.end() + 2000)
        if name is None or open_end < 0 or name.group(1) in _NEVER_SHOWN:
            continue
        close = lower.find("</" + name.group(1), open_end, open_end + 20_000)
        if close < 0:
            continue
        words = _visible_words(markup[open_end + 1 : close])
        if words:
            hidden.append(words)
    parsed.hidden_text = " ".join(hidden)[:5000]


def _visible_words(fragment: str) -> str:
    """The words an HTML fragment shows, one space between each."""
    return collapse_spaces(html.unescape(_TAG.sub(" ", fragment)))


def address_of(value: str) -> tuple[str, str]:
    """``(display name, lower-case address)`` of a From-like header value."""
    value = value[:1000]
    lt = value.rfind("<")
    if lt >= 0:
        gt = value.find(">", lt)
        addr = value[lt + 1 : gt if gt > lt else None].strip()
        name = value[:lt].strip().strip('"').strip()
    else:
        m = _ADDRESS.search(value)
        addr = m.group(0) if m else value.strip()
        name = ""
        paren = re.search(r"\(([^)]{0,200})\)", value)
        if paren:
            name = paren.group(1).strip()
    return name, addr.lower()


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(">").rstrip(".").lower()
