"""The policy on real connections: two servers behind the router, a "near"
one (the usual server namespace) and a "far" one behind a link shaped with
tc tbf; each connection must get its rule's recipe, seen from the kernel:
getsockopt() on the daemon's own sockets and ss for congestion control,
buffers, pacing and user timeout, nft counters in the router for marks,
tcpdump in the server namespaces for DSCP, the protocol for MPTCP. The
client leg's DSCP is counted by nft in the client's namespace; servers of
the test's own keep each SYN (TCP_SAVED_SYN) to tell the server leg's DSCP
and whether it offered MPTCP; the peers say which address came to them. A
reload under traffic changes new connections only and cuts none.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import socket
import subprocess
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab.netns import borrow_sockets, inside, wait_for
from lab.peers import ECHO, PeerServer, exchange, payload, sha256
from lab.topology import Topology

IPPROTO_MPTCP = 262
SO_MARK = 36
SO_MAX_PACING_RATE = 47
TCP_NOTSENT_LOWAT = 25


class PolicyWorld(Topology):
    """The Topology plus a far server namespace behind a 20 Mbit/s link::

        <tag>-rtr rf 10.91.4.1/24 <-tbf 20mbit-> f0 10.91.4.2/24 <tag>-far
                     fd91:4::1/64                   fd91:4::2/64
    """

    ROUTER4_F, FAR4, ROUTER6_F, FAR6 = "10.91.4.1", "10.91.4.2", "fd91:4::1", "fd91:4::2"

    def __init__(self):
        super().__init__()
        self.far = f"{self.tag}-far"

    def up(self) -> None:
        super().up()
        subprocess.run(["ip", "netns", "add", self.far], check=True, timeout=10)
        self._made.append(self.far)
        self._prepare(self.far)
        self.run(self.far, "ip", "link", "add", "f0", "type", "veth", "peer", "name", "rf",
                 "netns", self.rtr)
        self._address(self.rtr, "rf", f"{self.ROUTER4_F}/24", f"{self.ROUTER6_F}/64")
        self._address(self.far, "f0", f"{self.FAR4}/24", f"{self.FAR6}/64")
        self.run(self.far, "ip", "route", "add", "default", "via", self.ROUTER4_F)
        self.run(self.far, "ip", "-6", "route", "add", "default", "via", self.ROUTER6_F)
        for ns, dev in ((self.rtr, "rf"), (self.far, "f0")):
            self.run(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", "20mbit",
                     "burst", "64kb", "latency", "50ms")
        for ns in (self.rtr, self.srv, self.far):
            self.run(ns, "sysctl", "-qw", "net.mptcp.enabled=1")


WORLD = PolicyWorld

POLICY = """
[[rule]]
name = "far"
destination = ["{far}/32", "{far6}/128"]
keepalive = {{ idle = 33, interval = 7, count = 3 }}
[rule.server_leg]
congestion = "bbr"
mark = 0x42
sndbuf = 1048576
notsent_lowat = 131072
pacing_rate = "16mbit"
dscp = 46
[rule.client_leg]
congestion = "reno"
rcvbuf = 524288

[[rule]]
name = "near-copy"
destination = "{near}/32"
port = {echo}
mptcp = true
[rule.server_leg]
dscp = "copy"
mark = 0x44
"""


@pytest.fixture(scope="module")
def far_peers(topo):
    with PeerServer(SimpleNamespace(srv=topo.far)) as server:
        yield server


def write_policy(path, text: str, topo) -> str:
    path.write_text(textwrap.dedent(text).format(far=topo.FAR4, far6=topo.FAR6,
                                                 near=topo.SERVER4, near6=topo.SERVER6,
                                                 echo=ECHO))
    return str(path)


@pytest.fixture
def daemon(topo, peers, far_peers, start_daemon, tmp_path):
    policy = write_policy(tmp_path / "policy.toml", POLICY, topo)
    # On [::]: IPv4 connections arrive with mapped addresses (::ffff:a.b.c.d).
    return start_daemon("-C", "cubic", "--policy", policy, control=True, log_file=True,
                        listen=f"[::]:[{topo.port}]")


@contextlib.contextmanager
def held(topo, daemon, host: str, port: int = ECHO, tos: int | None = None):
    """(the client's socket, the daemon's accepted socket, its socket to the server)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = topo.socket(topo.cli, family)
    sock.settimeout(10)
    borrowed = []
    try:
        if tos is not None:
            sock.setsockopt(socket.SOL_IP, socket.IP_TOS, tos)
        before = _inodes(_borrow(daemon))
        sock.connect((host, port))
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        borrowed = [s for s in _borrow(daemon) if _inode(s) not in before]
        [accepted] = [s for s in borrowed if _plain(s.getsockname()) == (host, port)]
        [outgoing] = [s for s in borrowed if _plain(_peer(s)) == (host, port)]
        yield sock, accepted, outgoing
    finally:
        sock.close()
        for s in borrowed:
            s.close()


