"""Which mail hosts an account may point at.

Hosts on loopback, private, link-local or otherwise internal networks are refused unless
``MAILROOM_ALLOW_PRIVATE_HOSTS`` is on (embedded mode and tests), so a tenant cannot use
Mailroom to probe the networks it runs in.
"""

from __future__ import annotations

import ipaddress
import socket

from services.errors import ValidationFailed


def _is_internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_host(host: str, port: int, *, allow_private: bool, field: str) -> None:
    """Raise :class:`ValidationFailed` when ``host`` is internal and that is not allowed,
    or when it does not resolve at all."""
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ValidationFailed(f"{field}: host {host!r} does not resolve", details={"field": field}) from None
    for info in infos:
        if _is_internal(str(info[4][0])):
            raise ValidationFailed(
                f"{field}: host {host!r} is on a private or loopback network, which this "
                "Mailroom does not allow (MAILROOM_ALLOW_PRIVATE_HOSTS)",
                details={"field": field},
            )
