"""The router's TCP sockets as an operator lists them with `ss`.

Tests read socket options, timers and which process owns which socket from
``ss`` in the router namespace rather than from the daemon: what an operator
on a router would see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TIMER = re.compile(r"timer:\((\w+),([\d.]+)(m?s|sec),(\d+)\)")


@dataclass(frozen=True)
class SsLine:
    """One TCP socket as `ss -Htinop` prints it (first line and info line)."""
    local: str
    peer: str
    owner: str
    info: str

    @property
    def congestion(self) -> str:
        known = {"reno", "cubic", "bbr"}
        return next((word for word in self.info.split() if word in known), "")

    @property
    def timer(self) -> tuple[str, float, int] | None:
        """(name, seconds left, probes or retransmissions sent), if a timer runs."""
        found = TIMER.search(self.owner)
        if not found:
            return None
        name, value, unit, count = found.groups()
        return name, float(value) / (1000 if unit == "ms" else 1), int(count)


def ss(topo) -> list[SsLine]:
    """The router's established TCP sockets, as an operator lists them."""
    out = topo.run(topo.rtr, "ss", "-Htinop", "state", "established").stdout
    lines, found = out.splitlines(), []
    for first, info in zip(lines[::2], lines[1::2], strict=True):
        recv_q, send_q, local, peer, rest = first.split(None, 4)
        found.append(SsLine(local, peer, rest, info.strip()))
    return found


OWNER = re.compile(r"pid=(\d+),")


def owners(topo, client: str) -> dict[int, int]:
    """Which process owns the router's sockets accepted from client: {pid: count}
    (`ss -tnp`, as an operator asks)."""
    out = topo.run(topo.rtr, "ss", "-Htnp", "state", "established").stdout
    found: dict[int, int] = {}
    for line in out.splitlines():
        fields = line.split()
        if fields[3].rsplit(":", 1)[0].strip("[]") == client:  # the peer is the client
            for pid in {int(p) for p in OWNER.findall(line)}:
                found[pid] = found.get(pid, 0) + 1
    return found
