"""What the kernel knows of one leg of a connection: TCP_INFO, read when an
operator asks (show conn, show conns full, top) or, with --leg-stats, once
at close. Never per event: each read is a system call.

A leg is plain TCP, or Multipath TCP (the outgoing leg with -M, the client's
with --mptcp-listen): then it is made of subflows, each a TCP connection
with a tcp_info of its own (MPTCP_TCPINFO), and the leg's figures are
theirs combined: counts, bytes and rates (delivery, pacing: the subflows
carry at once) summed, min RTT the least, the smoothed RTT, window,
ssthresh and MSS those of the subflow that carried the most bytes. `ss -ti`
shows the same numbers (the subflows as TCP sockets); `ss -Mi` the subflow
count.

The layout is Linux's struct tcp_info (include/uapi/linux/tcp.h) up to
tcpi_snd_wnd (Linux 5.19); an older kernel returns less and the missing
fields read 0; a newer one has more, which we do not ask for.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from typing import NamedTuple

TCP_INFO = 11
TCP_CONGESTION = 13
SOL_MPTCP = 284
MPTCP_INFO = 1
MPTCP_TCPINFO = 2
IPPROTO_MPTCP = 262

# 8 bytes of u8, 24 u32 (tcpi_rto .. tcpi_total_retrans), 4 u64 (pacing ..
# bytes_received), 6 u32 (segs_out .. data_segs_out), 4 u64 (delivery_rate ..
# sndbuf_limited), 2 u32 (delivered, delivered_ce), 2 u64 (bytes_sent,
# bytes_retrans), 4 u32 (dsack_dups .. snd_wnd).
_TCP_INFO = struct.Struct("=8B24I4Q6I4Q2I2Q4I")
# Indices of the fields we report in _TCP_INFO's tuple.
(_STATE, _RTO, _SND_MSS, _UNACKED, _LOST, _RTT, _RTTVAR, _SSTHRESH, _CWND, _TOTAL_RETRANS,
 _PACING, _BYTES_ACKED, _BYTES_RECEIVED, _NOTSENT, _MIN_RTT, _DELIVERY, _BYTES_SENT,
 _BYTES_RETRANS) = (0, 8, 10, 12, 14, 23, 24, 25, 26, 31, 32, 34, 35, 38, 39, 42, 48, 49)
_SUBFLOW_DATA = struct.Struct("=4I")  # struct mptcp_subflow_data
MAX_SUBFLOWS = 8  # the kernel's own limit (net.mptcp's subflows max) is 8
# ssthresh "infinite" until the first loss (TCP_INFINITE_SSTHRESH); ss omits it.
INFINITE_SSTHRESH = 0x7FFFFFFF


class Leg(NamedTuple):
    """One leg's state. Times in microseconds, rates in bytes per second,
    windows in segments, counts since the leg began."""
    rtt_us: int            # smoothed RTT (srtt)
    rttvar_us: int
    min_rtt_us: int
    cwnd: int
    ssthresh: int          # 0: none yet (no loss seen)
    retrans: int           # segments retransmitted (tcpi_total_retrans)
    lost: int              # segments now considered lost
    delivery_rate: int
    pacing_rate: int
    bytes_acked: int       # sent and acknowledged by the peer
    bytes_received: int
    bytes_retrans: int
    unacked: int           # segments in flight
    notsent: int           # bytes written but not yet sent
    mss: int
    congestion: str        # the algorithm in force ("" if unknown)
    subflows: int          # 0: plain TCP; else the MPTCP subflows now


def _tcp_info(raw: bytes) -> tuple:
    return _TCP_INFO.unpack(raw[:_TCP_INFO.size].ljust(_TCP_INFO.size, b"\0"))


def parse(raw: bytes, congestion: str = "", subflows: int = 0) -> Leg:
    """A leg from the bytes of a struct tcp_info."""
    f = _tcp_info(raw)
    ssthresh = f[_SSTHRESH]
    return Leg(f[_RTT], f[_RTTVAR], f[_MIN_RTT], f[_CWND],
               0 if ssthresh >= INFINITE_SSTHRESH else ssthresh, f[_TOTAL_RETRANS], f[_LOST],
               f[_DELIVERY], f[_PACING] if f[_PACING] != 2**64 - 1 else 0,
               f[_BYTES_ACKED], f[_BYTES_RECEIVED], f[_BYTES_RETRANS], f[_UNACKED],
               f[_NOTSENT], f[_SND_MSS], congestion, subflows)


def combine(subflows: list[Leg], congestion: str) -> Leg:
    """An MPTCP leg from its subflows (see the module's description)."""
    main = max(subflows, key=lambda s: s.bytes_acked + s.bytes_received)
    total = [sum(column) for column in zip(*(s[:15] for s in subflows), strict=True)]
    return main._replace(
        min_rtt_us=min((s.min_rtt_us for s in subflows if s.min_rtt_us), default=0),
        retrans=total[5], lost=total[6], delivery_rate=total[7], pacing_rate=total[8],
        bytes_acked=total[9], bytes_received=total[10], bytes_retrans=total[11],
        unacked=total[12], notsent=total[13], congestion=congestion, subflows=len(subflows))


def read(sock: socket.socket | None, detail: bool = True) -> Leg | None:
    """The leg of sock now; None when there is no socket or it is closed.
    detail=False skips what costs another system call (the congestion
    control's name; an MPTCP leg's subflows: then the first subflow's
    figures, as TCP_INFO gives them on an MPTCP socket)."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCP_INFO.size)
        congestion = _congestion(sock) if detail else ""
        if detail and sock.proto == IPPROTO_MPTCP:
            subflows = [parse(s) for s in mptcp_subflows(sock.fileno())]
            if subflows:
                return combine(subflows, congestion)
    except OSError:
        return None
    return parse(raw, congestion)


# At close only what the summary and the histograms use, read straight from
# the bytes: tcpi_rtt (offset 68), tcpi_total_retrans (100), tcpi_min_rtt (148).
_AT_CLOSE = struct.Struct("=68xI28xI44xI")


def at_close(sock: socket.socket) -> tuple[int, int, int] | None:
    """(smoothed RTT us, retransmitted segments, min RTT us) of sock, or
    None: the cheap reading summary.Closing makes of every connection. An
    MPTCP leg's from all its subflows, as combine() makes them (TCP_INFO on
    an MPTCP socket gives its first subflow's alone)."""
    try:
        if sock.proto == IPPROTO_MPTCP:
            subflows = mptcp_subflows(sock.fileno())
            if subflows:
                leg = combine([parse(raw) for raw in subflows], "")
                return leg.rtt_us, leg.retrans, leg.min_rtt_us
        return _AT_CLOSE.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _AT_CLOSE.size))
    except (OSError, struct.error):
        return None


