"""Phishing rules over a parsed message: each a named indicator with a fixed weight.

A weight is the rule's contribution to the score's log-odds. The weights were set by
measuring each rule on modern phishing and on modern legitimate mail (how often it fires
on each), never by training on either. Every rule reads bounded input (see
``services.spam.parse``) and the whole set stops at its time budget.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable

from services.spam import wording
from services.spam.features import is_public_ip, registered_domain, url_host
from services.spam.parse import ParsedMessage, address_of, collapse_spaces, domain_of
from services.spam.verdict import Indicator

Rule = Callable[[ParsedMessage], Indicator | None]

W_LINK_MISMATCH = 1.0
W_LOOKALIKE = 2.5
W_BRAND_SPOOF = 3.0
W_CREDENTIAL = 2.5
W_PAYMENT = 1.5
W_EXECUTABLE = 5.0
W_MACRO = 3.0
W_HTML_ATTACHMENT = 3.0
W_ENCRYPTED_ARCHIVE = 3.0
W_ARCHIVE_BOMB = 3.0
W_MISSING_DATE = 1.0
W_MISSING_MESSAGE_ID = 0.7
W_BAD_DATE = 0.7
W_HIDDEN_TEXT = 1.5
# Up to a preview line's length, hidden text is what newsletters put before their content
# ("preheader"); phishing hides far more (the median on modern phishing is about 1,000 characters).
W_HIDDEN_PREHEADER = 0.75
PREHEADER_CHARS = 200
W_AUTH_FAIL = 1.5
W_FORM = 0.5
W_PASSWORD_FORM = 2.5
W_IP_LINK = 1.5
W_OBFUSCATED = 2.5
W_SPACED_LETTERS = 2.0
W_RECIPIENT_IN_SUBJECT = 1.5
W_MALFORMED_SENDER = 2.0
W_FREE_HOSTING_SENDER = 1.5
W_FREE_HOSTING_LINK = 1.0
W_LURE = 1.5
W_GENERATED_SENDER = 1.5
W_ADVANCE_FEE = 1.5
W_RANDOM_STRING = 1.5
W_SERIAL_SENDER_NAME = 1.0
# Evidence for ham: a reply within a thread, quoting what it answers. Headers alone are weak
# evidence (phishing copies In-Reply-To and "Re:" to look like a reply); quoting is stronger.
W_THREAD_REPLY = -0.5
W_QUOTED_REPLY = -1.5

EXECUTABLE_EXT = frozenset(
    "exe scr com pif bat cmd vbs vbe js jse wsf wsh hta msi msp cpl jar ps1 lnk reg dll iso img vhd".split()  # noqa: SIM905
)
MACRO_EXT = frozenset(["docm", "xlsm", "pptm", "dotm", "xltm", "xlam", "ppsm", "sldm"])
HTML_EXT = frozenset(["htm", "html", "shtml", "xhtml", "svg", "mht", "mhtml"])
ARCHIVE_EXT = frozenset(["zip", "rar", "7z", "gz", "tgz", "bz2", "xz", "ace", "cab", "arj", "z"])

# Brands that phishing impersonates most, with the domains they really send from.
BRANDS: dict[str, tuple[str, ...]] = {
    "paypal": ("paypal.com", "paypal.de", "paypal.co.uk"),
    "microsoft": (
        "microsoft.com",
        "office.com",
        "outlook.com",
        "live.com",
        "microsoftonline.com",
        "office365.com",
        "onedrive.com",
        "sharepoint.com",
    ),
    "office 365": ("microsoft.com", "office.com", "office365.com"),
    "office365": ("microsoft.com", "office.com", "office365.com"),
    "outlook": ("microsoft.com", "outlook.com"),
    "onedrive": ("microsoft.com", "onedrive.com"),
    "sharepoint": ("microsoft.com", "sharepoint.com"),
    "apple": ("apple.com", "icloud.com"),
    "icloud": ("apple.com", "icloud.com"),
    "amazon": ("amazon.com", "amazon.de", "amazon.co.uk", "amazon.fr", "amazon.it", "amazon.es", "amazon.ca"),
    "netflix": ("netflix.com",),
    "google": ("google.com", "gmail.com"),
    "facebook": ("facebook.com", "facebookmail.com", "meta.com"),
    "instagram": ("instagram.com", "facebookmail.com"),
    "whatsapp": ("whatsapp.com",),
    "linkedin": ("linkedin.com",),
    "dhl": ("dhl.com", "dhl.de"),
    "fedex": ("fedex.com",),
    "ups": ("ups.com",),
    "usps": ("usps.com",),
    "docusign": ("docusign.com", "docusign.net"),
    "dropbox": ("dropbox.com",),
    "adobe": ("adobe.com",),
    "wells fargo": ("wellsfargo.com",),
    "chase": ("chase.com",),
    "bank of america": ("bankofamerica.com",),
    "citibank": ("citi.com", "citibank.com"),
    "american express": ("americanexpress.com", "aexp.com"),
    "coinbase": ("coinbase.com",),
    "binance": ("binance.com",),
    "metamask": ("metamask.io",),
    "mcafee": ("mcafee.com",),
    "norton": ("norton.com", "nortonlifelock.com"),
    "geek squad": ("geeksquad.com", "bestbuy.com"),
    "walmart": ("walmart.com",),
    "costco": ("costco.com",),
    "ebay": ("ebay.com",),
    "att": ("att.com", "att.net"),
    "at&t": ("att.com", "att.net"),
    "verizon": ("verizon.com",),
    "irs": ("irs.gov",),
    "hmrc": ("hmrc.gov.uk",),
    "mercado pago": ("mercadopago.com", "mercadopago.com.br", "mercadolivre.com.br"),
    "correios": ("correios.com.br",),
    "receita federal": ("receita.fazenda.gov.br", "gov.br"),
    "santander": ("santander.com", "santander.com.br", "santander.co.uk"),
    "bradesco": ("bradesco.com.br",),
    "itau": ("itau.com.br",),
    "nubank": ("nubank.com.br",),
    "caixa": ("caixa.gov.br",),
    "opensea": ("opensea.io",),
    "ledger": ("ledger.com",),
    "trust wallet": ("trustwallet.com",),
    "kraken": ("kraken.com",),
    "crypto.com": ("crypto.com",),
    "spotify": ("spotify.com",),
    "disney": ("disney.com", "disneyplus.com"),
    "zoom": ("zoom.us",),
    "godaddy": ("godaddy.com",),
    "ionos": ("ionos.com", "ionos.de"),
    "truist": ("truist.com",),
    "sirius": ("siriusxm.com",),
    "steam": ("steampowered.com", "steamcommunity.com"),
    "roblox": ("roblox.com",),
    "yahoo": ("yahoo.com",),
    "aol": ("aol.com",),
    # Shops, parcel services and banks that phishing in Europe and Brazil names most, with the
    # domains of their main markets.
    "shein": ("shein.com", "sheinemail.com"),
    "temu": ("temu.com",),
    "aliexpress": ("aliexpress.com", "aliexpress.us", "alibaba.com"),
    "lidl": (
        "lidl.com",
        "lidl.de",
        "lidl.fr",
        "lidl.nl",
        "lidl.be",
        "lidl.es",
        "lidl.it",
        "lidl.pl",
        "lidl.co.uk",
        "lidl.at",
        "lidl.ch",
        "lidl.pt",
    ),
    "aldi": (
        "aldi.com",
        "aldi.us",
        "aldi.co.uk",
        "aldi-nord.de",
        "aldi-sued.de",
        "aldi.nl",
        "aldi.fr",
        "aldi.be",
        "aldi.es",
        "aldi.it",
        "aldi.pt",
        "aldi.com.au",
    ),
    "ikea": ("ikea.com", "ikea.de", "ikea.fr", "ikea.nl", "ikea.es", "ikea.it", "ikea.se", "ikea.co.uk"),
    "decathlon": (
        "decathlon.com",
        "decathlon.fr",
        "decathlon.de",
        "decathlon.es",
        "decathlon.it",
        "decathlon.nl",
        "decathlon.be",
        "decathlon.pt",
        "decathlon.co.uk",
        "decathlon.com.br",
    ),
    "leroy merlin": (
        "leroymerlin.com",
        "leroymerlin.fr",
        "leroymerlin.es",
        "leroymerlin.it",
        "leroymerlin.pt",
        "leroymerlin.com.br",
        "leroymerlin.pl",
    ),
    "dpd": (
        "dpd.com",
        "dpd.de",
        "dpd.fr",
        "dpd.nl",
        "dpd.be",
        "dpd.co.uk",
        "dpd.at",
        "dpd.pl",
        "dpdgroup.com",
    ),
    "gls": (
        "gls-group.com",
        "gls-group.eu",
        "gls-pakete.de",
        "gls-spain.es",
        "gls-italy.com",
        "gls-france.com",
        "gls-info.nl",
    ),
    "postnl": ("postnl.nl",),
    "royal mail": ("royalmail.com",),
    "la poste": ("laposte.fr", "laposte.net"),
    "correos": ("correos.es",),
    "banco do brasil": ("bb.com.br",),
    "mercado livre": ("mercadolivre.com.br",),
    "wetransfer": ("wetransfer.com",),
    "kaspersky": ("kaspersky.com",),
    "trezor": ("trezor.io",),
    "webmail": (),
    "mailbox": (),
    "admin": (),
    "help desk": (),
    "helpdesk": (),
    "it support": (),
    "it department": (),
}
_BRAND_RE = re.compile(
    r"(?<![a-z0-9])("
    + "|".join(re.escape(b) for b in sorted(BRANDS, key=len, reverse=True))
    + r")(?![a-z0-9])"
)
# A domain containing a brand's name without being that brand's, or with the classic digit
# swaps (paypa1, micros0ft).
_LOOKALIKE_NAMES = (
    "paypal",
    "paypa1",
    "micros0ft",
    "microsoft",
    "rnicrosoft",
    "app1e",
    "amaz0n",
    "netflix",
    "netfl1x",
    "docusign",
    "office365",
    "wellsfargo",
    "coinbase",
    "binance",
    "metamask",
)
# Domains of the brands themselves (and their clouds), which contain a brand's name by right.
_BRAND_DOMAINS = frozenset(d for domains in BRANDS.values() for d in domains) | frozenset(
    ["amazonaws.com", "microsoftonline.com", "microsoftstore.com", "netflix.net", "paypalobjects.com"]
)
# Brands that are also people's given names or surnames: "Chase Miller" is a person.
_PERSONAL_NAMES = frozenset(["chase", "norton", "santander", "disney"])
# Words of the names companies send as ("Chase Bank", "Norton Security").
_SERVICE_WORDS = frozenset(
    """account accounts alert alerts bank banking billing card cards care center centre customer
    customers department desk help info mobile notice notification notifications official online
    protection security secure service services support team update updates""".split()  # noqa: SIM905
)
_DOMAINISH = re.compile(r"(?:https?://)?((?:[a-z0-9-]{1,63}\.){1,6}[a-z]{2,24})\b", re.I)
_AUTH_RESULT = re.compile(r"\b(spf|dkim|dmarc)\s*=\s*(fail|softfail|permerror|none)\b", re.I)
_MSGID = re.compile(r"^\s*<[^<>@\s]{1,250}@[^<>@\s]{1,250}>\s*$")
# Characters that show nothing or imitate letters: Unicode tags and variation selectors,
# zero-width marks, mathematical alphanumerics ("𝐏𝐥𝐞𝐚𝐬𝐞"). Phishing uses them to hide a brand
# name from filters while a reader still sees it.
_INVISIBLE = re.compile("[\U000e0000-\U000e007f\U000e0100-\U000e01ef\u200b\u200d\u2060\u00ad\ufeff\u034f]")
# A word that mixes Latin letters with Cyrillic or Greek ones ("Gеt" with a Cyrillic "е",
# "ΝFT"): a look-alike spelling, never how a word in either script is written.
_WORD = re.compile(r"\w{3,}")
_LATIN = re.compile(r"[a-zA-Z]")
_CYRILLIC_GREEK = re.compile("[\u0370-\u03ff\u0400-\u04ff]")
# Cherokee and Canadian syllabics beside Latin letters stand in for them ("ᗩlert", "ᑕloud").
_SYLLABICS = re.compile("[\u13a0-\u13ff\u1400-\u167f]")
_MATH_LETTERS = re.compile("[\U0001d400-\U0001d7ff]")
_TEXT_HIDDEN_MARKS = re.compile("[\U000e0000-\U000e007f\U000e0100-\U000e01ef]")
_SPACED = re.compile(r"(?:\S {1,3}){20}")
# What preheaders pad with: zero-width and joining marks, the combining grapheme joiner, the
# soft hyphen, Braille and Hangul blanks.
_PADDING = re.compile(
    "[\u034f\u00ad\u115f\u1160\u180e\u200b-\u200f\u2028-\u202f\u2060-\u2064\u2800\u3164\ufeff]"
)
_FREE_HOSTING = frozenset(
    (
        "firebaseapp.com",
        "web.app",
        "blogspot.com",
        "weebly.com",
        "wixsite.com",
        "ipfs.io",
        "r2.dev",
        "pages.dev",
        "workers.dev",
        "glitch.me",
        "herokuapp.com",
        "ngrok.io",
        "ngrok-free.app",
        "000webhostapp.com",
        "sites.google.com",
        "storage.googleapis.com",
        "forms.gle",
        "azurewebsites.net",
        "onrender.com",
        "vercel.app",
        "netlify.app",
        "square.site",
        "godaddysites.com",
        "webflow.io",
        "typedream.app",
        "mybluehost.me",
        "translate.goog",
        "wsimg.com",
        "dweb.link",
        "trycloudflare.com",
    )
)
_VALID_DOMAIN = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
# RFC 5322's date: "[Tue, ]1 Dec 2026 09:00[:00] +0000" (the zone is often odd; not checked).
_DATE = re.compile(r"\b\d{1,2}\s+[A-Za-z]{3}\s+\d{2,4}\s+\d{1,2}:\d{2}")
# Link texts that look like a domain but name a file (none of these is a top-level domain).
_FILE_EXTENSIONS = frozenset(
    [
        "conf",
        "cfg",
        "ini",
        "txt",
        "log",
        "json",
        "yaml",
        "yml",
        "xml",
        "rst",
        "patch",
        "diff",
        "cpp",
        "java",
        "php",
        "html",
        "htm",
        "css",
        "csv",
        "tar",
        "gz",
        "bz2",
        "xz",
        "bin",
        "img",
        "iso",
        "deb",
        "rpm",
        "ipk",
        "js",
        "rb",
        "ko",
        "dts",
        "dtsi",
    ]
)
_IP_HOST = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def _ext(name: str) -> str:
    return name.lower().rstrip(". ").rpartition(".")[2] if "." in name else ""


_AT_DOMAIN = re.compile(r"@([a-z0-9.-]+)")


def _recipient_domains(parsed: ParsedMessage) -> set[str]:
    """The domains of the To header's addresses (its first 2,000 characters)."""
    return {d.rstrip(".") for d in _AT_DOMAIN.findall(parsed.header("to")[:2000].lower())}


