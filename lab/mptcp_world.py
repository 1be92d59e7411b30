"""Two links between router and server, each shaped to 200 Mbit/s, and MPTCP.

The Topology, plus a second veth pair between router and server, a token
bucket (tc tbf) on both ends of both router-server links, MPTCP endpoints and
limits in router and server, and an MPTCP sink in the server::

    <tag>-cli          <tag>-rtr                            <tag>-srv
    c0 10.91.1.2 <-> rc 10.91.1.1
                       rs  10.91.2.1 <-200 Mbit/s-> s0 10.91.2.2
                       rs2 10.91.3.1 <-200 Mbit/s-> s1 10.91.3.2

The client link is not shaped: the router-server links are the bottleneck.
Two ways to have the router open a second subflow over rs2 (``endpoints``):

signal   (the default) the server announces 10.91.3.2 and fd91:3::2
         (ADD_ADDR); the router accepts the announcements and opens a
         subflow to each from the address routing picks: its own 10.91.3.1
         (fd91:3::1) on rs2, even when the first subflow is bound to the
         client's address (-B client). An IPv6 connection also takes the
         IPv4 announcement (a third subflow, on the same link).
subflow  the router's 10.91.3.1 (fd91:3::1) is a ``subflow`` endpoint bound
         to rs2: the router opens a subflow from it to the server's first
         address, as a router with two uplinks would to any MPTCP server.
         Source routing sends what leaves from 10.91.3.1 out through rs2
         (rule ``from 10.91.3.1 lookup 913``: default via 10.91.3.2), the
         usual recipe for two uplinks; the server takes 10.91.2.2 in on s1.

Either way no policy routing is needed: the additional subflows carry the
router's own address, so the server's answers follow the connected routes
back over the link they came from; only the first subflow, spoofed with -B
client, goes back through the server's default route (link 1).

The sink (MptcpSink) runs as a process of its own in the server namespace
(``python -m lab.mptcp_world sink PORT``), listening with IPPROTO_MPTCP so
it also takes plain TCP. For each connection it reports one JSON line: the
peer it saw, bytes, seconds from the first byte to EOF, the most subflows
MPTCP_INFO showed, and each subflow's addresses (MPTCP_SUBFLOW_ADDRS).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import queue
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .netns import TopologyError, terminate
from .topology import REPO, Topology

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO, MPTCP_SUBFLOW_ADDRS = 1, 3
SUBFLOW_DATA = struct.Struct("=IIII")  # size_subflow_data, num_subflows, size_kernel, size_user
SUBFLOW_ADDRS_SIZE = 256               # two __kernel_sockaddr_storage
MAX_SUBFLOWS = 8
SINK_PORT = 7100
CHUNK = 256 * 1024


class MptcpWorld(Topology):
    """A Topology whose router and server are joined by two shaped links.

    rate (tc tbf syntax) limits each direction of each router-server link,
    with a bucket of burst (it must hold a 64 KB GSO packet; 256 KB lets one
    TCP flow reach 96% of the rate) and up to latency of queue;
    endpoints is "signal" or "subflow" (see above), or None to leave MPTCP
    unconfigured (one path only).
    """

    ROUTER4_S2, SERVER4_2 = "10.91.3.1", "10.91.3.2"
    ROUTER6_S2, SERVER6_2 = "fd91:3::1", "fd91:3::2"
    SECOND_TABLE = "913"  # the router's routes for what leaves from its rs2 address

    def __init__(self, port: int = 5000, rate: str = "200mbit", endpoints: str | None = "signal",
                 tproxy: bool = True, burst: str = "256kb", latency: str = "20ms"):
        super().__init__(port=port, tproxy=tproxy)
        if endpoints not in ("signal", "subflow", None):
            raise ValueError(f"endpoints: {endpoints!r}")
        self.rate = rate
        self.endpoints = endpoints
        self.tbf = ("rate", rate, "burst", burst, "latency", latency)

    def up(self) -> None:
        super().up()
        self.run(self.srv, "ip", "link", "add", "s1", "type", "veth",
                 "peer", "name", "rs2", "netns", self.rtr)
        self._address(self.rtr, "rs2", f"{self.ROUTER4_S2}/24", f"{self.ROUTER6_S2}/64")
        self._address(self.srv, "s1", f"{self.SERVER4_2}/24", f"{self.SERVER6_2}/64")
        for ns, dev in ((self.rtr, "rs"), (self.srv, "s0"), (self.rtr, "rs2"), (self.srv, "s1")):
            self.run(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", *self.tbf)
        if self.endpoints:
            self.configure_mptcp()

    def configure_mptcp(self) -> None:
        for ns in (self.rtr, self.srv):
            self.run(ns, "sysctl", "-qw", "net.mptcp.enabled=1")
            self.run(ns, "ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
        if self.endpoints == "signal":
            ns, dev, addrs = self.srv, "s1", (self.SERVER4_2, self.SERVER6_2)
        else:
            ns, dev, addrs = self.rtr, "rs2", (self.ROUTER4_S2, self.ROUTER6_S2)
            for ip, source, gateway in (("-4", self.ROUTER4_S2, self.SERVER4_2),
                                        ("-6", self.ROUTER6_S2, self.SERVER6_2)):
                self.run(ns, "ip", ip, "rule", "add", "from", source, "lookup", self.SECOND_TABLE)
                self.run(ns, "ip", ip, "route", "add", "default", "via", gateway, "dev", dev,
                         "table", self.SECOND_TABLE)
        for addr in addrs:
            self.run(ns, "ip", "mptcp", "endpoint", "add", addr, "dev", dev, self.endpoints)


@dataclass(frozen=True)
class Transfer:
    """One connection as the sink saw it."""
    peer: tuple
    received: int
    seconds: float
    mptcp: bool     # False: a plain TCP connection (or one that fell back)
    subflows: int   # the most subflows at once, the first one included
    paths: tuple    # ((local, remote), ...) of every subflow seen, "ip:port" each

    @property
    def mbit(self) -> float:
        return self.received * 8 / self.seconds / 1e6 if self.seconds else 0.0


class MptcpSink:
    """The sink process in world.srv; transfers() hands over what it reported."""

    def __init__(self, world: Topology, port: int = SINK_PORT):
        self.world = world
        self.port = port
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str] = queue.Queue()

    def __enter__(self) -> MptcpSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 10) -> MptcpSink:
        self.proc = self.world.popen(self.world.srv, sys.executable, "-m", "lab.mptcp_world",
                                     "sink", str(self.port), cwd=str(REPO),
                                     stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if self._next(timeout) != "listening":
            raise TopologyError("the MPTCP sink did not start")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("")

    def _next(self, timeout: float) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TopologyError(f"no report from the sink within {timeout} s") from None

    def transfer(self, timeout: float = 20) -> Transfer:
        """The next connection's report, once it ended."""
        line = self._next(timeout)
        if not line:
            raise TopologyError("the MPTCP sink exited")
        data = json.loads(line)
        return Transfer(tuple(data["peer"]), data["received"], data["seconds"],
                        data["subflows"] > 0, max(1, data["subflows"]),
                        tuple(tuple(p) for p in data["paths"]))


