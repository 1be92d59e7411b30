"""What a connection leaves behind when it closes, with --leg-stats or
--log-format summary|json: each leg's TCP_INFO read once, just before its
sockets close (RTT, min RTT, retransmits only); with --leg-stats into the
histograms (histograms.py) and the retransmit counters; with summary or
json, one log line instead of the original's six.

The line (summary; json has the same fields, one object per line):

  [client]:port-->[destination]:port: summary source=[ip]:port
    duration_s=12.345 connect_us=512 bytes_c2s=N bytes_s2c=N end=CFD
    client_rtt_us=210 client_min_rtt_us=100 client_retrans=0
    server_rtt_us=601200 server_min_rtt_us=600400 server_retrans=3

Times in microseconds, as TCP_INFO gives them (integers cost less to write
than milliseconds with decimals). `connect_us` and the server's figures are
`-` (json: null) when the server never accepted. `end` is the termination
code, three letters in the spirit of HAProxy's (TERMINATION_CODES below):
who ended it, how, and in which phase of the connection.
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
# (shutdown, --drain-timeout), E an internal error, L the client's limit
# (--max-per-client), M the daemon full (--max-connections). Phase: C
# connecting to the server, D relaying both ways, H half-closed (one side had
# sent its FIN).
TERMINATION_CODES = """\
CFD  the client sent the first FIN while relaying (a clean end)
SFD  the server sent the first FIN while relaying (a clean end)
CRD  the client reset the connection (or its socket failed) while relaying
SRD  the server reset the connection (or its socket failed) while relaying
CRH  SRH  the same, after one side had sent its FIN
CTD  STD  CTH  STH  that side's socket timed out (--user-timeout, or keepalive gave up)
SRC  the server refused the connection, or was unreachable
STC  the kernel gave up connecting to the server (SYN retries)
PTC  --connect-timeout: the server did not accept in time
PTD  PTH  --idle-timeout
PKD  PKH  PKC  the daemon closed it (shutdown, --drain-timeout)
PED  PEH  PEC  an internal error (logged with a traceback)
PLC  --max-per-client: the client was refused (reset) on arrival
PMC  --max-connections with --when-full reset: the client was reset on arrival"""



class Closing:
    """Connection's on_end: called once per connection, before its sockets
    close. slot: this worker's histograms, None without --leg-stats."""
    __slots__ = ("log", "json", "slot", "ctr")

    def __init__(self, log: Log | None, fmt: str, slot, ctr):
        self.log = log if fmt != "original" else None
        self.json = fmt == "json"
        self.slot = slot
        self.ctr = ctr

    def __call__(self, conn: Connection, now: float) -> None:
        connected = conn.c2s is not None
        client = tcpinfo.at_close(conn.client)
        server = tcpinfo.at_close(conn.server) if connected else None
        duration = now - conn.started
        if self.slot is not None:
            self._count(conn, duration, client, server)
        if self.log is not None:
            if self.json:
                self.log.raw(json_line(conn, duration, client, server))
            else:
                self.log.info(summary_line(conn, duration, client, server))

    def refused(self, peer: tuple, dst: tuple, end: str) -> None:
        """A limit turned the client away on arrival (end: PLC or PMC): its
        line, nothing more (it never became a connection: no histogram
        counts it)."""
        if self.log is None:
            return
        client, dst = format_sockaddr(peer), format_sockaddr(dst)
        if self.json:
            self.log.raw(f'{{"time": {_time():.3f}, "client": "{client}", "destination": '
                         f'"{dst}", "source": null, "duration_s": 0.0, "connect_us": null, '
                         f'"bytes_c2s": 0, "bytes_s2c": 0, "end": "{end}", "client_leg": null, '
                         f'"server_leg": null}}')
        else:
            self.log.info(f"{client}-->{dst}: summary source=- duration_s=0.000 connect_us=- "
                          f"bytes_c2s=0 bytes_s2c=0 end={end} client_rtt_us=- "
                          "client_min_rtt_us=- client_retrans=- server_rtt_us=- "
                          "server_min_rtt_us=- server_retrans=-")

    def _count(self, conn: Connection, duration: float, client, server) -> None:
        slot = self.slot
        histograms.observe(slot, histograms.DURATION, duration)
        if conn.c2s is not None:
            histograms.observe(slot, histograms.CONNECT, conn.connected - conn.started)
        if client is not None:
            histograms.observe(slot, histograms.RTT_CLIENT, client[0] / 1e6)
            self.ctr[counters.RETRANS_CLIENT] += client[1]
        if server is not None:
            histograms.observe(slot, histograms.RTT_SERVER, server[0] / 1e6)
            self.ctr[counters.RETRANS_SERVER] += server[1]


_UNKNOWN = ("-", "-", "-")  # a leg whose TCP_INFO could not be read, or never was


def summary_line(conn: Connection, duration: float, client, server) -> str:
    """One f-string, integers in microseconds: this line replaces six, and
    must not cost more than they do (bench/logcost.py)."""
    c2s, s2c = conn.c2s, conn.s2c
    client, server = client or _UNKNOWN, server or _UNKNOWN
    connect = int((conn.connected - conn.started) * 1e6) if c2s is not None else "-"
    return (f"{conn.id}: summary source={conn.source} duration_s={duration:.3f} "
            f"connect_us={connect} bytes_c2s={c2s.moved if c2s else 0} "
            f"bytes_s2c={s2c.moved if s2c else 0} end={conn.end_code()} "
            f"client_rtt_us={client[0]} client_min_rtt_us={client[2]} "
            f"client_retrans={client[1]} server_rtt_us={server[0]} "
            f"server_min_rtt_us={server[2]} server_retrans={server[1]}")


def _json_leg(leg: tuple | None) -> str:
    if leg is None:
        return "null"
    return f'{{"rtt_us": {leg[0]}, "min_rtt_us": {leg[2]}, "retrans": {leg[1]}}}'


def json_line(conn: Connection, duration: float, client, server) -> str:
    """The same fields as a JSON object (made by hand: every value is a
    number or an address, which needs no escaping; tests parse it)."""
    c2s, s2c = conn.c2s, conn.s2c
    connect = int((conn.connected - conn.started) * 1e6) if c2s is not None else "null"
    return (f'{{"time": {_time():.3f}, "client": "{format_sockaddr(conn.peer)}", '
            f'"destination": "{format_sockaddr(conn.dst)}", "source": "{conn.source}", '
            f'"duration_s": {duration:.3f}, "connect_us": {connect}, '
            f'"bytes_c2s": {c2s.moved if c2s else 0}, "bytes_s2c": {s2c.moved if s2c else 0}, '
            f'"end": "{conn.end_code()}", "client_leg": {_json_leg(client)}, '
            f'"server_leg": {_json_leg(server)}}}')