def _sender(parsed: ParsedMessage) -> tuple[str, str]:
    name, addr = parsed.sender()
    return name, domain_of(addr)


def link_text_mismatch(parsed: ParsedMessage) -> Indicator | None:
    # A sender that shows its own domain and links through a click tracker (its mail
    # service's: list-manage.com, sendgrid.net) is how newsletters and receipts link; what
    # misleads is a domain shown that is not the sender's.
    _, from_domain = _sender(parsed)
    own = registered_domain(from_domain) if from_domain else ""
    for link in parsed.links:
        target = url_host(link.href)
        if not target:
            continue
        m = _DOMAINISH.search(link.text)
        if not m or "@" in link.text:
            continue
        shown = m.group(1).lower()
        # "iscsid.conf" is a file's name; "www.example" a cut-off "www.example.com".
        if shown.rpartition(".")[2] in _FILE_EXTENSIONS or target.startswith(shown + "."):
            continue
        shown_domain = registered_domain(shown)
        if shown_domain != registered_domain(target) and shown_domain != own:
            return Indicator("link_text_mismatch", W_LINK_MISMATCH, f"shows {shown}, goes to {target}"[:200])
    return None


def _is_lookalike(host: str) -> str | None:
    if "xn--" in host:
        return "punycode"
    domain = registered_domain(host)
    if domain in _BRAND_DOMAINS:
        return None
    label = domain.partition(".")[0]
    for name in _LOOKALIKE_NAMES:
        if name in label and label != name:
            return name
    return None


