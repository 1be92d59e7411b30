"""A router that never black-holes (issue 17): with tproxy.sh's rules in the
router and the daemon killed, stopped, hung, failing to start or full, a
real client's connection through the router still reaches its server with
its bytes intact: intercepted when the daemon can serve it, forwarded as
if there were no proxy otherwise. --fail closed keeps the original's drop.

A connection was intercepted when the echo server saw it come from the
router; it passed the proxy when the server saw the client's own address.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import socket
import sys
import threading
import time

import pytest

from tcp_intercept.errors import EX_OSERR

from lab.intercept import REPO
from lab.peers import ECHO, exchange, payload, sha256
from lab.topology import TPROXY_SH, Daemon, Topology, TopologyError, pid_alive, wait_for

BACKENDS = ["nft", "iptables"]
_seeds = itertools.count(17_000_000)
# tproxy.sh --fail open: the first connection after the daemon's death passes
# within this long (nft at once; iptables once the heartbeat is a second
# old, which a SYN retransmitted after a second finds).
FAIL_OPEN_WITHIN = 2.0
WORLD = functools.partial(Topology, tproxy=False)


@pytest.fixture(autouse=True)
def bare_router(topo):
    yield
    topo.run(topo.rtr, str(TPROXY_SH), "down")


def tproxy_up(topo: Topology, backend: str, *args: str, family: str = "all") -> None:
    topo.run(topo.rtr, str(TPROXY_SH), "--backend", backend, "--family", family, *args, "up")


def wait_heartbeat(topo: Topology, backend: str, family: str = "4") -> None:
    if backend == "iptables":
        topo.wait_heartbeat(family)


def through(topo: Topology, peers, family: str = "4", timeout: float = 10) -> tuple[str, float]:
    """A connection from the client to the echo server, 100 kB both ways
    checked; (the address the server saw it come from, seconds it took)."""
    server = topo.SERVER6 if family == "6" else topo.SERVER4
    data = payload(100_000, seed=next(_seeds))
    began = time.monotonic()
    with topo.connect(topo.cli, server, ECHO, timeout=timeout) as sock:
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    took = time.monotonic() - began
    [record] = peers.wait_digests({sha256(data)})
    return record.peer[0], took


def router(topo: Topology, family: str = "4") -> str:
    return topo.ROUTER6_S if family == "6" else topo.ROUTER4_S


def client(topo: Topology, family: str = "4") -> str:
    return topo.CLIENT6 if family == "6" else topo.CLIENT4


def listen(family: str) -> str:
    return "[::]:[5000]" if family == "6" else "[0.0.0.0]:[5000]"


def detached(start_daemon, *args: str, **kw):
    """A daemon detached as the init script starts it (one to be killed)."""
    return start_daemon(*args, foreground=False, pid_file=True, log_file=True, **kw)


def kill_all(daemon) -> None:
    """SIGKILL to the master and its workers at once: no cleanup runs."""
    pids = [daemon.pid, *daemon.workers()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), 5, "the daemon's death")


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_fails_open_within_2_s_and_a_restart_intercepts_again(
        topo, peers, start_daemon, backend, family):
    # As the package runs it: unprivileged (the heartbeat needs no privilege).
    daemon = detached(start_daemon, "-w", "2", "-u", "nobody", listen=listen(family))
    tproxy_up(topo, backend, family=family)
    wait_heartbeat(topo, backend, family)
    assert through(topo, peers, family)[0] == router(topo, family)

    kill_all(daemon)
    seen, took = through(topo, peers, family, timeout=FAIL_OPEN_WITHIN + 3)
    assert seen == client(topo, family), "not forwarded past the dead daemon"
    assert took < FAIL_OPEN_WITHIN, f"the first connection took {took:.2f} s"
    assert through(topo, peers, family)[0] == client(topo, family)

    start_daemon(listen=listen(family))
    wait_heartbeat(topo, backend, family)
    assert through(topo, peers, family)[0] == router(topo, family)


def still_relays(sock: socket.socket, peers, sent: bytes = b"held") -> str:
    """hold()'s connection (or another that carried `sent` both ways)
    carries 100 kB more both ways, intact, and ends cleanly; the address the
    server saw it come from."""
    data = payload(100_000, seed=next(_seeds))
    with sock:
        sock.settimeout(10)
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    [record] = peers.wait_digests({sha256(sent + data)})
    return record.peer[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_connection_that_went_past_lives_on_when_the_daemon_is_back(
        topo, peers, start_daemon, backend):
    """Its packets after the SYN never meet TPROXY: the listener that is back
    does not reset them."""
    daemon = detached(start_daemon)
    tproxy_up(topo, backend, family="4")
    wait_heartbeat(topo, backend)
    kill_all(daemon)
    passed = hold(topo)
    start_daemon()
    wait_heartbeat(topo, backend)
    assert through(topo, peers)[0] == router(topo)  # intercepting again
    assert still_relays(passed, peers) == client(topo)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fail_closed_keeps_todays_behaviour(topo, peers, start_daemon, backend):
    daemon = detached(start_daemon)
    tproxy_up(topo, backend, "--fail", "closed", family="4")
    assert through(topo, peers)[0] == router(topo)
    kill_all(daemon)
    with pytest.raises(TimeoutError):
        through(topo, peers, timeout=3)
    start_daemon()
    assert through(topo, peers)[0] == router(topo)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_start_that_fails_leaves_connections_passing(topo, peers, tmp_path, backend):
    """A daemon that cannot start (here: its port is taken, as by a stale
    program at boot) leaves no router black-holing."""
    tproxy_up(topo, backend, family="4")
    with topo.socket(topo.rtr) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", 5000))
        squatter.listen()
        daemon = Daemon(topo, workdir=tmp_path)
        try:
            with pytest.raises(TopologyError, match="exited before it was ready"):
                daemon.start()
        finally:
            assert daemon.stop() == EX_OSERR
        seen, took = through(topo, peers, timeout=FAIL_OPEN_WITHIN + 3)
    assert seen == client(topo)
    assert took < FAIL_OPEN_WITHIN


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stopped_master_leaves_connections_working(topo, peers, start_daemon, backend):
    """SIGSTOP of the master: its workers go on serving (nft intercepts
    still); iptables' rules miss its heartbeat and let connections pass. Once
    it runs again, no worker is blamed for the pings it did not read."""
    daemon = start_daemon("-w", "2", log_file=True)
    tproxy_up(topo, backend, family="4")
    wait_heartbeat(topo, backend)
    daemon.signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)  # past the heartbeat's second
        seen, _ = through(topo, peers, timeout=FAIL_OPEN_WITHIN + 3)
        assert seen == (client(topo) if backend == "iptables" else router(topo))
    finally:
        daemon.signal(signal.SIGCONT)
    wait_heartbeat(topo, backend)
    assert through(topo, peers)[0] == router(topo)
    time.sleep(1.5)  # the master's next ticks
    assert daemon.lines_by_now("has not answered") == []
    assert len(daemon.workers()) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stopped_worker_is_replaced_and_its_backlog_served(topo, peers, start_daemon, backend):
    """-w 2 and one worker SIGSTOPped: the connections the kernel hashes to
    its listening socket wait in the backlog until the master, missing its
    pong, kills it and starts another on the same socket, within 2 s.

    iptables the same: the master goes on beating until the ping has gone
    unanswered for a second, and holds the heartbeat back only from then
    until the replacement serves, so the SYNs sent at once find it fresh and
    meet TPROXY; once the replacement serves, the heartbeat is back."""
    daemon = start_daemon("-w", "2", log_file=True)
    tproxy_up(topo, backend, family="4")
    workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10,
                       "two workers")
    wait_heartbeat(topo, backend)
    victim = workers[0]
    os.kill(victim, signal.SIGSTOP)
    results: list = []

    def one() -> None:
        try:
            results.append(through(topo, peers, timeout=10))
        except Exception as err:  # noqa: BLE001 - reported below
            results.append(err)
    clients = [threading.Thread(target=one) for _ in range(16)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(20)
    daemon.wait_log(f"(pid {victim}) has not answered for")
    daemon.wait_log(f"(pid {victim}) was killed by SIGKILL; starting another")
    assert all(isinstance(r, tuple) for r in results), results
    assert {seen for seen, _ in results} == {router(topo)}, "not all intercepted"
    slowest = max(took for _, took in results)
    fastest = min(took for _, took in results)
    # Some waited for the replacement (hashed to the stopped worker's
    # socket), the others were served at once.
    assert slowest > 0.5 > fastest, sorted(took for _, took in results)
    assert slowest < FAIL_OPEN_WITHIN, sorted(took for _, took in results)
    assert victim not in wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 5,
                                  "a new worker")
    wait_heartbeat(topo, backend)  # iptables: the replacement serves, the beat is back
    for _ in range(8):  # over both workers' sockets
        assert through(topo, peers)[0] == router(topo)


class PlantedBugDaemon(Daemon):
    """tests/planted_bug.py: a relay that reads SPIN loops forever."""
    @property
    def command(self) -> list[str]:
        return [sys.executable, str(REPO / "tests" / "planted_bug.py"), *self.args]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_in_a_tight_loop_is_replaced(topo, peers, tmp_path, backend):
    """iptables: the master holds its heartbeat back from when it notices
    the silent worker until the replacement serves; a connection made then
    may pass the proxy if that takes over the rules' second, so the
    connections after the replacement wait for the beat to be back."""
    daemon = PlantedBugDaemon(topo, "-w", "2", workdir=tmp_path, log_file=True).start()
    try:
        tproxy_up(topo, backend, family="4")
        workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10,
                           "two workers")
        wait_heartbeat(topo, backend)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as spinning:
            spinning.sendall(b"SPIN until killed")
            [line] = daemon.wait_log("has not answered for", timeout=10)
            victim = int(line.split("(pid ")[1].split(")")[0])
            assert victim in workers
            daemon.wait_log(f"(pid {victim}) was killed by SIGKILL; starting another")
        now = wait_for(lambda: len(daemon.workers()) == 2 and victim not in daemon.workers()
                       and daemon.workers(), 5, "a new worker")
        assert set(workers) - {victim} <= set(now), "the other worker was touched"
        wait_heartbeat(topo, backend)
        for _ in range(8):  # over both workers' sockets
            assert through(topo, peers)[0] == router(topo)
    finally:
        daemon.stop()


def hold(topo: Topology) -> socket.socket:
    """A connection to the echo server, open and answering."""
    sock = topo.connect(topo.cli, topo.SERVER4, ECHO)
    sock.sendall(b"held")
    assert sock.recv(4, socket.MSG_WAITALL) == b"held"
    return sock


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_queue_holds_the_next_client_in_the_backlog(topo, peers, start_daemon, backend):
    """iptables the same: full in the queue mode, every worker still answers
    its pings, so the master goes on beating and TPROXY goes on applying."""
    daemon = start_daemon("--max-connections", "1", log_file=True, control=True)
    tproxy_up(topo, backend, family="4")
    wait_heartbeat(topo, backend)
    with hold(topo) as held:
        assert daemon.info()["Connections_open"] == "1", "the first one not intercepted"
        waiting = topo.connect(topo.cli, topo.SERVER4, ECHO)  # the kernel completes it
        with waiting:
            waiting.sendall(b"queued")
            waiting.settimeout(1)
            with pytest.raises(TimeoutError):
                waiting.recv(6)
            held.close()
            waiting.settimeout(10)
            assert waiting.recv(6, socket.MSG_WAITALL) == b"queued"
            assert still_relays(waiting, peers, b"queued") == router(topo)
    info = daemon.info()
    assert info["When_full"] == "queue"
    assert info["Full_reset"] == "0" and info["Full_bypass_periods"] == "0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_reset_resets_the_next_client(topo, peers, start_daemon, backend):
    """iptables the same: full in the reset mode, the master goes on beating."""
    daemon = start_daemon("--max-connections", "1", "--when-full", "reset", control=True)
    tproxy_up(topo, backend, family="4")
    wait_heartbeat(topo, backend)
    with hold(topo):
        assert daemon.info()["Connections_open"] == "1", "the first one not intercepted"
        # The reset may come before connect() returns, or at the first read.
        with pytest.raises(ConnectionResetError):
            with topo.connect(topo.cli, topo.SERVER4, ECHO, timeout=5) as refused:
                refused.sendall(b"x")
                refused.recv(1)
        info = daemon.info()
        assert (info["When_full"], info["Full_reset"]) == ("reset", "1")
    # Room again: served.
    assert wait_for(lambda: daemon.info()["Connections_open"] == "0", 5, "the close")
    assert through(topo, peers)[0] == router(topo)
    metrics = daemon.ask("show metrics")
    assert 'tcp_intercept_when_full_info{mode="reset"} 1.0' in metrics
    assert "tcp_intercept_connections_full_reset_total 1.0" in metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_bypass_lets_new_connections_pass_until_there_is_room(topo, peers,
                                                                   start_daemon, backend):
    """Each worker full stops listening: nft passes what nothing takes at
    once; for iptables the master holds back its heartbeat, and a SYN passes
    once it is a second old (a retransmission)."""
    daemon = start_daemon("-w", "2", "--max-connections", "2", "--when-full", "bypass",
                          log_file=True, control=True)
    tproxy_up(topo, backend, family="4")
    wait_heartbeat(topo, backend)
    held = [hold(topo)]
    # Until both workers hold one, new connections are intercepted.
    while len(held) < 2 or daemon.info()["Full_bypass_periods"] != "2":
        assert len(held) < 10, daemon.info()
        held.append(hold(topo))
    try:
        assert through(topo, peers)[0] == client(topo), "full, yet not passed"
        passed = hold(topo)
        info = daemon.info()
        assert info["When_full"] == "bypass"
        assert 'tcp_intercept_when_full_info{mode="bypass"} 1.0' in daemon.ask("show metrics")
    finally:
        for sock in held:
            sock.close()
    daemon.wait_log("Accepting connections again")
    wait_for(lambda: daemon.info()["Connections_open"] == "0", 5, "the closes")
    wait_heartbeat(topo, backend)
    assert through(topo, peers)[0] == router(topo)
    # What went past while it was full goes on past it.
    assert still_relays(passed, peers) == client(topo)