def upload(world: Topology, host: str, port: int = SINK_PORT, seconds: float = 3.0) -> int:
    """A plain TCP client in world.cli sends for `seconds`, then closes; bytes sent."""
    sent, chunk = 0, memoryview(bytes(CHUNK))
    with world.connect(world.cli, host, port, timeout=seconds + 20) as sock:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sent += sock.send(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the sink closes once it has read everything
    return sent


# -- the sink, run in the server namespace -------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _sockaddr(raw: bytes) -> str:
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET:
        port, addr = struct.unpack_from("!H4s", raw, 2)
        return f"{socket.inet_ntop(socket.AF_INET, addr)}:{port}"
    if family == socket.AF_INET6:
        port, _, addr = struct.unpack_from("!HI16s", raw, 2)
        return f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:{port}"
    return f"family {family}"


def subflow_addrs(sock: socket.socket) -> list[tuple[str, str]]:
    """(local, remote) of each subflow of an MPTCP socket; [] for plain TCP.

    MPTCP_SUBFLOW_ADDRS reads sizes from the buffer it is given, which
    Python's getsockopt() cannot fill in, hence libc.
    """
    size = SUBFLOW_DATA.size + MAX_SUBFLOWS * SUBFLOW_ADDRS_SIZE
    buf = ctypes.create_string_buffer(size)
    SUBFLOW_DATA.pack_into(buf, 0, SUBFLOW_DATA.size, 0, 0, SUBFLOW_ADDRS_SIZE)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(sock.fileno(), SOL_MPTCP, MPTCP_SUBFLOW_ADDRS, buf,
                        ctypes.byref(length)) != 0:
        return []
    _, count, _, step = SUBFLOW_DATA.unpack_from(buf.raw)
    found = []
    for i in range(min(count, MAX_SUBFLOWS)):
        entry = buf.raw[SUBFLOW_DATA.size + i * step:][:SUBFLOW_ADDRS_SIZE]
        found.append((_sockaddr(entry[:128]), _sockaddr(entry[128:])))
    return found


def subflow_count(sock: socket.socket) -> int:
    """Subflows of an MPTCP connection now; 0 for plain TCP (or a fallback).

    mptcpi_subflows, the first byte of struct mptcp_info, counts the
    subflows beyond the first.
    """
    try:
        return sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 64)[0] + 1
    except OSError:  # a plain TCP connection has no MPTCP_INFO
        return 0


def _drain(conn: socket.socket, peer: tuple, out: threading.Lock) -> None:
    buf = bytearray(CHUNK)
    received, first, subflows, paths = 0, None, 0, set()
    next_look = 0.0
    while n := conn.recv_into(buf):
        now = time.monotonic()
        first = first or now
        received += n
        if now >= next_look:
            subflows = max(subflows, subflow_count(conn))
            paths.update(subflow_addrs(conn))
            next_look = now + 0.1
    seconds = time.monotonic() - first if first else 0.0
    # Once more at EOF: a short transfer may end before a subflow that
    # joined after the first look is seen by the 0.1 s sampling.
    subflows = max(subflows, subflow_count(conn))
    paths.update(subflow_addrs(conn))
    conn.close()
    report = {"peer": list(peer[:2]), "received": received, "seconds": seconds,
              "subflows": subflows, "paths": sorted(paths)}
    with out:
        print(json.dumps(report), flush=True)


def sink(port: int) -> None:
    """Accept on port (IPv4 and IPv6, MPTCP or TCP) and report each connection."""
    listeners = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(64)
        listeners.append(sock)
    out = threading.Lock()
    print("listening", flush=True)
    with selectors.DefaultSelector() as sel:
        for sock in listeners:
            sel.register(sock, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                conn, peer = key.fileobj.accept()
                threading.Thread(target=_drain, args=(conn, peer, out), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:2] == ["sink"]:
        with contextlib.suppress(KeyboardInterrupt):
            sink(int(sys.argv[2]))