def lookalike_domain(parsed: ParsedMessage) -> Indicator | None:
    _, from_domain = _sender(parsed)
    hosts = [from_domain] if from_domain else []
    hosts.extend(parsed.url_hosts())
    for host in hosts:
        if not host:
            continue
        why = _is_lookalike(host)
        if why:
            return Indicator("lookalike_domain", W_LOOKALIKE, f"{host} ({why})"[:200])
    return None


def _brand_domain(domain: str, brand: str) -> bool:
    return any(domain == d or domain.endswith("." + d) for d in BRANDS[brand])


def _person_named(name: str) -> bool:
    """Whether ``name`` reads as a person's ("Chase Miller", "Sarah Norton"): two to four
    capitalised words, none of them what a company calls its mail ("Chase Bank", "Norton
    Security ALERT")."""
    parts = name.replace('"', " ").split()
    return 2 <= len(parts) <= 4 and all(
        p.isalpha() and p.istitle() and p.lower() not in _SERVICE_WORDS for p in parts
    )


def display_name_spoofs_brand(parsed: ParsedMessage) -> Indicator | None:
    name, domain = _sender(parsed)
    if not name or not domain:
        return None
    lowered = name.lower()
    m = _BRAND_RE.search(lowered)
    if not m:
        return None
    brand = m.group(1)
    real = BRANDS[brand]
    # The sender is the brand's when its domain is that of any brand the name says
    # ("Microsoft OneDrive" from onedrive.com).
    if any(_brand_domain(domain, b.group(1)) for b in _BRAND_RE.finditer(lowered)):
        return None
    if brand in _PERSONAL_NAMES and _person_named(name):
        return None
    # "IT support" or "Webmail" from the recipient's own organisation (the sender's domain
    # is a recipient's) is not a spoof.
    if not real and domain in _recipient_domains(parsed):
        return None
    return Indicator("display_name_spoofs_brand", W_BRAND_SPOOF, f'"{brand}" sent from {domain}'[:200])


