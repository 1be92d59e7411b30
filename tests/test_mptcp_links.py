"""Bonding two uplinks: with -M a plain TCP client gets both router-server links.

Router and server are joined by two links of 200 Mbit/s each (tests/
mptcp_world.py); the server listens with MPTCP and announces its second
address. A plain TCP client in the client namespace uploads for a few
seconds through tcp-interceptd; the sink in the server namespace measures
the rate and says how many subflows the connection had and where each came
from. Without -M the intercepted connection is plain TCP on one link; with
-M the router's side is MPTCP and the kernel adds a subflow on the second
link, with or without -B client. Last, the other way to get there: the
server announces nothing, the router has a ``subflow`` endpoint on its
second uplink.

With -B client only the first subflow carries the client's address: the
kernel's in-kernel path manager opens the others from the router's own
addresses (its endpoint, or the source routing picks towards an announced
address), never from the first subflow's spoofed one. So the server needs
no policy routing, and sees the router's address on every subflow but the
first.
"""

from __future__ import annotations

import re
import socket

import pytest

from lab.intercept import Daemon
from lab.mptcp_world import SINK_PORT, MptcpSink, MptcpWorld, Transfer, upload
from lab.netns import wait_for
from lab.ss import ss

SECONDS = 3.0
# Rates are not what these tests prove: bench/mptcp.py measures them
# (README, "Acceleration": 192 Mbit/s on one link, 1.9x that bonded), and on
# a loaded machine a Python relay may not fill even one link. What holds
# anywhere: one link's token bucket caps a plain connection, and bonded,
# the second link adds to it.
LINK_CAP = 200 * 1.1   # Mbit/s: a 200 Mbit/s token bucket, its burst included
BONDED = 1.3           # bonded at least this many times one link's rate
WORLD = MptcpWorld     # conftest's topo: the two-link world the daemon fixtures start in


@pytest.fixture(scope="module")
def sink(topo):
    with MptcpSink(topo) as server:
        yield server


def through_daemon(topo, sink, start_daemon, *args: str, ipv6: bool = False) -> Transfer:
    """One upload through a daemon started with args, then that daemon stopped.

    The daemon listens on 0.0.0.0 or [::]: an IPv4 client accepted on [::]
    would make an IPv6 (v4-mapped) MPTCP connection, which takes the
    server's IPv6 announcement too.
    """
    daemon = start_daemon(*args, listen="[::]:[5000]" if ipv6 else None)
    upload(topo, topo.SERVER6 if ipv6 else topo.SERVER4, seconds=SECONDS)
    transfer = sink.transfer()
    assert daemon.stop() == 0, daemon.output()
    return transfer


@pytest.fixture(scope="module")
def one_link(topo, sink, start_module_daemon) -> Transfer:
    """What a plain TCP connection through the daemon (no -M) gets."""
    return through_daemon(topo, sink, start_module_daemon)


