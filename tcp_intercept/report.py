"""What `show info` and `show conns` say, in plain lines an operator greps
(HAProxy's stats socket is the model: `Key: value`, and a table with a
`#` header line). The control socket, SIGUSR1 and the metrics read the same
numbers; only the text is made here.

A worker describes each of its connections in one tab-separated line
(`encode`); the master merges the workers' lines, oldest first, into the
table (`conns_table`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import counters as c
from . import tcpinfo

CONNS_HEADER = ("# worker client destination source state age_s idle_s "
                "bytes_c2s bytes_s2c pipe")

# show info: the counters and gauges, in their order, under their names.
INFO_COUNTERS = [(field.info, index) for index, field in enumerate(c.FIELDS) if field.info]


def encode(pid: int, snapshot: tuple) -> str:
    """A worker's line for one connection (Connection.snapshot())."""
    started, client, dst, src, state, age, idle, c2s, s2c, pipe = snapshot
    return (f"{started:.6f}\t{pid}\t{client}\t{dst}\t{src}\t{state}\t{age:.1f}\t{idle:.1f}"
            f"\t{c2s}\t{s2c}\t{pipe}")


def conns_table(lines: list[str], full: bool = False) -> list[str]:
    """The workers' lines as the table: a header, then oldest first."""
    rows = sorted((line.split("\t") for line in lines), key=lambda row: float(row[0]))
    return [CONNS_FULL_HEADER if full else CONNS_HEADER, *(" ".join(row[1:]) for row in rows)]


# show conns full: show conns' columns, the connection's id (for show conn),
# then each leg's (c_: client to router, s_: router to server).
LEG_COLUMNS = ("cc", "rtt_ms", "rttvar_ms", "min_rtt_ms", "cwnd", "retrans", "lost",
               "delivery_Bps", "unacked", "notsent", "subflows")
CONNS_FULL_HEADER = " ".join([CONNS_HEADER, "id", *(f"c_{c}" for c in LEG_COLUMNS),
                              *(f"s_{c}" for c in LEG_COLUMNS)])


def _leg_cells(leg: tcpinfo.Leg | None) -> str:
    if leg is None:
        return "\t".join("-" * len(LEG_COLUMNS))
    ms = tcpinfo.ms
    return (f"{leg.congestion or '-'}\t{ms(leg.rtt_us)}\t{ms(leg.rttvar_us)}"
            f"\t{ms(leg.min_rtt_us)}\t{leg.cwnd}\t{leg.retrans}\t{leg.lost}"
            f"\t{leg.delivery_rate}\t{leg.unacked}\t{leg.notsent}\t{leg.subflows}")


def encode_full(pid: int, key: int, snapshot: tuple, client: tcpinfo.Leg | None,
                server: tcpinfo.Leg | None) -> str:
    """A worker's line for one connection in show conns full."""
    return (f"{encode(pid, snapshot)}\t{pid}.{key}\t{_leg_cells(client)}"
            f"\t{_leg_cells(server)}")


def conn_lines(first: dict, second: dict | None) -> list[str]:
    """show conn: one connection (the workers' "conn" answers, listing.py)
    read twice; the second reading (None if it closed in between) gives
    the throughput each way over the time between them."""
    now = second or first
    (_, client, dst, src, state, age, idle, c2s, s2c, pipe) = now["snapshot"]
    pid = now["id"].split(".")[0]
    lines = [f"Id: {now['id']}", f"Worker: {pid}", f"Client: {client}",
             f"Destination: {dst}", f"Source: {src}",
             f"State: {state if second else 'closed (while measuring)'}",
             f"Rule: {now.get('rule') or '-'}",
             f"End: {now.get('end') or '-'}",
             f"Age_s: {age:.1f}", f"Idle_s: {idle:.1f}", f"Pipe: {pipe}",
             f"Bytes_c2s: {c2s}", f"Bytes_s2c: {s2c}"]
    if second:
        seconds = max(second["time"] - first["time"], 1e-3)
        lines += [f"Throughput_c2s_Bps: {(c2s - first['snapshot'][7]) / seconds:.0f}",
                  f"Throughput_s2c_Bps: {(s2c - first['snapshot'][8]) / seconds:.0f}",
                  f"Measured_over_s: {seconds:.2f}"]
    for name in ("client", "server"):
        leg = now[f"{name}_leg"]
        lines.append(f"{name.capitalize()}_leg: "
                     f"{tcpinfo.describe(tcpinfo.Leg(**leg)) if leg else '-'}")
    return lines


@dataclass
class Process:
    """One process of the daemon, as show info lists it."""
    role: str      # "master", or "worker N"
    pid: int
    state: str = ""
    counts: list[int] | None = None  # a worker's counters

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def rss_kib(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0


def info_lines(*, name: str, version: str, options: str, uptime: float,
               processes: list[Process], totals: list[int],
               when_full: str = "queue") -> list[str]:
    master = processes[0]
    days, rest = divmod(int(uptime), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    lines = [f"Name: {name}", f"Version: {version}", f"Pid: {master.pid}",
             f"Uptime: {days}d {hours}h{minutes:02d}m{seconds:02d}s",
             f"Uptime_sec: {int(uptime)}", f"Options: {options}", f"When_full: {when_full}",
             f"Workers: {sum(p.state in ('serving', 'old') for p in processes)}",
             f"Workers_draining: {sum(p.state == 'draining' for p in processes)}",
             f"Connections_open: {c.open_connections(totals)}"]
    lines += [f"{key}: {totals[index]}" for key, index in INFO_COUNTERS]
    fds = [p.fds() for p in processes]
    rss = [p.rss_kib() for p in processes]
    lines += [f"Fds: {sum(fds)}", f"Rss_kib: {sum(rss)}"]
    for process, nfds, kib in zip(processes, fds, rss, strict=True):
        line = f"Process: {process.role} pid={process.pid}"
        if process.state:
            line += f" state={process.state}"
        if process.counts is not None:
            line += f" connections={c.open_connections(process.counts)}"
        lines.append(f"{line} fds={nfds} rss_kib={kib}")
    return lines