def _borrow(daemon) -> list[socket.socket]:
    """Duplicates of the sockets of every worker."""
    return [sock for pid in daemon.workers() for sock in borrow_sockets(pid)]


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _inodes(socks: list[socket.socket]) -> set[int]:
    """The sockets' identities (closing the duplicates)."""
    found = set()
    for sock in socks:
        with sock:
            found.add(_inode(sock))
    return found


def _plain(address: tuple) -> tuple:
    return (address[0].removeprefix("::ffff:"), address[1]) if address else ()


def _peer(sock: socket.socket) -> tuple:
    try:
        return sock.getpeername()
    except OSError:
        return ()


def congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def ss(topo, dst: str) -> str:
    return topo.run(topo.rtr, "ss", "-tinmH", "dst", dst).stdout


def test_each_connection_gets_its_rules_options(topo, daemon):
    with held(topo, daemon, topo.FAR4) as (_, accepted, outgoing):
        assert congestion(outgoing) == "bbr"
        assert congestion(accepted) == "reno"
        assert outgoing.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x42
        assert outgoing.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 1048576
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 524288
        assert outgoing.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT) == 131072
        assert outgoing.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE) == 2_000_000
        for sock in (accepted, outgoing):
            assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (33, 3)
        seen = ss(topo, topo.FAR4)
        assert " bbr " in seen, seen
        assert "/16000000bps" in seen, seen   # pacing rate / its cap, in bit/s
        assert ",tb2097152," in seen, seen     # the send buffer (the kernel doubles it)
    with held(topo, daemon, topo.SERVER4) as (_, accepted, outgoing):
        assert congestion(outgoing) == "cubic"      # -C: this rule names none
        assert outgoing.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == IPPROTO_MPTCP
        assert outgoing.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x44
    with held(topo, daemon, topo.FAR6) as (_, accepted, outgoing):
        assert congestion(outgoing) == "bbr"
    with held(topo, daemon, topo.SERVER6) as (_, accepted, outgoing):  # no rule: default
        assert congestion(outgoing) == "cubic"
        assert outgoing.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
        assert outgoing.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
    data = payload(300_000, seed=16)
    with topo.connect(topo.cli, topo.FAR4, ECHO, timeout=30) as sock:
        assert exchange(sock, data) == (len(data), sha256(data), "eof")


def test_marks_counted_by_the_routers_firewall(topo, daemon):
    # (Marks with bit 0 would be tproxy.sh's --mark 0x1/0x1: routed to the router itself.)
    ruleset = textwrap.dedent(f"""
        table inet hp_policy_marks {{
            chain out {{
                type filter hook output priority 0; policy accept;
                meta mark 0x42 ip daddr {topo.FAR4} counter
                meta mark 0x44 ip daddr {topo.SERVER4} counter
            }}
        }}
        """)
    topo.run(topo.rtr, "nft", "-f", "-", input=ruleset)
    try:
        for host in (topo.FAR4, topo.SERVER4):
            with held(topo, daemon, host):
                pass
        listed = topo.run(topo.rtr, "nft", "list", "table", "inet", "hp_policy_marks").stdout
        counts = [int(line.split("packets")[1].split()[0]) for line in listed.splitlines()
                  if "counter packets" in line]
        assert len(counts) == 2 and all(count >= 3 for count in counts), listed
    finally:
        topo.run(topo.rtr, "nft", "delete", "table", "inet", "hp_policy_marks", check=False)


