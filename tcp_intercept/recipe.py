"""The recipe: what a connection's two legs get, declared, made and applied
in one place.

  client leg   the accepted socket. Linux copies a listening socket's TCP
               options into every socket it accepts, so the command line's
               client-side options are set once, on the listener
               (`listener_options`); a recipe holds only what its
               connections get beyond those (`client_options`), set on the
               accepted socket.
  server leg   our own socket to the original destination: its protocol
               (TCP or MPTCP), its options, and its source: the kernel's
               choice, a fixed address (-B HOST:PORT) or the client's own
               address and port (-B client: spoofing, IP_TRANSPARENT).
  the rest     what the worker applies to the connection as a whole:
               connect and idle timeouts, the per-client limit.

A recipe is made once, from the command line (`from_config`, the default)
or per rule of a policy when the policy is loaded (policy.py): a connection
holds a reference to the one it was given, so choosing costs one lookup,
and a reload never changes what an open connection has. `name` says which
rule made it ("default": the command line).

DSCP "copy" reads the client's SYN, which the listener keeps for us
(TCP_SAVE_SYN, then TCP_SAVED_SYN once per connection): no packet capture.
"""

from __future__ import annotations

import _socket
import errno
import socket
from dataclasses import dataclass

from .config import Config
from .descriptors import Reserve
from .sockopts import IP_BIND_ADDRESS_NO_PORT, IPPROTO_MPTCP, set_transparent, tcp_options

SOCK_FLAGS = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
COPY = -1          # a leg's dscp: the DSCP of the client's SYN
TCP_SAVED_SYN = 28
IPV6_TCLASS = getattr(socket, "IPV6_TCLASS", 67)
SAVED_SYN_MAX = 512  # an IPv6 header, extension headers and a full TCP header fit


@dataclass(frozen=True, eq=False)
class Recipe:
    name: str = "default"
    # The server leg.
    server_proto: int = socket.IPPROTO_TCP
    server_options: tuple = ()
    server_dscp: int | None = None   # a DSCP value, COPY or None (the kernel's)
    spoof_client: bool = False
    listen_port: int = 0             # with spoofing: the port our listeners share
    bind_address: tuple | None = None
    bind_family: int = socket.AF_INET
    bind_no_port: bool = False
    # bind_address for an IPv4 connection through a listener on [::] (an
    # IPv6 socket with mapped addresses); None: the kernel's choice.
    bind_mapped: tuple | None = None
    # The client leg: only what differs from the listener's options.
    client_options: tuple = ()
    client_dscp: int | None = None
    # The connection.
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    max_per_client: int | None = None

    # Whether the client leg needs any work at all (set from the above).
    touches_client: bool = False

    def __post_init__(self):
        object.__setattr__(self, "touches_client", bool(
            self.client_options or self.client_dscp is not None))

    def prepare_client(self, client: socket.socket, dscp: int | None) -> None:
        """Apply the client leg's options; dscp: that of the client's SYN,
        for COPY (the policy read it: policy.py)."""
        if not self.touches_client:
            return
        for level, option, value in self.client_options:
            client.setsockopt(level, option, value)
        if self.client_dscp is not None:
            _set_dscp(client, dscp if self.client_dscp == COPY else self.client_dscp,
                      client.getpeername()[0])

    def open_server(self, family: int, reserve: Reserve) -> socket.socket:
        """A socket toward the server; out of descriptors, it takes the reserve's."""
        try:
            return _socket.socket(family, SOCK_FLAGS, self.server_proto)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE) or not reserve.release():
                raise
        return _socket.socket(family, SOCK_FLAGS, self.server_proto)

    def prepare_server(self, server: socket.socket, peer: tuple, dscp: int | None) -> None:
        """Options and source of the server leg, before connect(); peer is
        the client's address, dscp that of its SYN (prepare_client)."""
        for level, option, value in self.server_options:
            server.setsockopt(level, option, value)
        if self.server_dscp is not None:
            _set_dscp(server, dscp if self.server_dscp == COPY else self.server_dscp, peer[0])
        if self.spoof_client:
            set_transparent(server)
            # The client may reuse its port while our previous socket on it
            # sits in TIME_WAIT; the original failed those connections.
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if peer[1] == self.listen_port:
                # Our listeners hold this port too (see open_listeners).
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            server.bind(peer)
        elif self.bind_address is not None:
            if server.family == socket.AF_INET6 and peer[0].startswith("::ffff:"):
                address = self.bind_mapped
            else:
                address = self.bind_address if server.family == self.bind_family else None
            if address is not None:  # None: of the other family, the kernel's choice
                if self.bind_no_port:
                    # Let connect() pick the port: bind() would refuse ports in
                    # TIME_WAIT and crawl once half the range is (the original did).
                    server.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                server.bind(address)


