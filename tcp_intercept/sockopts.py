"""Socket options: transparency, congestion control, keepalive, MPTCP, nodelay.

Linux copies a listening socket's TCP options into every socket it accepts,
so the client side of each connection is configured once, on the listener;
only the outgoing sockets are configured one by one.
"""

from __future__ import annotations

import socket

from .errors import CapabilityError, UsageError

SOL_IP = socket.SOL_IP
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
IPPROTO_MPTCP = getattr(socket, "IPPROTO_MPTCP", 262)

AVAILABLE_CONGESTION = "/proc/sys/net/ipv4/tcp_available_congestion_control"


def available_congestion() -> list[str]:
    try:
        with open(AVAILABLE_CONGESTION) as f:
            return f.read().split()
    except OSError:
        return []


def check_congestion(name: str) -> str:
    """The algorithm, if the kernel offers it; else UsageError naming those it does."""
    offered = available_congestion()
    if name not in offered:
        raise UsageError(f"congestion control {name!r} is not available; "
                         f"the kernel offers: {' '.join(offered) or 'none'} "
                         f"(modprobe tcp_{name} may add it)")
    return name


def mptcp_available() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError:
        return False
    return True


def mptcp_refuses(level: int, option: int, value: object) -> bool:
    """Whether this kernel's MPTCP sockets refuse an option (TCP_USER_TIMEOUT, up to 6.x)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP) as sock:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            return True
    return False


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT); CapabilityError without CAP_NET_ADMIN."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    except PermissionError:
        raise CapabilityError(
            "setting IP_TRANSPARENT was refused: tcp-interceptd needs the "
            "CAP_NET_ADMIN capability (run it as root or grant it)") from None


def tcp_options(config, congestion: str | None) -> list[tuple[int, int, object]]:
    """(level, option, value) for one side of every connection, from a
    Config's nodelay, keepalive and user_timeout."""
    opts: list[tuple[int, int, object]] = []
    if config.nodelay:
        opts.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
    if config.keepalive:
        ka = config.keepalive
        opts += [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                 (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, ka.idle),
                 (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, ka.interval),
                 (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, ka.count)]
    if config.user_timeout:
        opts.append((socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(config.user_timeout * 1000)))
    if congestion:
        opts.append((socket.IPPROTO_TCP, TCP_CONGESTION, congestion.encode()))
    return opts