@contextlib.contextmanager
def capture(topo, ns: str, dev: str, host: str):
    """tcpdump in ns: the TOS of every TCP packet from the router to host."""
    proc = topo.popen(ns, "tcpdump", "-i", dev, "-n", "-l", "-v", "-s", "96",
                      f"tcp and dst host {host}", stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # tcpdump has no ready signal but its stderr line
        seen: list[str] = []
        yield seen
        time.sleep(0.3)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        seen += [line for line in out.splitlines() if "(tos 0x" in line]


def tos_values(lines: list[str]) -> set[int]:
    return {int(line.split("(tos ")[1].split(",")[0], 16) >> 2 for line in lines}


def test_dscp_set_and_copied_as_tcpdump_sees_it(topo, daemon):
    with capture(topo, topo.far, "f0", topo.FAR4) as seen:
        with held(topo, daemon, topo.FAR4, tos=10 << 2) as (sock, _, _):
            sock.sendall(b"y" * 20000)
    assert seen and tos_values(seen) == {46}, seen
    for dscp in (10, 34, 0):
        with capture(topo, topo.srv, "s0", topo.SERVER4) as seen:
            with held(topo, daemon, topo.SERVER4, tos=dscp << 2) as (sock, _, _):
                sock.sendall(b"z" * 20000)
        assert seen and tos_values(seen) == {dscp}, (dscp, seen)


def test_reload_changes_new_connections_only_and_cuts_none(topo, daemon, tmp_path):
    data = payload(2_000_000, seed=17)
    old = topo.connect(topo.cli, topo.FAR4, ECHO, timeout=60)
    with old:
        old.sendall(data[:1000])  # relaying under the old policy
        write_policy(tmp_path / "policy.toml", POLICY.replace('"bbr"', '"reno"'), topo)
        answer = subprocess.run([*ctl(daemon), "reload"], capture_output=True, text=True,
                                timeout=20)
        assert answer.returncode == 0 and "in force in every worker" in answer.stdout, answer
        assert _new_cc(topo, daemon) == "reno"  # at once: the answer waited for the workers
        old_cc = [line for line in ss(topo, topo.FAR4).splitlines()]
        assert any(" bbr " in line for line in old_cc), old_cc  # the open one keeps its own
        old.sendall(data[1000:])
        old.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := old.recv(1 << 20):
            received += chunk
        assert sha256(received) == sha256(data)
    # A bad file changes nothing, and says why where the operator looks.
    (tmp_path / "policy.toml").write_text("[[rule]]\nname = 'x'\nport = 99999\n")
    answer = subprocess.run([*ctl(daemon), "reload"], capture_output=True, text=True, timeout=20)
    assert answer.returncode == 1
    assert "ERROR: policy not reloaded" in answer.stdout and "rule 1 (x): port" in answer.stdout
    daemon.wait_log("policy not reloaded")
    assert _new_cc(topo, daemon) == "reno"
    shown = daemon.ask("show policy")
    assert "Last_reload_failed:" in shown and "Rule: 1 far destination=" in shown, shown


def test_show_policy_and_the_matches_metric(topo, daemon):
    for host in (topo.FAR4, topo.SERVER6):
        with held(topo, daemon, host):
            pass

    def counted() -> bool:
        metrics = daemon.ask("show metrics")
        return ('tcp_intercept_policy_matches_total{rule="far"} 1.0' in metrics
                and 'tcp_intercept_policy_matches_total{rule="default"} 1.0' in metrics)
    wait_for(counted, 5, "the matches in the metrics")
    shown = daemon.ask("show policy").splitlines()
    assert shown[0].startswith("Policy: ") and shown[1].startswith("Loaded: ")
    assert any(line.startswith("Rule: 1 far ") and line.endswith("matched=1") for line in shown)
    assert "Default: matched=1" in shown


def _new_cc(topo, daemon) -> str:
    with held(topo, daemon, topo.FAR4) as (_, _, outgoing):
        return congestion(outgoing)


def ctl(daemon) -> list[str]:
    import sys
    return [sys.executable, "-m", "tcp_intercept.ctl", "-s", str(daemon.control_path)]


def test_sighup_reloads_too(topo, daemon, tmp_path):
    write_policy(tmp_path / "policy.toml", POLICY.replace('"bbr"', '"reno"'), topo)
    import signal
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("Policy reloaded from")
    wait_for(lambda: _new_cc(topo, daemon) == "reno", 10, "the workers to take the reload")


# MPTCP clients' server legs get reno (the command line says cubic).
CLIENT_MPTCP_RENO = """
        [[rule]]
        name = "mp"
        client_mptcp = true
        [rule.server_leg]
        congestion = "reno"
        """


TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info


def _plain_cubic_mptcp_reno(topo, daemon) -> None:
    """A plain client's server leg gets the command line's cubic, an MPTCP
    client's the client_mptcp rule's reno."""
    for proto, expected in ((socket.IPPROTO_TCP, "cubic"), (IPPROTO_MPTCP, "reno")):
        with inside(topo.cli):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
        with sock:
            sock.settimeout(10)
            sock.connect((topo.SERVER4, ECHO))
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            borrowed = daemon.borrow_sockets()
            try:
                # Established: the previous round's leg may still be closing
                # (its server's FIN late on a loaded machine).
                [outgoing] = [s for s in borrowed
                              if _plain(_peer(s)) == (topo.SERVER4, ECHO)
                              and s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                              == TCP_ESTABLISHED]
                assert congestion(outgoing) == expected
            finally:
                for s in borrowed:
                    s.close()


def test_client_mptcp_rule_tells_mptcp_clients_apart(topo, peers, far_peers, start_daemon,
                                                      tmp_path):
    policy = write_policy(tmp_path / "p.toml", CLIENT_MPTCP_RENO, topo)
    daemon = start_daemon("-C", "cubic", "--policy", policy)
    _plain_cubic_mptcp_reno(topo, daemon)


def test_a_rules_per_client_limit_and_idle_timeout_are_its_own(topo, peers, far_peers,
                                                                start_daemon, tmp_path):
    policy = write_policy(tmp_path / "p.toml", """
        [[rule]]
        name = "strict"
        destination = "{far}/32"
        max_per_client = 2
        idle_timeout = 1
        """, topo)
    daemon = start_daemon("--policy", policy, log_file=True)
    far = [topo.connect(topo.cli, topo.FAR4, ECHO) for _ in range(3)]
    near = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(3)]
    try:
        for sock in near + far[:2]:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        assert reset(far[2])  # the third to far: over its limit
        daemon.wait_log("already has 2 connections (--max-per-client)")
        time.sleep(1.6)  # idle_timeout 1 s, checked every 0.1 s
        assert reset(far[0]) and reset(far[1])
        for sock in near:  # the default has no idle timeout
            sock.sendall(b"y")
            assert sock.recv(1) == b"y"
    finally:
        for sock in far + near:
            sock.close()