def credential_request(parsed: ParsedMessage) -> Indicator | None:
    text = parsed.lower_text()
    words = parsed.lower_words()
    cred = wording.first_phrase(text, wording.CREDENTIAL, words)
    if not cred:
        return None
    urgent = wording.urgency(text, words)
    if not urgent:
        return None
    return Indicator("credential_request", W_CREDENTIAL, f'"{cred}" with "{urgent}"'[:200])


def payment_request(parsed: ParsedMessage) -> Indicator | None:
    text = parsed.lower_text()
    words = parsed.lower_words()
    pay = wording.first_word(words, wording.PAYMENT_WORDS) or wording.first_phrase(
        text, wording.PAYMENT_PHRASES, words
    )
    if not pay:
        return None
    urgent = wording.urgency(text, words)
    if not urgent:
        return None
    return Indicator("payment_request", W_PAYMENT, f'"{pay}" with "{urgent}"'[:200])


def risky_attachments(parsed: ParsedMessage) -> list[Indicator]:
    found: dict[str, Indicator] = {}
    for att in parsed.attachments:
        ext = _ext(att.filename)
        name = att.filename or att.content_type
        if ext in EXECUTABLE_EXT or att.content_type in (
            "application/x-msdownload",
            "application/x-msdos-program",
        ):
            found.setdefault("executable_attachment", Indicator("executable_attachment", W_EXECUTABLE, name))
        elif ext in MACRO_EXT or "macroenabled" in att.content_type:
            found.setdefault("macro_attachment", Indicator("macro_attachment", W_MACRO, name))
        elif ext in HTML_EXT or att.content_type in ("text/html", "image/svg+xml"):
            found.setdefault("html_attachment", Indicator("html_attachment", W_HTML_ATTACHMENT, name))
        z = att.zip
        if z is not None and z.readable:
            if z.encrypted:
                found.setdefault(
                    "encrypted_archive", Indicator("encrypted_archive", W_ENCRYPTED_ARCHIVE, name)
                )
            inner = [n for n in z.names if _ext(n) in EXECUTABLE_EXT | MACRO_EXT | HTML_EXT]
            if inner:
                found.setdefault(
                    "executable_attachment",
                    Indicator("executable_attachment", W_EXECUTABLE, f"{name}: {inner[0]}"[:200]),
                )
            if z.ratio > 100 and z.uncompressed > 10 * 1024 * 1024:
                found.setdefault(
                    "archive_bomb",
                    Indicator(
                        "archive_bomb", W_ARCHIVE_BOMB, f"{name} declares {z.uncompressed} bytes"[:200]
                    ),
                )
        elif ext in ARCHIVE_EXT and ext != "zip":
            # Archives we cannot look into are a common wrapper of malware.
            found.setdefault("unreadable_archive", Indicator("unreadable_archive", 1.0, name))
    return list(found.values())


