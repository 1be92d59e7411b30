"""What a connection leaves behind when it closes, with --leg-stats or
--log-format summary|json: each leg's TCP_INFO read once, just before its
sockets close, into the histograms (histograms.py) and the retransmit
counters; and with summary or json, one log line instead of the original's
six.

The line (summary; json has the same fields, one object per line):

  [client]:port-->[destination]:port: summary source=[ip]:port
    duration_s=12.345 connect_ms=0.512 bytes_c2s=N bytes_s2c=N end=CFD
    client_rtt_ms=0.210 client_min_rtt_ms=0.100 client_retrans=0
    server_rtt_ms=601.2 server_min_rtt_ms=600.4 server_retrans=3

`connect_ms` and the server's figures are `-` (json: null) when the server
never accepted. `end` is the termination code, three letters in the spirit
of HAProxy's (TERMINATION_CODES below): who ended it, how, and in which
phase of the connection.
"""

from __future__ import annotations

from time import time as _time
from typing import TYPE_CHECKING

from . import counters, histograms, tcpinfo
from .address import format_sockaddr
from .logs import Log

if TYPE_CHECKING:
    from .connection import Connection

# Who: C the client, S the server, P this proxy. How: F a FIN (the clean end
# begins), R a reset or a socket error, T a timeout, K closed by the daemon
# (shutdown, --drain-timeout), E an internal error. Phase: C connecting to the
# server, D relaying both ways, H half-closed (one side had sent its FIN).
TERMINATION_CODES = """\
CFD  the client sent the first FIN while relaying (a clean end)
SFD  the server sent the first FIN while relaying (a clean end)
CRD  the client reset the connection (or its socket failed) while relaying
SRD  the server reset the connection (or its socket failed) while relaying
CRH  SRH  the same, after one side had sent its FIN
SRC  the server refused the connection, or was unreachable
STC  the kernel gave up connecting to the server (SYN retries)
PTC  --connect-timeout: the server did not accept in time
PTD  PTH  --idle-timeout
PKD  PKH  PKC  the daemon closed it (shutdown, --drain-timeout)
PED  PEH  PEC  an internal error (logged with a traceback)"""



class Closing:
    """Connection's on_end: called once per connection, before its sockets
    close."""
    __slots__ = ("log", "json", "slot", "ctr")

    def __init__(self, log: Log | None, fmt: str, slot, ctr):
        self.log = log if fmt != "original" else None
        self.json = fmt == "json"
        self.slot = slot  # this worker's histograms
        self.ctr = ctr    # and counters

    def __call__(self, conn: Connection, now: float) -> None:
        connected = conn.c2s is not None
        client = tcpinfo.read(conn.client, detail=False)
        server = tcpinfo.read(conn.server, detail=False) if connected else None
        slot, duration = self.slot, now - conn.started
        histograms.observe(slot, histograms.DURATION, duration)
        if connected:
            histograms.observe(slot, histograms.CONNECT, conn.connected - conn.started)
        if client is not None:
            histograms.observe(slot, histograms.RTT_CLIENT, client.rtt_us / 1e6)
            self.ctr[counters.RETRANS_CLIENT] += client.retrans
        if server is not None:
            histograms.observe(slot, histograms.RTT_SERVER, server.rtt_us / 1e6)
            self.ctr[counters.RETRANS_SERVER] += server.retrans
        if self.log is not None:
            if self.json:
                self.log.raw(json_line(conn, duration, client, server))
            else:
                self.log.info(summary_line(conn, duration, client, server))


def _leg(name: str, leg: tcpinfo.Leg | None) -> str:
    if leg is None:
        return f"{name}_rtt_ms=- {name}_min_rtt_ms=- {name}_retrans=-"
    return (f"{name}_rtt_ms={leg.rtt_us / 1000:.3f} {name}_min_rtt_ms={leg.min_rtt_us / 1000:.3f}"
            f" {name}_retrans={leg.retrans}")


def summary_line(conn: Connection, duration: float, client, server) -> str:
    c2s, s2c = conn.c2s, conn.s2c
    connect = f"{(conn.connected - conn.started) * 1000:.3f}" if c2s is not None else "-"
    return (f"{conn.id}: summary source={conn.source} duration_s={duration:.3f} "
            f"connect_ms={connect} bytes_c2s={c2s.moved if c2s else 0} "
            f"bytes_s2c={s2c.moved if s2c else 0} end={conn.end_code()} "
            f"{_leg('client', client)} {_leg('server', server)}")


def _json_leg(leg: tcpinfo.Leg | None) -> str:
    if leg is None:
        return "null"
    return (f'{{"rtt_ms": {leg.rtt_us / 1000:.3f}, "min_rtt_ms": {leg.min_rtt_us / 1000:.3f}, '
            f'"retrans": {leg.retrans}}}')


def json_line(conn: Connection, duration: float, client, server) -> str:
    """The same fields as a JSON object (made by hand: every value is a
    number or an address, which needs no escaping; tests parse it)."""
    c2s, s2c = conn.c2s, conn.s2c
    connect = f"{(conn.connected - conn.started) * 1000:.3f}" if c2s is not None else "null"
    return (f'{{"time": {_time():.3f}, "client": "{format_sockaddr(conn.peer)}", '
            f'"destination": "{format_sockaddr(conn.dst)}", "source": "{conn.source}", '
            f'"duration_s": {duration:.3f}, "connect_ms": {connect}, '
            f'"bytes_c2s": {c2s.moved if c2s else 0}, "bytes_s2c": {s2c.moved if s2c else 0}, '
            f'"end": "{conn.end_code()}", "client_leg": {_json_leg(client)}, '
            f'"server_leg": {_json_leg(server)}}}')
