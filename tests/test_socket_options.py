"""The socket options of the command line reach the sockets of a live
connection: a copy of each of the daemon's sockets (pidfd_getfd) is asked
with getsockopt() while a connection is held open through it."""

from __future__ import annotations

import contextlib
import socket

import pytest


from lab.peers import ECHO, exchange, payload, sha256

IPPROTO_MPTCP = 262
TCP_USER_TIMEOUT = 18


@contextlib.contextmanager
def held_connection(topo, daemon):
    """(client-side socket, server-side socket) of the daemon for one open connection."""
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"  # both of the daemon's sockets exist now
        borrowed = daemon.borrow_sockets()
        try:
            original_dst = (topo.SERVER4, ECHO)
            [accepted] = [s for s in borrowed if s.getsockname() == original_dst]
            [outgoing] = [s for s in borrowed if _peer(s) == original_dst]
            yield accepted, outgoing
        finally:
            for s in borrowed:
                s.close()


def _peer(sock: socket.socket):
    try:
        return sock.getpeername()
    except OSError:  # the listener
        return None


def tcp(sock: socket.socket, option: int) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, option)


def congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def relays(topo, seed: int) -> bool:
    data = payload(200_000, seed=seed)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        return exchange(sock, data) == (len(data), sha256(data), "eof")


def test_options_reach_both_sockets(topo, peers, start_daemon):
    daemon = start_daemon("-n", "--keepalive-idle", "30", "--keepalive-interval", "7",
                          "--keepalive-count", "4", "--user-timeout", "2.5",
                          "-C", "bbr", "--client-congestion", "cubic")
    with held_connection(topo, daemon) as (accepted, outgoing):
        for sock in (accepted, outgoing):
            assert tcp(sock, socket.TCP_NODELAY) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert (tcp(sock, socket.TCP_KEEPIDLE), tcp(sock, socket.TCP_KEEPINTVL),
                    tcp(sock, socket.TCP_KEEPCNT)) == (30, 7, 4)
            assert tcp(sock, TCP_USER_TIMEOUT) == 2500
        assert congestion(outgoing) == "bbr"
        assert congestion(accepted) == "cubic"


def test_keepalive_alone_probes_within_minutes(topo, peers, start_daemon):
    daemon = start_daemon("-k")
    with held_connection(topo, daemon) as (accepted, outgoing):
        for sock in (accepted, outgoing):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert (tcp(sock, socket.TCP_KEEPIDLE), tcp(sock, socket.TCP_KEEPINTVL),
                    tcp(sock, socket.TCP_KEEPCNT)) == (60, 10, 6)  # the README's numbers


def test_without_options_no_keepalive_and_no_user_timeout(topo, peers, start_daemon):
    daemon = start_daemon()
    with held_connection(topo, daemon) as (accepted, outgoing):
        for sock in (accepted, outgoing):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            assert tcp(sock, TCP_USER_TIMEOUT) == 0


def test_mptcp_outgoing_falls_back_to_tcp_with_a_plain_server(topo, peers, start_daemon):
    daemon = start_daemon("-M")
    with held_connection(topo, daemon) as (accepted, outgoing):
        assert outgoing.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == IPPROTO_MPTCP
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
    assert relays(topo, seed=1)


def test_mptcp_listen_accepts_plain_tcp_clients(topo, peers, start_daemon):
    daemon = start_daemon("--mptcp-listen")
    [listener] = [s for s in daemon.borrow_sockets() if _peer(s) is None]
    with listener:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == IPPROTO_MPTCP
    assert relays(topo, seed=2)


@pytest.mark.parametrize("mptcp", ["-M", "--mptcp-listen"])
def test_mptcp_with_user_timeout_refuses_at_start_or_relays(topo, peers, start_daemon, mptcp):
    """Never start and then fail every connection, nor blame the listen address.

    Either answer is fine: a usage error naming the option, or a daemon
    that relays (setting TCP_USER_TIMEOUT where the kernel allows it).
    """
    daemon = start_daemon(mptcp, "--user-timeout", "5", foreground=False, pid_file=True,
                          log_file=True)
    if daemon.launcher_status != 0:
        assert daemon.launcher_status == 64, daemon.output()
        assert "--user-timeout" in daemon.output()
    else:
        assert relays(topo, seed=3), daemon.output()


@pytest.mark.parametrize("listen", ["0.0.0.0", "::"])
@pytest.mark.parametrize("port", [0, 40123])
def test_bind_outgoing_address_is_what_the_server_sees(topo, peers, start_daemon, port,
                                                       listen):
    """On [::] too, where an IPv4 connection's sockets are IPv6 with mapped
    addresses (the address was ignored there: the socket's family was not its)."""
    topo.run(topo.rtr, "ip", "addr", "replace", "10.91.2.3/24", "dev", "rs")
    if port:  # a port of its own: the previous run's socket waits in TIME_WAIT
        port += len(listen)
    daemon = start_daemon("-B", f"[10.91.2.3]:[{port}]", listen=f"[{listen}]:[{topo.port}]")
    data = payload(10_000, seed=10 + port + len(listen))
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    [record] = peers.wait_records(sha256=sha256(data))
    assert record.peer[0] == "10.91.2.3"
    if port:
        assert record.peer[1] == port
    daemon.wait_log("closed")


def test_an_ipv6_outgoing_address_leaves_ipv4_connections_the_kernels_choice(topo, peers,
                                                                            start_daemon):
    """On [::], -B with an IPv6 address: IPv6 connections come from it, IPv4
    ones from the kernel's choice (binding it made their connect() fail)."""
    topo.run(topo.rtr, "ip", "-6", "addr", "replace", "fd91:2::3/64", "dev", "rs", "nodad")
    try:
        daemon = start_daemon("-B", "[fd91:2::3]:[0]", listen=f"[::]:[{topo.port}]")
        for seed, (host, seen) in enumerate(((topo.SERVER6, "fd91:2::3"),
                                             (topo.SERVER4, topo.ROUTER4_S))):
            data = payload(10_000, seed=20 + seed)
            with topo.connect(topo.cli, host, ECHO) as sock:
                assert exchange(sock, data) == (len(data), sha256(data), "eof"), host
            [record] = peers.wait_records(sha256=sha256(data))
            assert record.peer[0] == seen
        daemon.wait_log("closed", count=2)
    finally:
        topo.run(topo.rtr, "ip", "-6", "addr", "del", "fd91:2::3/64", "dev", "rs", check=False)