def host(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


def link(path: tuple[str, str]) -> int:
    """Which router-server link a subflow (server's end, router's end) used.

    The router's end tells: what leaves from its rs2 address goes out on rs2
    and the server answers it through s1 (connected route); anything else
    (its rs address, the spoofed client's) goes out on rs and comes back
    through the server's default route.
    """
    return 2 if host(path[1]) in (MptcpWorld.ROUTER4_S2, MptcpWorld.ROUTER6_S2) else 1


def test_without_mptcp_one_link(topo, one_link):
    assert not one_link.mptcp
    assert 0 < one_link.mbit <= LINK_CAP, one_link
    assert one_link.peer[0] == topo.ROUTER4_S


def bonded(transfer: Transfer, one_link: Transfer) -> None:
    """An MPTCP connection with a subflow on each link, and faster than one link."""
    assert transfer.mptcp and transfer.subflows >= 2, transfer
    assert {link(path) for path in transfer.paths} == {1, 2}, transfer
    assert transfer.mbit >= BONDED * one_link.mbit, (transfer, one_link)


def test_mptcp_bonds_both_links(topo, sink, start_daemon, one_link):
    transfer = through_daemon(topo, sink, start_daemon, "-M")
    bonded(transfer, one_link)
    assert transfer.peer[0] == topo.ROUTER4_S


def test_mptcp_spoofing_the_client_bonds_both_links(topo, sink, start_daemon, one_link):
    """The server's accept() gives the client's address, but only the first
    subflow carries it: the one on the second link comes from the router's
    own address there, the source routing picks towards the address the
    server announced."""
    transfer = through_daemon(topo, sink, start_daemon, "-M", "-B", "client")
    bonded(transfer, one_link)
    assert transfer.peer[0] == topo.CLIENT4
    remotes = {(link(path), host(path[1])) for path in transfer.paths}
    assert remotes == {(1, topo.CLIENT4), (2, topo.ROUTER4_S2)}, transfer


def test_mptcp_spoofing_the_client_over_ipv6(topo, sink, start_daemon, one_link):
    transfer = through_daemon(topo, sink, start_daemon, "-M", "-B", "client", ipv6=True)
    bonded(transfer, one_link)
    assert transfer.peer[0] == topo.CLIENT6


@pytest.fixture(scope="module")
def subflow_world():
    """The router opens the second subflow from its own endpoint on its
    second uplink; the server announces nothing."""
    with MptcpWorld(endpoints="subflow") as world, MptcpSink(world) as sink:
        yield world, sink


def test_mptcp_router_subflow_endpoint_bonds_both_links(subflow_world, one_link, tmp_path):
    world, sink = subflow_world
    # Stopped in through_daemon; if it fails first, when the world goes down.
    def start(*args, **kw):
        return Daemon(world, *args, workdir=tmp_path, **kw).start()
    transfer = through_daemon(world, sink, start, "-M", "-B", "client")
    bonded(transfer, one_link)
    remotes = {(link(path), host(path[1])) for path in transfer.paths}
    assert remotes == {(1, world.CLIENT4), (2, world.ROUTER4_S2)}, transfer


def test_ss_shows_the_options_on_every_subflow(topo, sink, start_daemon):
    """The operator's view: -C and keepalive reach each subflow of the
    router's MPTCP socket, and `ss -M` counts the additional subflows."""
    daemon = start_daemon("-M", "-B", "client", "-C", "cubic", "--client-congestion", "reno",
                          "--keepalive-idle", "30", "--keepalive-interval", "7",
                          "--keepalive-count", "4")
    with topo.connect(topo.cli, topo.SERVER4, SINK_PORT) as sock:
        sock.sendall(bytes(100_000))

        def subflows():
            found = [line for line in ss(topo) if f"pid={daemon.worker}," in line.owner
                     and "tcp-ulp-mptcp" in line.info]
            return found if len(found) == 2 else None
        found = wait_for(subflows, 5, "two subflows in the router's ss")
        assert {host(line.local) for line in found} == {topo.CLIENT4, topo.ROUTER4_S2}
        for line in found:
            assert line.congestion == "cubic", line
            assert line.timer[0] == "keepalive" and 20 < line.timer[1] <= 30, line
        [accepted] = [line for line in ss(topo) if f"pid={daemon.worker}," in line.owner
                      and line.local == f"{topo.SERVER4}:{SINK_PORT}"]
        assert accepted.congestion == "reno"
        mptcp = topo.run(topo.rtr, "ss", "-HMi", "state", "established").stdout
        assert "subflows:1 " in mptcp, mptcp
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    assert sink.transfer().subflows == 2


def test_show_conn_combines_the_subflows_as_ss_shows_them(topo, sink, start_daemon):
    """The router's MPTCP leg in show conn and show conns full: its two
    subflows (MPTCP_TCPINFO), their bytes and retransmits summed and the
    least min RTT, as ss prints the subflows of the same socket. The server
    drops every 8th data packet it receives while the upload runs: both
    subflows retransmit, so a sum differs from either subflow's count."""
    daemon = start_daemon("-M", control=True)
    with topo.connect(topo.cli, topo.SERVER4, SINK_PORT) as sock:
        topo.run(topo.srv, "nft", "add table inet lossy; add chain inet lossy in { type "
                 "filter hook input priority 0; }; add rule inet lossy in tcp dport "
                 f"{SINK_PORT} meta length > 1000 numgen inc mod 8 0 drop")
        try:
            sock.sendall(bytes(1_000_000))

            def settled():  # both subflows up, everything sent acknowledged
                found = [line for line in ss(topo) if f"pid={daemon.worker}," in line.owner
                         and "tcp-ulp-mptcp" in line.info]
                return len(found) == 2 and all("unacked" not in line.info for line in found)
            wait_for(settled, 10, "two idle subflows in the router's ss")
        finally:
            topo.run(topo.srv, "nft", "delete table inet lossy")
        client = "[{}]:{}".format(*sock.getsockname())
        shown = dict(line.split(": ", 1) for line in daemon.ask(f"show conn {client}")
                     .splitlines())
        header, *rows = daemon.ask("show conns full").splitlines()
        subflows = [line.info for line in ss(topo) if f"pid={daemon.worker}," in line.owner
                    and "tcp-ulp-mptcp" in line.info]
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    server = dict(word.split("=", 1) for word in shown["Server_leg"].split())
    client_leg = dict(word.split("=", 1) for word in shown["Client_leg"].split())
    assert server["subflows"] == "2" and "subflows" not in client_leg

    def total(key: str, pattern: str = r":(\d+)") -> int:
        """The sum over the subflows of what ss prints after key (0 if absent)."""
        return sum(int(m.group(1)) if (m := re.search(rf"\b{key}{pattern}", info)) else 0
                   for info in subflows)
    assert int(server["bytes_acked"]) == total("bytes_acked")
    assert int(server["bytes_received"]) == total("bytes_received")
    # ss: retrans:NOW/TOTAL; bytes_retrans only when not 0.
    each = [int(re.search(r"\bretrans:\d+/(\d+)", info).group(1)) for info in subflows]
    assert min(each) > 0, subflows
    assert int(server["retrans"]) == total("retrans", r":\d+/(\d+)")
    assert int(server["bytes_retrans"]) == total("bytes_retrans")
    # Rates summed too (ss -n prints bits a second), as lost, unacked and
    # notsent are (0 here: everything acknowledged).
    for key in ("delivery_rate", "pacing_rate"):
        assert int(server[f"{key}_Bps"]) * 8 == total(key, r" (\d+)bps"), (key, subflows)
    for key in ("lost", "unacked", "notsent"):
        assert int(server[key]) == total(key), (key, subflows)
    assert float(server["min_rtt_ms"]) == pytest.approx(
        min(float(re.search(r"\bminrtt:([\d.]+)", info).group(1)) for info in subflows),
        abs=0.0011)
    row = dict(zip(header.split()[1:], rows[0].split(), strict=True))
    assert (row["s_subflows"], row["c_subflows"]) == ("2", "0")
