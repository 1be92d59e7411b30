"""The operator's view of the socket options: `ss` in the router namespace.

test_socket_options.py asks the daemon's sockets with getsockopt(); here the
same options are read the way an operator reads them on a router, with
``ss -tinop``: the congestion control of each side of a live connection,
and the keepalive timer. Keepalive interval and count, and TCP_USER_TIMEOUT,
are nowhere in ss's output (struct tcp_info has no field for them), so for
those the operator sees what they do: with the server's link gone dead, the
kernel drops the router's socket to the server after the interval x count
probes, or after the user timeout, and the daemon resets the client.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from lab.netns import wait_for
from lab.peers import ECHO
from lab.ss import SsLine, ss

def sides(topo, daemon, client_port: int) -> tuple[SsLine, SsLine]:
    """(accepted, outgoing): the daemon's two sockets of one connection."""
    server = f"{topo.SERVER4}:{ECHO}"
    mine = [line for line in ss(topo) if f"pid={daemon.worker}," in line.owner]
    [accepted] = [s for s in mine if (s.local, s.peer) == (server, f"{topo.CLIENT4}:{client_port}")]
    [outgoing] = [s for s in mine if s.peer == server]
    return accepted, outgoing


@contextlib.contextmanager
def echoing(topo):
    """A connection through the daemon to the echo server, both sockets made."""
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        yield sock


@contextlib.contextmanager
def dead_server_link(topo, outgoing: SsLine):
    """The server drops everything from the router's socket `outgoing`."""
    port = outgoing.local.rsplit(":", 1)[1]
    rule = ["INPUT", "-p", "tcp", "--sport", port, "--dport", str(ECHO), "-j", "DROP"]
    topo.run(topo.srv, "iptables", "-w", "-I", *rule)
    try:
        yield
    finally:
        topo.run(topo.srv, "iptables", "-w", "-D", *rule, check=False)


def wait_for_timer(topo, daemon, sock: socket.socket, kind: str, timeout: float,
                   what: str) -> None:
    """Until ss shows the outgoing socket's timer `kind` fired at least once."""
    def fired():
        _, now = sides(topo, daemon, sock.getsockname()[1])
        return now.timer and now.timer[0] == kind and now.timer[2] >= 1
    wait_for(fired, timeout, f"ss to show {what}")


def reset_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the daemon resets the client; fails after `seconds`."""
    sock.settimeout(seconds)
    start = time.monotonic()
    with pytest.raises(ConnectionResetError):
        sock.recv(1)
    return time.monotonic() - start


def test_ss_shows_congestion_and_keepalive_of_both_sides(topo, peers, start_daemon):
    daemon = start_daemon("-C", "cubic", "--client-congestion", "reno",
                          "--keepalive-idle", "30", "--keepalive-interval", "7",
                          "--keepalive-count", "4", "--user-timeout", "2.5")
    with echoing(topo) as sock:
        accepted, outgoing = sides(topo, daemon, sock.getsockname()[1])
        assert (accepted.congestion, outgoing.congestion) == ("reno", "cubic")
        for side in (accepted, outgoing):
            name, left, probes = side.timer
            assert (name, probes) == ("keepalive", 0), side
            assert 10 < left <= 30, side  # 30 s less the time it took to get here


def test_ss_defaults_without_options(topo, peers, start_daemon):
    default = topo.run(topo.rtr, "sysctl", "-n", "net.ipv4.tcp_congestion_control").stdout
    daemon = start_daemon()
    with echoing(topo) as sock:
        for side in sides(topo, daemon, sock.getsockname()[1]):
            assert side.congestion == default.strip()
            assert side.timer is None, side  # no keepalive timer


def test_keepalive_probes_drop_a_dead_server_link(topo, peers, start_daemon):
    """idle 1 s, then 3 probes 1 s apart: gone about 4 s after the link died."""
    daemon = start_daemon("--keepalive-idle", "1", "--keepalive-interval", "1",
                          "--keepalive-count", "3")
    with echoing(topo) as sock:
        _, outgoing = sides(topo, daemon, sock.getsockname()[1])
        with dead_server_link(topo, outgoing):
            wait_for_timer(topo, daemon, sock, "keepalive", 10, "a keepalive probe sent")
            # Never before the second probe's interval; late only by load.
            assert 1 < reset_within(sock, 10)
    assert daemon.wait_log("Connection timed out")


def test_user_timeout_drops_unacknowledged_data(topo, peers, start_daemon):
    """Data the server never acknowledges: retransmitted (ss: timer 'on')
    until the user timeout, then the connection is reset."""
    daemon = start_daemon("--user-timeout", "1.5")
    with echoing(topo) as sock:
        _, outgoing = sides(topo, daemon, sock.getsockname()[1])
        with dead_server_link(topo, outgoing):
            sock.sendall(b"y" * 1000)
            wait_for_timer(topo, daemon, sock, "on", 10, "a retransmission")
            assert 0.5 < reset_within(sock, 10)
    assert daemon.wait_log("Connection timed out")