def reset(sock: socket.socket) -> bool:
    """Whether the daemon reset this connection (the next exchange fails)."""
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_a_rules_source_and_connect_timeout_are_its_own(topo, peers, far_peers, start_daemon,
                                                        tmp_path):
    silent = 7100  # SYNs to it are dropped in the far namespace
    topo.run(topo.far, "nft", "add table inet hp_silent; add chain inet hp_silent in { type "
             "filter hook input priority 0; }; add rule inet hp_silent in tcp dport "
             f"{silent} drop")
    policy = write_policy(tmp_path / "p.toml", f"""
        [[rule]]
        name = "spoof"
        destination = "{{near}}/32"
        source = "client"

        [[rule]]
        name = "silent"
        port = {silent}
        connect_timeout = 1
        """, topo)
    daemon = start_daemon("--policy", policy, log_file=True)
    for host, server, seen in ((topo.SERVER4, peers, topo.CLIENT4),
                               (topo.FAR4, far_peers, topo.ROUTER4_F)):
        data = payload(50_000, seed=len(host))
        with topo.connect(topo.cli, host, ECHO) as sock:
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
        [record] = server.wait_digests({sha256(data)})
        assert record.peer[0] == seen, (host, record)
    with topo.connect(topo.cli, topo.FAR4, silent) as sock:  # the router's side answers
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        assert 0.9 <= time.monotonic() - started <= 1.8
    daemon.wait_log(f"-->[{topo.FAR4}]:{silent}: connect to server failed: timed out")