def date_and_message_id(parsed: ParsedMessage) -> list[Indicator]:
    out: list[Indicator] = []
    date = parsed.header("date")
    if not date:
        out.append(Indicator("missing_date", W_MISSING_DATE, "no Date header"))
    elif not _DATE.search(date):
        out.append(Indicator("inconsistent_date", W_BAD_DATE, f"unreadable Date: {date}"[:200]))
    msgid = parsed.header("message-id")
    if not msgid:
        out.append(Indicator("missing_message_id", W_MISSING_MESSAGE_ID, "no Message-ID header"))
    elif not _MSGID.match(msgid):
        out.append(Indicator("malformed_message_id", W_MISSING_MESSAGE_ID, msgid[:200]))
    return out


def html_only_hidden_text(parsed: ParsedMessage) -> Indicator | None:
    hidden = parsed.hidden_text
    if len(hidden) < 20:
        return None
    # A preheader is padded with invisible characters ("&#847;&zwnj;&nbsp;" a hundred times)
    # so that the preview stops after it: the padding is no hidden text.
    shown = len(hidden) if hidden.isascii() else len(collapse_spaces(_PADDING.sub("", hidden)))
    if shown < 20:
        return None
    weight = W_HIDDEN_TEXT if shown >= PREHEADER_CHARS else W_HIDDEN_PREHEADER
    return Indicator("html_only_hidden_text", weight, f"{shown} hidden characters")


