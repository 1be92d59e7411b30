"""Bounding what a client or a dead server can take: --max-connections,
--max-per-client, --connect-timeout, --idle-timeout, each enforced within
its bound, counted and logged, with the real daemon."""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from lab.peers import ECHO, exchange, payload, sha256
from lab.ss import owners
from lab.topology import wait_for

SILENT = 7100  # in the server namespace, SYNs to it are dropped (no answer at all)
CLIENT_B = "10.91.1.3"  # a second client address


@pytest.fixture(scope="module", autouse=True)
def silent_server_and_second_client(topo):
    topo.run(topo.srv, "nft", "add table inet bounds; add chain inet bounds in { type filter "
             f"hook input priority 0; }}; add rule inet bounds in tcp dport {SILENT} drop")
    topo.run(topo.cli, "ip", "addr", "add", f"{CLIENT_B}/24", "dev", "c0", "nodad")


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(len(data), socket.MSG_WAITALL)


def connect_from(topo, source: str) -> socket.socket:
    sock = topo.socket(topo.cli)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((topo.SERVER4, ECHO))
    return sock


def backlog(topo, port: int) -> int:
    """Connections the kernel completed on the daemon's port, not yet accepted."""
    out = topo.run(topo.rtr, "ss", "-Hltn", f"sport = :{port}").stdout
    return sum(int(line.split()[1]) for line in out.splitlines())


def held_back(topo, daemon, waiting: list[socket.socket]) -> None:
    """The waiting connections stay in the kernel's backlog: the daemon has
    not accepted them, so nothing came back to them."""
    wait_for(lambda: backlog(topo, daemon.port) == len(waiting), 10,
             f"{len(waiting)} connection(s) in the backlog")
    assert daemon.info()["Connections_open"] == "3"
    assert backlog(topo, daemon.port) == len(waiting)
    for sock in waiting:
        timeout = sock.gettimeout()
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
        sock.settimeout(timeout)


def reset_at_once(topo, source: str) -> bool:
    """A connection from source is reset (the reset may beat connect()'s return)."""
    try:
        with connect_from(topo, source) as sock:
            sock.recv(1)
    except ConnectionResetError:
        return True
    return False


def test_max_connections_holds_the_next_clients_until_one_closes(topo, peers, start_daemon):
    daemon = start_daemon("--max-connections", "3", control=True)
    first = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(3)]
    for n, sock in enumerate(first):
        assert echo(sock, b"in %d" % n) == b"in %d" % n
    waiting = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(2)]  # the backlog
    try:
        for sock in waiting:
            sock.sendall(b"waiting")
        daemon.wait_log("Reached --max-connections (3 open here)")
        held_back(topo, daemon, waiting)
        first[0].close()
        waiting[0].settimeout(5)
        assert waiting[0].recv(7, socket.MSG_WAITALL) == b"waiting"
        daemon.wait_log("Accepting connections again")
        first[1].close()
        assert waiting[1].recv(7, socket.MSG_WAITALL) == b"waiting"
    finally:
        for sock in first + waiting:
            sock.close()
    assert int(daemon.info()["Limited_max_connections"]) >= 1
    assert len(daemon.lines("Reached --max-connections")) == \
        int(daemon.info()["Limited_max_connections"])


def test_max_per_client_resets_the_extra_ones_of_that_client_only(topo, peers, start_daemon):
    daemon = start_daemon("-w", "2", "--max-per-client", "2", control=True, log_file=True)
    wait_for(lambda: len(daemon.workers()) == 2, 10, "two workers")
    mine = [connect_from(topo, topo.CLIENT4) for _ in range(2)]
    try:
        for sock in mine:
            assert echo(sock, b"ok") == b"ok"
        assert all(reset_at_once(topo, topo.CLIENT4) for _ in range(3))
        others = [connect_from(topo, CLIENT_B) for _ in range(2)]
        for sock in others:
            assert echo(sock, b"other") == b"other"
            sock.close()
        # Every connection of one address is on one worker: its count is exact.
        assert len(owners(topo, topo.CLIENT4)) == 1
    finally:
        for sock in mine:
            sock.close()
    assert daemon.info()["Limited_max_per_client"] == "3"
    [line] = daemon.wait_log("(--max-per-client)")  # three refusals within a second: one line
    assert f"[{topo.CLIENT4}] already has 2 connections" in line


def test_connect_timeout_resets_the_client_of_a_silent_server(topo, peers, start_daemon):
    daemon = start_daemon("--connect-timeout", "1", control=True, log_file=True)
    sock = topo.socket(topo.cli)
    with sock:
        sock.settimeout(10)
        sock.bind((topo.CLIENT4, 0))
        conn_id = f"[{topo.CLIENT4}]:{sock.getsockname()[1]}-->[{topo.SERVER4}]:{SILENT}"
        sock.connect((topo.SERVER4, SILENT))  # the router's side answers at once
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 5, elapsed  # never early; late only by a loaded machine's delay
    [line] = daemon.wait_log(f"{conn_id}: connect to server failed: timed out")
    assert re.search(r" WARNING: ", line)
    assert daemon.info()["Connect_failed_timeout"] == "1"