def test_reload_reaches_every_worker(topo, peers, far_peers, start_daemon, tmp_path):
    policy = write_policy(tmp_path / "p.toml", POLICY, topo)
    daemon = start_daemon("-w", "2", "--policy", policy, control=True, log_file=True)
    write_policy(tmp_path / "p.toml", POLICY.replace('"bbr"', '"reno"'), topo)
    assert "in force in every worker" in daemon.ask("reload")
    # The kernel spreads connections over both workers' sockets by a hash
    # of the 4-tuple: 16 held at once land on both (all but 1 in 32768 times).
    clients = [topo.connect(topo.cli, topo.FAR4, ECHO) for _ in range(16)]
    try:
        for sock in clients:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        per_worker = {}
        for pid in daemon.workers():
            socks = borrow_sockets(pid)
            per_worker[pid] = [congestion(s) for s in socks
                               if _plain(_peer(s)) == (topo.FAR4, ECHO)]
            for sock in socks:
                sock.close()
    finally:
        for sock in clients:
            sock.close()
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    assert {cc for ccs in per_worker.values() for cc in ccs} == {"reno"}, per_worker
    assert daemon.lines_by_now("policy not reloaded") == []


@pytest.fixture
def readable_dir():
    """A directory the user nobody may read and write (pytest's are root's alone)."""
    import pwd
    import shutil
    path = Path(tempfile.mkdtemp(prefix="ti-policy-", dir="/tmp"))
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_reload_that_needs_a_capability_the_daemon_dropped_is_refused(
        topo, peers, far_peers, start_daemon, readable_dir):
    """As nobody without a mark at start-up, the daemon keeps no capability;
    a reload that brings a mark says it needs CAP_NET_ADMIN and changes nothing."""
    policy = readable_dir / "p.toml"
    write_policy(policy, '[[rule]]\nname = "far"\ndestination = "{far}/32"\n', topo)
    policy.chmod(0o644)
    daemon = start_daemon("-u", "nobody", "--policy", str(policy), control=True,
                          log_file=readable_dir / "d.log", listen=f"[::]:[{topo.port}]")
    daemon.wait_log("Running as user nobody")
    write_policy(policy, POLICY, topo)  # marks 0x42 and 0x44
    answer = daemon.ask("reload")
    assert answer.startswith("ERROR: policy not reloaded") and "needs the CAP_NET_ADMIN" \
        in answer, answer
    with held(topo, daemon, topo.FAR4) as (_, _, outgoing):
        assert outgoing.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0


def test_reloads_under_traffic_cut_nothing(topo, peers, far_peers, start_daemon, tmp_path):
    import threading
    policy = write_policy(tmp_path / "p.toml", POLICY, topo)
    daemon = start_daemon("-w", "2", "--policy", policy, control=True, log_file=True,
                          listen=f"[::]:[{topo.port}]")
    results: list = []
    connected = threading.Semaphore(0)

    def transfer(seed: int) -> None:
        data = payload(3_000_000, seed=seed)
        with topo.connect(topo.cli, topo.SERVER4 if seed % 2 else topo.SERVER6, ECHO,
                          timeout=60) as sock:
            sock.sendall(data[:1000])  # relaying before the reloads
            connected.release()
            # The echo of all of it comes back: the first 1000 bytes too.
            results.append(exchange(sock, data[1000:]) == (len(data), sha256(data), "eof"))

    threads = [threading.Thread(target=transfer, args=(seed,)) for seed in range(100, 108)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert connected.acquire(timeout=20)
    for cc in ("reno", "bbr", "cubic"):
        write_policy(tmp_path / "p.toml", POLICY.replace('"bbr"', f'"{cc}"'), topo)
        assert "in force in every worker" in daemon.ask("reload")
    for thread in threads:
        thread.join(timeout=60)
    assert results == [True] * 8
    assert daemon.lines_by_now("Error") == [] and daemon.lines_by_now("reset") == []


def test_client_mptcp_on_an_mptcp_listener(topo, peers, far_peers, start_daemon, tmp_path):
    policy = write_policy(tmp_path / "p.toml", CLIENT_MPTCP_RENO, topo)
    daemon = start_daemon("-C", "cubic", "--mptcp-listen", "--policy", policy, log_file=True)
    _plain_cubic_mptcp_reno(topo, daemon)
    assert daemon.lines_by_now("TCP_SAVE_SYN") == []


def test_as_nobody_a_policy_with_marks_keeps_cap_net_admin(topo, peers, far_peers,
                                                           start_daemon, readable_dir):
    policy = readable_dir / "p.toml"
    write_policy(policy, '[[rule]]\nname = "far"\ndestination = "{far}/32"\n'
                 '[rule.server_leg]\nmark = 0x42\n', topo)
    policy.chmod(0o644)
    daemon = start_daemon("-u", "nobody", "--policy", str(policy), control=True,
                          log_file=readable_dir / "d.log", listen=f"[::]:[{topo.port}]")
    daemon.wait_log("Running as user nobody (uid 65534), group nogroup (gid 65534); "
                    "capabilities kept: CAP_NET_ADMIN")
    with held(topo, daemon, topo.FAR4) as (_, _, outgoing):
        assert outgoing.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x42
    assert "in force in every worker" in daemon.ask("reload")  # as nobody, still allowed


# -- the client leg, the source, user_timeout, mptcp = false -------------------

TCP_SAVE_SYN, TCP_SAVED_SYN = 27, 28
TCP_USER_TIMEOUT = 18
IPV6_TCLASS = 67
SYN_PORT = 7201  # the SynServers' port, in the near and the far namespace


class SynServer:
    """A server of the test's own in namespace ns (IPv4 and IPv6): the kernel
    keeps the SYN of each connection it accepts (TCP_SAVE_SYN), so accept()
    tells what the daemon's server leg put on the wire."""

    def __init__(self, ns: str, port: int = SYN_PORT):
        with inside(ns):
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)
        self.sock.bind(("::", port))
        self.sock.listen(16)
        self.sock.settimeout(10)

    def accept(self) -> tuple[socket.socket, bytes]:
        """The next connection and its SYN (IP and TCP headers)."""
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        return conn, conn.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 512)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def syn_servers(topo):
    servers = {"near": SynServer(topo.srv), "far": SynServer(topo.far)}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.close()