def auth_results_fail(parsed: ParsedMessage) -> Indicator | None:
    # The topmost Authentication-Results is the one the receiving server added.
    values = parsed.header_all("authentication-results")
    if not values:
        return None
    fails = sorted(
        {m.group(1).lower() for m in _AUTH_RESULT.finditer(values[0]) if m.group(2).lower() == "fail"}
    )
    if not fails:
        return None
    return Indicator("auth_results_fail", W_AUTH_FAIL * min(len(fails), 2), ", ".join(fails) + " failed")


def credential_form(parsed: ParsedMessage) -> Indicator | None:
    if parsed.has_password_input:
        return Indicator("html_form", W_PASSWORD_FORM, "a form in the message asks for a password")
    if parsed.has_form:
        return Indicator("html_form", W_FORM, "a form in the message")
    return None


def ip_address_link(parsed: ParsedMessage) -> Indicator | None:
    for host in parsed.url_hosts():
        if _IP_HOST.match(host) and is_public_ip(host):
            return Indicator("ip_address_link", W_IP_LINK, host)
    return None


def mixed_script_word(value: str) -> str | None:
    """The first word of ``value`` that mixes Latin with Cyrillic or Greek letters (or a
    syllabic letter in Latin text)."""
    if value.isascii():
        return None
    syllabic = _SYLLABICS.search(value)
    if syllabic and _LATIN.search(value):
        return syllabic.group(0)
    for word in _WORD.findall(value):
        if not word.isascii() and _LATIN.search(word) and _CYRILLIC_GREEK.search(word):
            return word
    return None


def obfuscated_text(parsed: ParsedMessage) -> Indicator | None:
    name, _ = parsed.sender()
    subject = parsed.header("subject")
    for where, value in (("sender name", name), ("subject", subject)):
        if _INVISIBLE.search(value) or len(_MATH_LETTERS.findall(value)) >= 3:
            return Indicator(
                "obfuscated_text", W_OBFUSCATED, f"invisible or look-alike characters in the {where}"
            )
        mixed = mixed_script_word(value)
        if mixed:
            return Indicator(
                "obfuscated_text", W_OBFUSCATED, f"{mixed!r} in the {where} mixes alphabets"[:200]
            )
    text = parsed.text[:20_000]
    # Characters beyond the BMP take two UTF-16 units: a cheap test before the searches.
    astral = not text.isascii() and len(text.encode("utf-16-le", "surrogatepass")) > 2 * len(text)
    if (astral and len(_TEXT_HIDDEN_MARKS.findall(text)) >= 5) or (
        astral and len(_MATH_LETTERS.findall(text)) >= 10
    ):
        return Indicator("obfuscated_text", W_OBFUSCATED, "invisible or look-alike characters in the text")
    # Spelt-out text ("G r e e t i n g s") opens the message; reading the start is enough.
    opening = text[:2000]
    # Spelt-out text is one third spaces or more; ordinary prose about one sixth.
    if opening.count(" ") * 3 >= len(opening) and _SPACED.search(opening):
        return Indicator("obfuscated_text", W_SPACED_LETTERS, "words spelt out letter by letter")
    return None