def _congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).split(b"\0", 1)[0].decode()


_libc = ctypes.CDLL(None, use_errno=True)


def mptcp_subflows(fd: int) -> list[bytes]:
    """Each subflow's struct tcp_info (MPTCP_TCPINFO); [] for a socket that
    fell back to plain TCP. Through libc: the request carries a header the
    kernel reads, which Python's getsockopt() cannot pass.

    A fallen-back socket hands SOL_MPTCP to its one TCP subflow, whose IP
    layer refuses the level: EOPNOTSUPP over IPv4, ENOPROTOOPT over IPv6."""
    size = _SUBFLOW_DATA.size + MAX_SUBFLOWS * _TCP_INFO.size
    buf = ctypes.create_string_buffer(_SUBFLOW_DATA.pack(_SUBFLOW_DATA.size, 0, 0,
                                                         _TCP_INFO.size), size)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(fd, SOL_MPTCP, MPTCP_TCPINFO, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):  # fallen back to TCP
            return []
        raise OSError(err, "MPTCP_TCPINFO")
    _, count, _, each = _SUBFLOW_DATA.unpack_from(buf.raw)
    start = _SUBFLOW_DATA.size
    return [buf.raw[start + i * each:start + (i + 1) * each]
            for i in range(min(count, MAX_SUBFLOWS))]


# -- how operators read it ------------------------------------------------------

def ms(us: int) -> str:
    return f"{us / 1000:.3f}"


def brief(leg: Leg | None) -> str:
    """The wide `show conns` columns of one leg: rtt/rttvar ms, min RTT ms,
    cwnd, retransmits, lost, delivery rate (bytes/s), unacked, not sent."""
    if leg is None:
        return "\t".join("-" * 8)
    return (f"{ms(leg.rtt_us)}/{ms(leg.rttvar_us)}\t{ms(leg.min_rtt_us)}\t{leg.cwnd}"
            f"\t{leg.retrans}\t{leg.lost}\t{leg.delivery_rate}\t{leg.unacked}\t{leg.notsent}")


BRIEF_HEADER = "rtt_ms min_rtt_ms cwnd retrans lost delivery_Bps unacked notsent"


def describe(leg: Leg | None) -> str:
    """Everything of one leg, `key=value` words (show conn)."""
    if leg is None:
        return "-"
    words = [f"cc={leg.congestion or '-'}", f"rtt_ms={ms(leg.rtt_us)}",
             f"rttvar_ms={ms(leg.rttvar_us)}", f"min_rtt_ms={ms(leg.min_rtt_us)}",
             f"cwnd={leg.cwnd}", f"ssthresh={leg.ssthresh or '-'}", f"mss={leg.mss}",
             f"retrans={leg.retrans}", f"lost={leg.lost}",
             f"delivery_rate_Bps={leg.delivery_rate}", f"pacing_rate_Bps={leg.pacing_rate}",
             f"bytes_acked={leg.bytes_acked}", f"bytes_received={leg.bytes_received}",
             f"bytes_retrans={leg.bytes_retrans}", f"unacked={leg.unacked}",
             f"notsent={leg.notsent}"]
    if leg.subflows:
        words.append(f"subflows={leg.subflows}")
    return " ".join(words)