def test_idle_timeout_resets_a_quiet_connection_and_spares_a_trickle(topo, peers,
                                                                      start_daemon):
    daemon = start_daemon("--idle-timeout", "1", control=True, log_file=True)
    quiet = topo.connect(topo.cli, topo.SERVER4, ECHO)
    trickle = topo.connect(topo.cli, topo.SERVER4, ECHO)
    with quiet, trickle:
        assert echo(quiet, b"once") == b"once"
        started = time.monotonic()
        reset_after = None
        # The trickle lives 3 idle timeouts; the quiet one's reset may come late
        # on a loaded machine, never early.
        while time.monotonic() - started < (3 if reset_after else 6):
            assert echo(trickle, b".") == b"."
            if reset_after is None:
                quiet.setblocking(False)
                try:
                    quiet.recv(1)
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    reset_after = time.monotonic() - started
            time.sleep(0.3)
        data = payload(1000, seed=5)
        trickle.settimeout(10)
        assert exchange(trickle, data) == (1000, sha256(data), "eof")
    assert reset_after is not None and 0.9 <= reset_after <= 5, reset_after
    [line] = daemon.wait_log("idle for 1 s, resetting")
    assert daemon.info()["Closed_idle_timeout"] == "1"
    # The server's side was reset too.
    peers.wait_records(mode="echo", sha256=sha256(b"once"), end="ECONNRESET")


def test_max_per_client_holds_through_an_upgrade(topo, peers, start_daemon):
    """After SIGUSR2 the old workers drain: their connections still count
    against the new workers' --max-per-client until they close."""
    daemon = start_daemon("-w", "2", "--max-per-client", "2", control=True, log_file=True)
    old = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "two workers")
    mine = [connect_from(topo, topo.CLIENT4) for _ in range(2)]
    try:
        for sock in mine:
            assert echo(sock, b"ok") == b"ok"
        daemon.signal(signal.SIGUSR2)
        daemon.wait_log("Upgrade done", timeout=20)
        assert reset_at_once(topo, topo.CLIENT4)
        with connect_from(topo, CLIENT_B) as other:
            assert echo(other, b"other") == b"other"
        mine.pop().close()
        resets = []

        def served() -> bool:  # the old connection's close reaches the new worker soon
            try:
                with connect_from(topo, topo.CLIENT4) as sock:
                    return echo(sock, b"new") == b"new"
            except ConnectionResetError:
                resets.append(1)
                return False
        wait_for(served, 5, "a connection from the client once one of its old ones closed")
    finally:
        for sock in mine:
            sock.close()
    wait_for(lambda: not set(old) & set(daemon.workers()), 10, "the old workers to exit")
    assert daemon.info()["Limited_max_per_client"] == str(1 + len(resets))


def test_max_connections_holds_through_an_upgrade(topo, peers, start_daemon):
    """The old worker's connections count against the new one's
    --max-connections: the next client waits until one of them closes."""
    daemon = start_daemon("--max-connections", "3", control=True, log_file=True)
    first = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(3)]
    try:
        for n, sock in enumerate(first):
            assert echo(sock, b"in %d" % n) == b"in %d" % n
        daemon.signal(signal.SIGUSR2)
        daemon.wait_log("Upgrade done", timeout=20)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as waiting:
            waiting.sendall(b"waiting")
            held_back(topo, daemon, [waiting])
            first.pop().close()
            waiting.settimeout(5)
            assert waiting.recv(7, socket.MSG_WAITALL) == b"waiting"
    finally:
        for sock in first:
            sock.close()


def test_max_connections_is_shared_out_over_the_workers(topo, peers, start_daemon):
    """-w 2 --max-connections 4: each worker holds at most 2, the daemon at
    most 4; the rest wait in the kernel's backlog and are served as others
    close."""
    daemon = start_daemon("-w", "2", "--max-connections", "4", control=True, log_file=True)
    wait_for(lambda: len(daemon.workers()) == 2, 10, "two workers")
    socks = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(12)]
    try:
        for n, sock in enumerate(socks):
            sock.sendall(b"%02d" % n)
        daemon.wait_log("Reached --max-connections")

        def settled() -> bool:  # every connection either held by a worker or queued
            return held(daemon) + backlog(topo, daemon.port) == len(socks)
        wait_for(settled, 10, "the connections held or queued")
        per_worker = worker_connections(daemon)
        assert len(per_worker) == 2 and all(count <= 2 for count in per_worker), per_worker
        assert 2 <= sum(per_worker) <= 4, per_worker
        assert int(daemon.info()["Connections_open"]) == sum(per_worker)
        # Closing served connections lets the waiting ones in, until all are served.
        served: set[int] = set()
        deadline = time.monotonic() + 30
        while len(served) < len(socks):
            assert time.monotonic() < deadline, f"served only {sorted(served)}"
            for n, sock in enumerate(socks):
                if n in served:
                    continue
                sock.setblocking(False)
                try:
                    got = sock.recv(2)
                except BlockingIOError:
                    continue
                finally:
                    sock.settimeout(10)
                assert got == b"%02d" % n
                served.add(n)
                sock.close()
            wait_for(lambda: held(daemon) <= 4, 10, "at most 4 held")
            time.sleep(0.05)
    finally:
        for sock in socks:
            sock.close()


def worker_connections(daemon) -> list[int]:
    """Connections each worker holds, from show info's Process lines."""
    return [int(line.split("connections=")[1].split()[0])
            for line in daemon.ask("show info").splitlines()
            if line.startswith("Process: worker")]


def held(daemon) -> int:
    return sum(worker_connections(daemon))