def recipient_in_subject(parsed: ParsedMessage) -> Indicator | None:
    _, to = address_of(parsed.header("to"))
    if "@" not in to or len(to) < 6:
        return None
    if to in parsed.header("subject").lower():
        return Indicator(
            "recipient_in_subject", W_RECIPIENT_IN_SUBJECT, "the subject names the recipient's address"
        )
    return None


def malformed_sender(parsed: ParsedMessage) -> Indicator | None:
    if not parsed.header("from"):
        return Indicator("malformed_sender", W_MALFORMED_SENDER, "no From header")
    _, addr = parsed.sender()
    local, at, domain = addr.rpartition("@")
    if not at or not local or "@" in local or not _VALID_DOMAIN.match(domain):
        return Indicator("malformed_sender", W_MALFORMED_SENDER, f"From address {addr!r}"[:200])
    return None


def _free_hosted(host: str) -> str | None:
    labels = host.split(".")
    for i in range(max(0, len(labels) - 4), len(labels) - 1):
        suffix = ".".join(labels[i:])
        if suffix in _FREE_HOSTING:
            return suffix
    return None


def free_hosting(parsed: ParsedMessage) -> Indicator | None:
    _, domain = _sender(parsed)
    hosted = _free_hosted(domain)
    if hosted:
        return Indicator("free_hosting", W_FREE_HOSTING_SENDER, f"sent from {domain}"[:200])
    for host in dict.fromkeys(parsed.url_hosts()):
        hosted = _free_hosted(host)
        if hosted:
            return Indicator("free_hosting", W_FREE_HOSTING_LINK, f"links to {host}"[:200])
    return None


def lure_terms(parsed: ParsedMessage) -> Indicator | None:
    text = parsed.lower_text()
    found = set(parsed.lower_words() & wording.LURE_WORDS)
    found.update(p for p in wording.LURE_PHRASES if p in text)
    if len(found) < 2:
        return None
    return Indicator("lure_terms", W_LURE, ", ".join(sorted(found)[:5]))


# Mailboxes made up by bulk senders: two words and a serial number ("conrad_ouimet_1281"),
# not a year ("ci_build_2024").
_GENERATED_LOCAL = re.compile(r"^[a-z]{2,20}_[a-z]{2,20}_(?!(?:19|20)\d\d$)\d{3,}$", re.I)


def generated_sender(parsed: ParsedMessage) -> Indicator | None:
    _, addr = parsed.sender()
    local = addr.rpartition("@")[0]
    if local and _GENERATED_LOCAL.match(local):
        return Indicator("generated_sender", W_GENERATED_SENDER, f"made-up mailbox {addr}"[:200])
    return None


# A string of random letters and digits in the subject or the sender's name
# ("Crédito IR Liberado - maHSkh0WLRUIp"): bulk senders make each copy unique to slip past
# filters that count copies. Upper and lower case and digits, switching at least four times;
# not a part of a longer, hyphenated name (a product code such as "RBD52G-5HacD2HnD"), nor
# words and numbers run together ("iPhone15Pro", "INV2026Dec01").
_RANDOM_CANDIDATE = re.compile(r"(?<![\w.@/%=+-])[A-Za-z0-9]{8,40}(?![\w@/%=+-])")
_RUN_TOGETHER = re.compile(r"[a-z]?(?:[A-Z][a-z]+|\d+|[A-Z]{2,}(?=\d|$))+")


def _is_random(token: str) -> bool:
    if token.isalpha() or token.isdigit() or token.islower() or token.isupper():
        return False
    if not any(c.isdigit() for c in token) or _RUN_TOGETHER.fullmatch(token):
        return False
    kinds = ["u" if c.isupper() else "l" if c.islower() else "d" for c in token]
    return sum(a != b for a, b in itertools.pairwise(kinds)) >= 4


def random_string(parsed: ParsedMessage) -> Indicator | None:
    name, _ = parsed.sender()
    for where, value in (("subject", parsed.header("subject")), ("sender name", name)):
        for token in _RANDOM_CANDIDATE.findall(value[:1000]):
            if _is_random(token):
                return Indicator("random_string", W_RANDOM_STRING, f"{where}: {token}"[:200])
    return None


