"""TLS handshake faults that are the account's configuration, not the network's.

``tls: ssl`` against a plain-text port (or a plain connection that meets a TLS server's
answer) fails in OpenSSL with a protocol error such as ``WRONG_VERSION_NUMBER``: retrying
cannot help, so IMAP and SMTP both fail such a fault at once, with a message that points at
the account's ``tls`` setting. A handshake cut short (``SSLEOFError``, a reset) is still a
network fault and retries.
"""

from __future__ import annotations

import ssl

#: OpenSSL's reasons for a peer that does not speak TLS where TLS was asked for, or not a
#: version or protocol this client speaks.
MISMATCH_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "UNSUPPORTED_PROTOCOL",
        "WRONG_SSL_VERSION",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LENGTH_MISMATCH",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
        "NO_PROTOCOLS_AVAILABLE",
        "UNSUPPORTED_PROTOCOL_VERSION",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "VERSION_TOO_LOW",
        "VERSION_TOO_HIGH",
    }
)


def tls_mismatch(exc: BaseException) -> ssl.SSLError | None:
    """The TLS protocol error in ``exc`` or in what it wraps (a short chain: aiosmtplib
    wraps the handshake's error in ``SMTPConnectError``), or None when there is none."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError) and getattr(seen, "reason", None) in MISMATCH_REASONS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def mismatch_message(what: str, protocol: str, error: ssl.SSLError) -> str:
    """What the task reports: the fault, and the setting to check."""
    field = protocol.lower()
    implicit, plain = ("993", "143") if field == "imap" else ("465", "587 or 25")
    return (
        f"{what}: no TLS connection with the {protocol} server ({error.reason}): check the account's "
        f"{field}.tls setting (ssl for a port that starts with TLS, usually {implicit}; "
        f"starttls for a plain port that offers STARTTLS, usually {plain})"
    )