def syn_says(syn: bytes) -> tuple[int, bool]:
    """(DSCP, whether it offers MPTCP) of a SYN's raw IPv4 or IPv6 header
    (no extension headers) and TCP header, read here independently of the
    daemon's own reader."""
    if syn[0] >> 4 == 4:
        dscp, tcp = syn[1] >> 2, syn[(syn[0] & 0x0F) * 4:]
    else:
        dscp, tcp = (int.from_bytes(syn[:2], "big") >> 6) & 0x3F, syn[40:]
    kinds, i, end = set(), 20, (tcp[12] >> 4) * 4
    while i < end and tcp[i] != 0:  # 0: end of the options
        if tcp[i] == 1:  # no-operation
            i += 1
            continue
        kinds.add(tcp[i])
        i += max(tcp[i + 1], 2)
    return dscp, 30 in kinds  # 30: MPTCP


@contextlib.contextmanager
def nft_counters(topo, ns: str, hook: str, rules: dict[str, str]):
    """An nft table in ns counting, at hook, the packets of each match;
    yields a function giving {name: (packets, bytes)} at the time."""
    table = f"hp_policy_{hook}"
    body = "\n".join(f'{match} counter comment "{name}"' for name, match in rules.items())
    topo.run(ns, "nft", "-f", "-", input=f"table inet {table} {{\nchain c {{\n"
             f"type filter hook {hook} priority 0; policy accept;\n{body}\n}}\n}}\n")

    def read() -> dict[str, tuple[int, int]]:
        listed = json.loads(topo.run(ns, "nft", "-j", "list", "table", "inet", table).stdout)
        found = {}
        for item in listed["nftables"]:
            if "rule" in item:
                [counter] = [e["counter"] for e in item["rule"]["expr"] if "counter" in e]
                found[item["rule"]["comment"]] = (counter["packets"], counter["bytes"])
        return found
    try:
        yield read
    finally:
        topo.run(ns, "nft", "delete", "table", "inet", table, check=False)


def receive(sock: socket.socket, size: int) -> bytes:
    """size bytes from sock, fewer at EOF (its timeout bounds each wait)."""
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def tos(sock: socket.socket, peer: str) -> int:
    """The DSCP sock sends to peer with: IP_TOS, IPV6_TCLASS for IPv6 peers."""
    if ":" in peer and not peer.startswith("::ffff:"):
        return sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TCLASS) >> 2
    return sock.getsockopt(socket.SOL_IP, socket.IP_TOS) >> 2


