"""Intercepted connections end to end: bytes, half-closes, resets, failures.

The whole module runs four times: IPv4 and IPv6, each with the default
outgoing address (the server sees the router) and with ``-B client`` (the
server sees the client itself). One daemon serves all tests of a run, and
the last test checks it is left as it started. Every run sends bytes of its
own (seeded by the run), so the server's records never mix runs.
"""

from __future__ import annotations

import socket
import time

import pytest

from tcp_intercept.pipes import PipePool

from lab.peers import (DIGEST, ECHO, FIRST, GREETING, REFUSED, RESET, abort, echo_burst, exchange,
                    payload, read_to_eof, sha256)
from lab.topology import wait_for

WORLDS = [("4", "default"), ("6", "default"), ("4", "client"), ("6", "client")]


class World:
    """One run's daemon, and what a test needs to know about the topology."""

    def __init__(self, topo, peers, daemon, run: int, family: str, bind: str):
        self.topo, self.peers, self.daemon = topo, peers, daemon
        self.run = run
        self.v6 = family == "6"
        self.client = topo.CLIENT6 if self.v6 else topo.CLIENT4
        self.server = topo.SERVER6 if self.v6 else topo.SERVER4
        self.router_c = topo.ROUTER6_C if self.v6 else topo.ROUTER4_C
        self.router_s = topo.ROUTER6_S if self.v6 else topo.ROUTER4_S
        self.spoof = bind == "client"
        self.baseline = daemon.fds()

    def data(self, size: int, seed: int) -> bytes:
        return payload(size, seed=self.run * 1_000_000 + seed)

    def client_socket(self) -> socket.socket:
        """An unconnected socket in the client namespace, SO_REUSEADDR, 10 s timeout."""
        sock = self.topo.socket(self.topo.cli, socket.AF_INET6 if self.v6 else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(10)
        return sock

    def connect(self, port: int) -> socket.socket:
        return self.topo.connect(self.topo.cli, self.server, port)

    @staticmethod
    def conn_id(sock: socket.socket) -> str:
        """The daemon's name for this client connection."""
        (cip, cport), (dip, dport) = sock.getsockname()[:2], sock.getpeername()[:2]
        return f"[{cip}]:{cport}-->[{dip}]:{dport}"

    def assert_server_saw(self, record, sock: socket.socket) -> None:
        """-B client: the client's own address and port; else the router's address."""
        if self.spoof:
            assert record.peer == sock.getsockname()[:2], "-B client, but the server saw " \
                f"{record.peer} for client {sock.getsockname()[:2]}"
        else:
            assert record.peer[0] == self.router_s, f"the server saw {record.peer}"


@pytest.fixture(scope="module", params=WORLDS, ids=[f"ipv{f}-{b}" for f, b in WORLDS])
def world(request, topo, peers, start_module_daemon):
    family, bind = request.param
    listen = "[::]:[5000]" if family == "6" else "[0.0.0.0]:[5000]"
    args = ("-B", "client") if bind == "client" else ()
    daemon = start_module_daemon(*args, listen=listen, name=f"ipv{family}-{bind}")
    yield World(topo, peers, daemon, WORLDS.index(request.param), family, bind)
    daemon.stop()


def test_50_mb_both_ways_arrive_intact(world):
    data = world.data(50 << 20, seed=1)
    with world.connect(ECHO) as sock:
        conn_id = world.conn_id(sock)
        sock.settimeout(60)
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
        [record] = world.peers.wait_records(sha256=sha256(data))
        world.assert_server_saw(record, sock)
    assert (record.received, record.end) == (len(data), "eof")
    world.daemon.wait_log(f"{conn_id}: closed")
    for line in ("Connection intercepted", "server accepted connection, splicing"):
        assert world.daemon.lines(f"{conn_id}: {line}"), f"no '{line}' for {conn_id}"


def test_connecting_line_names_the_outgoing_address(world):
    with world.connect(ECHO) as sock:
        conn_id, client = world.conn_id(sock), sock.getsockname()
        exchange(sock, world.data(10, seed=2))
    [line] = world.daemon.wait_log(f"{conn_id}: Connecting ")
    local, dst = line.split(": Connecting ", 1)[1].split("-->")
    if world.spoof:
        assert local == f"[{client[0]}]:{client[1]}"
    else:
        assert local.startswith(f"[{world.router_s}]:")
    assert dst == f"[{world.server}]:{ECHO}"


def test_client_half_closes_first_and_still_gets_the_answer(world):
    data = world.data(300_000, seed=3)
    with world.connect(DIGEST) as sock:
        conn_id = world.conn_id(sock)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer == sha256(data).encode() + b"\n"
    [record] = world.peers.wait_records(sha256=sha256(data))
    assert (record.mode, record.received, record.end) == ("digest", len(data), "eof")
    world.daemon.wait_log(f"{conn_id}: closed")
    out = world.daemon.output()
    assert out.index(f"{conn_id} C>S: EOF") < out.index(f"{conn_id} S>C: EOF")


def test_server_half_closes_first_and_client_can_still_send(world):
    data = world.data(300_000, seed=4)
    with world.connect(FIRST) as sock:
        conn_id = world.conn_id(sock)
        assert read_to_eof(sock) == (len(GREETING), sha256(GREETING), "eof")
        sock.sendall(data)  # the server's side is closed, ours is not
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    [record] = world.peers.wait_records(sha256=sha256(data))
    assert (record.mode, record.received, record.end) == ("first", len(data), "eof")
    world.daemon.wait_log(f"{conn_id}: closed")
    out = world.daemon.output()
    assert out.index(f"{conn_id} S>C: EOF") < out.index(f"{conn_id} C>S: EOF")


def test_client_reset_reaches_the_server_as_a_reset(world):
    data = world.data(1000, seed=5)
    sock = world.connect(ECHO)
    sock.sendall(data)
    assert sock.recv(len(data), socket.MSG_WAITALL) == data  # relaying both ways
    abort(sock)
    [record] = world.peers.wait_records(sha256=sha256(data))
    assert record.end == "ECONNRESET", f"the client's reset reached the server as {record.end!r}"


def test_server_reset_reaches_the_client_as_a_reset(world):
    data = world.data(1000, seed=6)
    with world.connect(RESET) as sock:
        sock.sendall(data)
        world.peers.wait_records(sha256=sha256(data))
        # A FIN instead of the reset would read as b"" here.
        with pytest.raises(ConnectionResetError):
            while sock.recv(4096):
                pass


def test_refused_upstream_resets_the_client_at_once(world):
    with world.client_socket() as sock:
        sock.bind((world.client, 0))  # to know our port even if connect() fails
        conn_id = f"[{world.client}]:{sock.getsockname()[1]}-->[{world.server}]:{REFUSED}"
        started = time.monotonic()
        # The reset may come before connect() has returned, or after.
        with pytest.raises(ConnectionResetError):
            sock.connect((world.server, REFUSED))
            sock.recv(1)
        elapsed = time.monotonic() - started
    # "At once": well before the 10 s the client waits; room for a loaded machine.
    assert elapsed < 5, f"the reset took {elapsed:.1f} s"
    [line] = world.daemon.wait_log(f"{conn_id}: connect to server failed: ")
    assert "refused" in line.lower(), line


def test_connection_to_the_router_itself_is_dropped(world):
    before = len(world.daemon.lines("Connection directly to us, dropping"))
    accepted = world.peers.accepted
    with world.topo.connect(world.topo.cli, world.router_c, world.daemon.port) as sock:
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass  # dropped with a reset: as good as a FIN
    world.daemon.wait_log("Connection directly to us, dropping", count=before + 1)
    assert world.peers.accepted == accepted, "the daemon connected somewhere anyway"


def test_client_reusing_its_port_at_once_is_relayed(world):
    """The original refused this with -B client: its outgoing socket binds the
    client's address and port without SO_REUSEADDR, and the router still
    holds that port in TIME_WAIT from the previous connection."""
    first_data, second_data = world.data(1000, seed=7), world.data(1000, seed=8)
    first = world.client_socket()
    first.bind((world.client, 0))
    first.connect((world.server, DIGEST))
    port = first.getsockname()[1]
    with first:
        first.sendall(first_data)
        first.shutdown(socket.SHUT_WR)  # so our side closes first, on both legs
        assert read_to_eof(first)[0] == 65
    world.daemon.wait_log(f"[{world.client}]:{port}-->[{world.server}]:{DIGEST}: closed")
    if world.spoof:
        waiting = world.topo.run(world.topo.rtr, "ss", "-Htan", "state", "time-wait").stdout
        assert f":{port} " in waiting, f"no TIME_WAIT on the router to test against:\n{waiting}"
    second = world.client_socket()
    second.bind((world.client, port))
    second.connect((world.server, ECHO))
    with second:
        assert exchange(second, second_data) == (len(second_data), sha256(second_data), "eof")
        [record] = world.peers.wait_records(sha256=sha256(second_data))
        world.assert_server_saw(record, second)


def test_300_concurrent_connections_each_keep_their_own_bytes(world):
    n, size = 300, 32 * 1024
    datas = [world.data(size, seed=1000 + i) for i in range(n)]
    accepted = world.peers.accepted
    sockets = [world.connect(ECHO) for _ in range(n)]
    try:
        world.peers.wait_accepted(accepted + n, timeout=20)
        at_once = len(world.daemon.fds())
        assert at_once >= len(world.baseline) + 2 * n, \
            f"only {at_once} descriptors open for {n} connections at once"
        for sock, data in zip(sockets, datas, strict=True):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        results = [read_to_eof(sock) for sock in sockets]
        clients = {sock.getsockname()[:2] for sock in sockets}
    finally:
        for sock in sockets:
            sock.close()
    assert results == [(size, sha256(d), "eof") for d in datas]
    records = world.peers.wait_digests({sha256(d) for d in datas}, timeout=20)
    assert all(r.end == "eof" for r in records)
    if world.spoof:
        assert {r.peer for r in records} == clients
    else:
        assert {r.peer[0] for r in records} == {world.router_s}


def test_a_burst_borrows_pipes_and_an_idle_connection_gives_them_back(world):
    """Bulk goes through pipes; once the connection has been quiet for a
    couple of reclaim intervals it holds its two sockets and nothing else."""
    burst, tail = world.data(16 << 20, seed=30), world.data(1000, seed=31)
    with world.connect(ECHO) as sock:
        sock.settimeout(30)
        assert echo_burst(sock, burst) == sha256(burst)
        assert world.daemon.pipes(), "16 MiB went through without a pipe"
        wait_for(lambda: not world.daemon.pipes(), 8,
                 "the idle connection's pipes to go back and be closed")
        assert exchange(sock, tail) == (len(tail), sha256(tail), "eof")


def test_daemon_is_left_as_it_started(world):
    """Runs last in each run: every connection above is gone, and so are its descriptors."""
    def sockets(fds):
        return sorted(fd for fd in fds if fd.startswith("socket:"))

    wait_for(lambda: sockets(world.daemon.fds()) == sockets(world.baseline), 10,
             f"the daemon's sockets to be back to {sockets(world.baseline)}")
    now = world.daemon.fds()
    others = sorted(set(now) - set(world.baseline))
    # The pipe pool may keep up to max_free empty pipes for the next connections.
    assert all(fd.startswith("pipe:") for fd in others), f"descriptors left: {others}"
    assert len(now) - len(world.baseline) <= 2 * PipePool().max_free, f"{len(now)} descriptors"
    out = world.daemon.output()
    assert "Traceback" not in out and "Unexpected error" not in out
