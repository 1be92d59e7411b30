"""Addresses as the original wrote them: ``host:port``, ``[numeric]`` parts.

The string is split at its LAST colon, so ``[::1]:[80]`` works. A part in
square brackets is numeric and never resolved; a bare part goes through
getaddrinfo. Anything that resolves to nothing, or to more than one address,
is refused: the operator must say which one.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .errors import AddressError


@dataclass(frozen=True, slots=True)
class Address:
    family: int
    host: str
    port: int

    @property
    def sockaddr(self) -> tuple:
        return (self.host, self.port)

    @property
    def is_wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified

    def __str__(self) -> str:
        return format_sockaddr(self.sockaddr)


def format_sockaddr(sockaddr: tuple) -> str:
    """``[ip]:port``, the form of every address in the log."""
    return f"[{sockaddr[0]}]:{sockaddr[1]}"


def _strip(part: str) -> tuple[str, bool]:
    """(text, numeric): brackets mark a part that must not be resolved."""
    if len(part) >= 2 and part[0] == "[" and part[-1] == "]":
        return part[1:-1], True
    return part, False


def parse(text: str) -> Address:
    """Resolve ``host:port`` to exactly one TCP address, or raise AddressError."""
    colon = text.rfind(":")
    if colon < 0:
        raise AddressError(f'Invalid bind string "{text}": could not find \':\'')
    host, numeric_host = _strip(text[:colon])
    port, numeric_port = _strip(text[colon + 1:])
    if numeric_port and not (port.isdigit() and int(port) <= 65535):
        raise AddressError(f'Can not bind to "{text}": [{port}] is not a port number')
    flags = socket.AI_PASSIVE
    if numeric_host:
        flags |= socket.AI_NUMERICHOST
    if numeric_port:
        flags |= socket.AI_NUMERICSERV
    try:
        infos = socket.getaddrinfo(host or None, port or None, 0,
                                   socket.SOCK_STREAM, socket.IPPROTO_TCP, flags)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise AddressError(f'Can not bind to "{text}": Could not resolve ({reason})') from None
    found = []
    for family, _, _, _, sockaddr in infos:
        addr = Address(family, sockaddr[0], sockaddr[1])
        if addr not in found:
            found.append(addr)
    if len(found) > 1:
        listing = "".join(f"\n  {a}" for a in found)
        raise AddressError(f'Can not bind to "{text}": Resolves to multiple entries:{listing}')
    return found[0]