CLIENT_LEG = """
    [[rule]]
    name = "client-set"
    destination = ["{far}/32", "{far6}/128"]
    [rule.client_leg]
    mark = 0x46
    dscp = 26

    [[rule]]
    name = "client-copy"
    destination = ["{near}/32", "{near6}/128"]
    [rule.client_leg]
    dscp = "copy"
    """


def test_the_client_legs_mark_and_dscp_set_and_copied(topo, peers, far_peers, start_daemon,
                                                      tmp_path, syn_servers):
    """What the router sends the client carries the rule's client_leg mark
    (nft in the router, getsockopt) and DSCP (nft in the client's namespace,
    after the handshake: the SYN-ACK leaves before the daemon accepts), a
    set one whatever the client's SYN carried, or that SYN's with "copy";
    the server leg gets neither (its SYN, as the server kept it)."""
    policy = write_policy(tmp_path / "p.toml", CLIENT_LEG, topo)
    daemon = start_daemon("--policy", policy, listen=f"[::]:[{topo.port}]")
    size = 30_000
    cases = [(topo.FAR4, 10, 26, 0x46), (topo.FAR6, 0, 26, 0x46),
             (topo.SERVER4, 10, 10, 0), (topo.SERVER4, 34, 34, 0),
             (topo.SERVER6, 34, 34, 0), (topo.SERVER6, 10, 10, 0)]
    for seed, (host, syn_dscp, dscp, mark) in enumerate(cases):
        six = ":" in host
        client = topo.CLIENT6 if six else topo.CLIENT4
        server = syn_servers["far" if host in (topo.FAR4, topo.FAR6) else "near"]
        sock = topo.socket(topo.cli, socket.AF_INET6 if six else socket.AF_INET)
        with sock:
            sock.settimeout(10)
            if six:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TCLASS, syn_dscp << 2)
            else:
                sock.setsockopt(socket.SOL_IP, socket.IP_TOS, syn_dscp << 2)
            sock.bind((client, 0))
            port = sock.getsockname()[1]
            to_client = f"tcp sport {SYN_PORT} tcp dport {port} tcp flags ! syn"
            ip = "ip6" if six else "ip"
            with nft_counters(topo, topo.cli, "input", {
                    "all": f"meta nfproto ipv{6 if six else 4} {to_client}",
                    "dscp": f"{ip} dscp {dscp} {to_client}"}) as client_saw, \
                    nft_counters(topo, topo.rtr, "output", {
                        "all": to_client, "mark": f"meta mark {mark:#x} {to_client}",
                        "server leg marked": f"tcp dport {SYN_PORT} meta mark != 0"}) as sent:
                sock.connect((host, SYN_PORT))
                conn, syn = server.accept()
                with conn:
                    data = payload(size, seed=160 + seed)
                    conn.sendall(data)
                    assert receive(sock, size) == data
                    with legs(daemon, (client, port), conn.getpeername()) as (accepted,
                                                                               outgoing):
                        assert accepted.getsockopt(socket.SOL_SOCKET, SO_MARK) == mark
                        assert tos(accepted, _peer(accepted)[0]) == dscp
                        assert outgoing.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
                    seen, marked = client_saw(), sent()
        case = (host, syn_dscp, seen, marked)
        assert seen["all"][1] >= size and seen["dscp"] == seen["all"], case
        assert marked["all"][1] >= size and marked["mark"] == marked["all"], case
        assert marked["server leg marked"] == (0, 0), case
        assert syn_says(syn) == (0, False), case  # the server leg: the kernel's DSCP


@contextlib.contextmanager
def legs(daemon, client: tuple, server_saw: tuple):
    """(accepted, outgoing): the daemon's sockets of the connection from
    client whose server leg the server saw coming from server_saw."""
    borrowed = _borrow(daemon)
    try:
        [accepted] = [s for s in borrowed if _plain(_peer(s)) == _plain(client)]
        [outgoing] = [s for s in borrowed if _peer(s)
                      and _plain(s.getsockname()) == _plain(server_saw[:2])]
        yield accepted, outgoing
    finally:
        for sock in borrowed:
            sock.close()


FIXED4, FIXED6, FIXED_PORT = "10.91.4.3", "fd91:4::3", 40126


