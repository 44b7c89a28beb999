"""Which mail hosts an account may point at, and the one way to connect to them.

A host name is resolved exactly once per connection (:func:`resolve_host`); every address
of that answer is checked, and the connection is made to those checked addresses
(:func:`connect_pinned`, :func:`connect_pinned_async`) while the name is kept for TLS
certificate checks and SNI. A second lookup at connect time would let a tenant's DNS answer
with a public address for the check and an internal one for the connection (DNS
rebinding), so nothing here looks a name up twice.

Unless ``MAILROOM_ALLOW_PRIVATE_HOSTS`` is on (embedded mode and tests), any address that
is not globally routable is refused, so a tenant cannot use Mailroom to probe the networks
it runs in. ``tls: none`` is refused for any host with a public address: plain text is for
loopback and private servers only. The API (create, change) and the workers (verify, sync,
body fetch) go through the same :func:`resolve_host`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from services.errors import ValidationFailed

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges Python's ``is_global`` lets through (or does not on every version) that are still
# not a public mail server: shared address space for carrier-grade NAT, IETF protocol
# assignments (including the anycast 192.0.0.9/10), benchmarking, the reserved class E,
# multicast, and "this network".
_REFUSED_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
# Global unicast is 2000::/3; everything outside it (loopback, ULA fc00::/7, link-local,
# site-local, multicast, IPv4-compatible ::/96) is refused by the allow-list below.
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # embeds the v4 it reaches
_REFUSED_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "2001::/32",  # Teredo: the tunnelled v4 endpoint is the client's to choose
        "2001:db8::/32",  # documentation
        "2001:2::/48",  # benchmarking
        "2001:10::/28",  # ORCHID
    )
)


def is_public_address(address: str) -> bool:
    """True when ``address`` (an IP literal, optionally with a ``%zone``) is globally
    routable unicast; an IPv6 form that embeds an IPv4 address (mapped, NAT64, 6to4) is
    judged by the address it embeds."""
    ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            return _public_v4(embedded)
        if ip not in _GLOBAL_UNICAST_V6 or any(ip in net for net in _REFUSED_V6):
            return False
        return ip.is_global and not ip.is_multicast
    return _public_v4(ip)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour  # 2002::/16 carries the v4 relay address in bits 16-48


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not any(ip in net for net in _REFUSED_V4)


@dataclass(frozen=True)
class PinnedHost:
    """One lookup's answer: connect to ``sockaddrs``, present ``name`` for TLS and SNI."""

    name: str
    port: int
    sockaddrs: tuple[tuple[int, tuple[object, ...]], ...]  # (family, sockaddr) in answer order

    @property
    def addresses(self) -> list[str]:
        return [str(sockaddr[0]) for _, sockaddr in self.sockaddrs]


def pin(name: str, port: int, addresses: list[str]) -> PinnedHost:
    """A :class:`PinnedHost` for IP literals, without a lookup (tests, and callers that
    already hold an answer)."""
    sockaddrs: list[tuple[int, tuple[object, ...]]] = []
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address):
            sockaddrs.append((socket.AF_INET6, (address, port, 0, 0)))
        else:
            sockaddrs.append((socket.AF_INET, (address, port)))
    return PinnedHost(name=name, port=port, sockaddrs=tuple(sockaddrs))


def resolve_host(
    host: str, port: int, *, allow_private: bool, field: str, tls: str | None = None
) -> PinnedHost:
    """Resolve ``host`` once and check every address of the answer.

    Raises :class:`ValidationFailed` (details name ``field``) when the name does not
    resolve or, unless ``allow_private``, when any address is not public; and, naming the
    sibling ``.tls`` field, when ``tls`` is ``"none"`` and any address is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        raise ValidationFailed(f"{field}: host {host!r} does not resolve", field=field) from None
    seen: set[tuple[object, ...]] = set()
    sockaddrs: list[tuple[int, tuple[object, ...]]] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6) or sockaddr in seen:
            continue
        seen.add(sockaddr)
        sockaddrs.append((int(family), tuple(sockaddr)))
    if not sockaddrs:
        raise ValidationFailed(f"{field}: host {host!r} has no IP address", field=field)
    pinned = PinnedHost(name=host, port=port, sockaddrs=tuple(sockaddrs))
    public = [is_public_address(a) for a in pinned.addresses]
    if not allow_private and not all(public):
        raise ValidationFailed(
            f"{field}: host {host!r} is on a private or loopback network, which this "
            "Mailroom does not allow (MAILROOM_ALLOW_PRIVATE_HOSTS)",
            field=field,
        )
    if tls == "none" and any(public):
        tls_field = field.rsplit(".", 1)[0] + ".tls" if "." in field else "tls"
        raise ValidationFailed(
            f"{tls_field}: plain text (tls: none) is only for loopback or private servers; "
            f"{host!r} is public, use ssl or starttls",
            field=tls_field,
        )
    return pinned


def connect_pinned(pinned: PinnedHost, timeout: float | None) -> socket.socket:
    """A TCP socket connected to the first reachable pinned address (no lookup)."""
    last: OSError | None = None
    for family, sockaddr in pinned.sockaddrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    assert last is not None
    raise last


async def connect_pinned_async(pinned: PinnedHost, timeout: float | None) -> socket.socket:
    """:func:`connect_pinned` for asyncio: a non-blocking socket, connected without a lookup."""
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for family, sockaddr in pinned.sockaddrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
            return sock
        except OSError as exc:  # TimeoutError included
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    assert last is not None
    raise last