# A serial number in the sender's name ("BB - Valores a Receber - 567213892811406", "Bloqueio
# por fraude20880091"): bulk senders number their copies, or pose as a case or protocol
# number. People and companies name themselves without one (no ham of either corpus does).
# An address in the name, or the number of the sender's own mailbox (QQ mail addresses are
# numbers, and their owners' names often repeat them), is not such a serial.
_SERIAL = re.compile(r"\d{6,}")
_ADDRESS_IN_NAME = re.compile(r"\S*@\S*")


def serial_sender_name(parsed: ParsedMessage) -> Indicator | None:
    name, addr = parsed.sender()
    if not name or not any(c.isdigit() for c in name):
        return None
    local = addr.rpartition("@")[0]
    for m in _SERIAL.finditer(_ADDRESS_IN_NAME.sub(" ", name[:300])):
        if m.group(0) not in local:
            return Indicator("serial_sender_name", W_SERIAL_SENDER_NAME, f"sender name: {name}"[:200])
    return None


# Advance-fee fraud: a sum in the millions beside an inheritance, donation or transfer.
_FEE_WORDS = frozenset(
    [
        "beneficiary",
        "beneficiaries",
        "inheritance",
        "donation",
        "donations",
        "consignment",
        "deceased",
        "barrister",
        "lottery",
        "unclaimed",
    ]
)
_FEE_PHRASES = ("next of kin", "compensation fund", "atm card", "fund transfer", "transfer of the fund")
_MILLIONS = re.compile(
    r"(?:us\$|\$|usd|€|£)\s?\d{1,3}(?:[,.]\d{3}){2,}"
    r"|\d{1,3}(?:[,.]\d{3}){2,}(?:[,.]\d\d)?\s?(?:usd|dollars|euros?|eur|gbp)"
    r"|\b\d+(?:[.,]\d+)?\s?(?:million|m)\s?(?:usd|dollars|euros?|us dollars)"
)


def advance_fee(parsed: ParsedMessage) -> Indicator | None:
    text = parsed.lower_text()
    words = parsed.lower_words()
    cue = wording.first_word(words, _FEE_WORDS) or wording.first_phrase(text, _FEE_PHRASES, words)
    if not cue:
        return None
    m = _MILLIONS.search(text)
    if not m:
        return None
    return Indicator("advance_fee", W_ADVANCE_FEE, f'"{m.group(0)}" with "{cue}"'[:200])


# A quoted line: the first one, or one after a line break (a literal start the regex engine
# skips to at C speed, where "^" was tried at every character).
_FIRST_QUOTE_LINE = re.compile(r"[ \t]*>")
_LATER_QUOTE_LINE = re.compile(r"\n[ \t]*>")


def _quotes_twice(text: str, end: int = 20_000) -> bool:
    """Whether two lines of ``text[:end]`` quote (start with ``>`` after any blanks)."""
    first = 1 if _FIRST_QUOTE_LINE.match(text, 0, end) else 0
    later = itertools.islice(_LATER_QUOTE_LINE.finditer(text, 0, end), 2 - first)
    return first + sum(1 for _ in later) >= 2


def thread_reply(parsed: ParsedMessage) -> Indicator | None:
    if not (parsed.header("in-reply-to") or parsed.header("references")):
        return None
    if _quotes_twice(parsed.text):
        return Indicator("thread_reply", W_THREAD_REPLY + W_QUOTED_REPLY, "a reply in a thread, quoting it")
    return Indicator("thread_reply", W_THREAD_REPLY, "a reply in a thread")


SINGLE_RULES: tuple[Rule, ...] = (
    thread_reply,
    obfuscated_text,
    recipient_in_subject,
    malformed_sender,
    free_hosting,
    lure_terms,
    generated_sender,
    advance_fee,
    random_string,
    serial_sender_name,
    link_text_mismatch,
    lookalike_domain,
    display_name_spoofs_brand,
    credential_request,
    payment_request,
    html_only_hidden_text,
    auth_results_fail,
    credential_form,
    ip_address_link,
)


def evaluate_rules(parsed: ParsedMessage, *, time_budget: float = 0.5) -> list[Indicator]:
    """The indicators of every rule that fires on ``parsed``, within ``time_budget`` seconds."""
    deadline = time.monotonic() + time_budget
    out: list[Indicator] = []
    out.extend(risky_attachments(parsed))
    out.extend(date_and_message_id(parsed))
    for rule in SINGLE_RULES:
        if time.monotonic() > deadline:
            parsed.limit("rules_time_budget")
            break
        indicator = rule(parsed)
        if indicator is not None:
            out.append(indicator)
    return out