def test_a_rules_fixed_source_address_is_what_the_server_sees(topo, peers, far_peers,
                                                             start_daemon, tmp_path):
    """source = an address: the far server sees the rule's address (and
    port, when given), IPv4 and IPv6, through a listener on [::]; the near
    one, which no rule names, the kernel's choice."""
    topo.run(topo.rtr, "ip", "addr", "add", f"{FIXED4}/24", "dev", "rf")
    topo.run(topo.rtr, "ip", "-6", "addr", "add", f"{FIXED6}/64", "dev", "rf", "nodad")
    try:
        policy = write_policy(tmp_path / "p.toml", f"""
            [[rule]]
            name = "fixed4"
            destination = "{{far}}/32"
            source = "[{FIXED4}]:[0]"

            [[rule]]
            name = "fixed6"
            destination = "{{far6}}/128"
            source = "[{FIXED6}]:[{FIXED_PORT}]"
            """, topo)
        daemon = start_daemon("--policy", policy, listen=f"[::]:[{topo.port}]")
        for seed, (host, server, seen) in enumerate((
                (topo.FAR4, far_peers, (FIXED4, None)),
                (topo.FAR6, far_peers, (FIXED6, FIXED_PORT)),
                (topo.SERVER4, peers, (topo.ROUTER4_S, None)),
                (topo.SERVER6, peers, (topo.ROUTER6_S, None)))):
            data = payload(50_000, seed=1600 + seed)
            with topo.connect(topo.cli, host, ECHO) as sock:
                assert exchange(sock, data) == (len(data), sha256(data), "eof"), host
            [record] = server.wait_digests({sha256(data)})
            peer = _plain(record.peer)
            assert peer[0] == seen[0] and seen[1] in (None, peer[1]), (host, record)
        daemon.wait_log("closed", count=4)
    finally:
        topo.run(topo.rtr, "ip", "addr", "del", f"{FIXED4}/24", "dev", "rf", check=False)
        topo.run(topo.rtr, "ip", "-6", "addr", "del", f"{FIXED6}/64", "dev", "rf",
                 check=False)


def test_a_rules_user_timeout_is_on_both_legs(topo, peers, far_peers, start_daemon, tmp_path):
    """user_timeout of a rule on both of its connections' legs, over the
    command line's --user-timeout; 0 gives the kernel's back."""
    policy = write_policy(tmp_path / "p.toml", """
        [[rule]]
        name = "short"
        destination = ["{far}/32", "{far6}/128"]
        user_timeout = 3.5

        [[rule]]
        name = "kernels"
        destination = "{near6}/128"
        user_timeout = 0
        """, topo)
    daemon = start_daemon("--user-timeout", "9", "--policy", policy,
                          listen=f"[::]:[{topo.port}]")
    for host, expected in ((topo.FAR4, 3500), (topo.FAR6, 3500), (topo.SERVER6, 0),
                           (topo.SERVER4, 9000)):
        with held(topo, daemon, host) as (_, accepted, outgoing):
            assert (accepted.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT),
                    outgoing.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT)) \
                == (expected, expected), host


def test_mptcp_false_in_a_rule_overrides_the_command_lines_M(topo, peers, far_peers,
                                                             start_daemon, tmp_path,
                                                             syn_servers):
    """With -M, a rule's mptcp = false makes its server legs plain TCP: the
    far server's SYN offers no MPTCP, the near one's (no rule) does."""
    policy = write_policy(tmp_path / "p.toml", """
        [[rule]]
        name = "plain"
        destination = ["{far}/32", "{far6}/128"]
        mptcp = false
        """, topo)
    daemon = start_daemon("-M", "--policy", policy, listen=f"[::]:[{topo.port}]")
    for host, where, mptcp in ((topo.FAR4, "far", False), (topo.FAR6, "far", False),
                               (topo.SERVER4, "near", True), (topo.SERVER6, "near", True)):
        before = _inodes(_borrow(daemon))
        with topo.connect(topo.cli, host, SYN_PORT) as sock:
            conn, syn = syn_servers[where].accept()
            with conn:
                assert syn_says(syn)[1] is mptcp, host
                borrowed = [s for s in _borrow(daemon) if _inode(s) not in before]
                try:
                    [outgoing] = [s for s in borrowed if _plain(_peer(s)) == (host, SYN_PORT)]
                    assert outgoing.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == \
                        (IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP), host
                finally:
                    for s in borrowed:
                        s.close()
                conn.sendall(b"m")
                assert sock.recv(1) == b"m"