def from_config(config: Config) -> Recipe:
    """The command line's recipe: every connection's without a policy."""
    return Recipe(server_proto=IPPROTO_MPTCP if config.mptcp else socket.IPPROTO_TCP,
                  server_options=tuple(tcp_options(config, config.congestion)),
                  listen_port=config.listen.port,
                  connect_timeout=config.connect_timeout,
                  idle_timeout=config.idle_timeout,
                  max_per_client=config.max_per_client,
                  **source(config.outgoing))


def source(outgoing) -> dict:
    """The server leg's source fields for an Address, or None (the client's)."""
    if outgoing is None:
        return {"spoof_client": True, "bind_address": None, "bind_mapped": None}
    if outgoing.is_wildcard and outgoing.port == 0:
        return {"spoof_client": False, "bind_address": None, "bind_mapped": None}
    if outgoing.family == socket.AF_INET:
        mapped = (f"::ffff:{outgoing.host}", outgoing.port)
    else:  # an IPv6 address can not send IPv4, but [::] (with a port) can
        mapped = outgoing.sockaddr if outgoing.is_wildcard else None
    return {"spoof_client": False, "bind_address": outgoing.sockaddr,
            "bind_family": outgoing.family, "bind_no_port": outgoing.port == 0,
            "bind_mapped": mapped}


def listener_options(config: Config) -> list[tuple[int, int, object]]:
    """The client leg's options from the command line, set on the listeners."""
    return tcp_options(config, config.client_congestion)


def _set_dscp(sock: socket.socket, dscp: int | None, peer: str) -> None:
    """The DSCP of what sock sends to peer (an address: IPv4-mapped ones
    travel as IPv4 and take IP_TOS)."""
    if dscp is None:
        return
    tos = dscp << 2  # the two ECN bits stay the kernel's
    if sock.family != socket.AF_INET6 or peer.startswith("::ffff:"):
        sock.setsockopt(socket.SOL_IP, socket.IP_TOS, tos)
        return
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TCLASS, tos)
    except OSError as err:
        # Linux's MPTCP sockets refuse IPV6_TCLASS (6.x): such a leg keeps
        # the kernel's DSCP rather than fail the connection.
        if err.errno != errno.EOPNOTSUPP or sock.proto != IPPROTO_MPTCP:
            raise


def syn_fields(syn: bytes) -> tuple[int | None, bool]:
    """(DSCP, whether the SYN offers MPTCP) of a saved SYN: its IP header
    (4 or 6, without extension headers) and its TCP header."""
    if len(syn) < 20:
        return None, False
    version = syn[0] >> 4
    if version == 4:
        dscp, tcp = syn[1] >> 2, (syn[0] & 0x0F) * 4
    elif version == 6 and len(syn) >= 40:
        dscp, tcp = (((syn[0] & 0x0F) << 4) | (syn[1] >> 4)) >> 2, 40
    else:
        return None, False
    return dscp, _offers_mptcp(syn[tcp:])


def _offers_mptcp(tcp: bytes) -> bool:
    if len(tcp) < 20:
        return False
    end = min((tcp[12] >> 4) * 4, len(tcp))
    i = 20
    while i < end:
        kind = tcp[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or tcp[i + 1] < 2:
            break
        if kind == 30:  # MPTCP
            return True
        i += tcp[i + 1]
    return False
