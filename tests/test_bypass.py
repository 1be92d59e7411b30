"""The policy's bypass rules in the firewall: tproxy.sh --policy puts their
prefixes in sets (nft) or ipsets (iptables), destinations apart from
clients, that its rules skip, so a bypassed connection is routed as if
there were no daemon. Proof from both
ends: the daemon never lists it (show conns, its log), and the server reads
the client's own SYN (TCP_SAVED_SYN on the server's socket: the client's
TTL less one hop, not a SYN of the router's stack); everything else is
still intercepted. `tproxy.sh bypass` changes the sets in place.
"""

from __future__ import annotations

import functools
import socket
import sys
import textwrap

import pytest

from lab.peers import ECHO
from lab.topology import TPROXY_SH, Topology

WORLD = functools.partial(Topology, tproxy=False)
TCP_SAVE_SYN, TCP_SAVED_SYN = 27, 28
PROBE_PORT = 7200
CLIENT_TTL = 99


@pytest.fixture(autouse=True)
def bare_router(topo):
    yield
    tproxy_sh(topo, "down")


def tproxy_sh(topo, *args: str):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TCP_INTERCEPT_PYTHON": sys.executable,
           "PYTHONPATH": str(TPROXY_SH.parent.parent)}
    return topo.run(topo.rtr, str(TPROXY_SH), *args, env=env)


def write(path, *bypassed: str, key: str = "destination"):
    rules = "".join(f'[[rule]]\nname = "b{i}"\nbypass = true\n{key} = "{prefix}"\n\n'
                    for i, prefix in enumerate(bypassed))
    path.write_text(textwrap.dedent(rules) + '[[rule]]\nname = "rest"\nport = 1\n')
    return str(path)


def syn_seen_by_server(topo, host: str) -> tuple[int, socket.socket]:
    """Connect from the client (TTL 99) to a listener of the server that keeps
    SYNs; the TTL (hop limit) of the SYN the server got, and the client socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = topo.socket(topo.srv, family)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, 1)
        listener.bind((host, PROBE_PORT))
        listener.listen(8)
        listener.settimeout(10)
        client = topo.socket(topo.cli, family)
        client.settimeout(10)
        if family == socket.AF_INET6:
            client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, CLIENT_TTL)
        else:
            client.setsockopt(socket.SOL_IP, socket.IP_TTL, CLIENT_TTL)
        client.connect((host, PROBE_PORT))
        accepted, _ = listener.accept()
        with accepted:
            syn = accepted.getsockopt(socket.IPPROTO_TCP, TCP_SAVED_SYN, 512)
    return (syn[7] if family == socket.AF_INET6 else syn[8]), client


def listed(daemon, host: str) -> bool:
    """Whether show conns has a connection to host (IPv4 ones mapped: a daemon on [::])."""
    shown = daemon.ask("show conns")
    return f"[{host}]:{PROBE_PORT}" in shown or f"[::ffff:{host}]:{PROBE_PORT}" in shown


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_bypassed_destinations_never_reach_the_daemon(topo, peers, start_daemon, tmp_path,
                                                       backend):
    daemon = start_daemon(listen=f"[::]:[{topo.port}]", control=True, log_file=True)
    policy = write(tmp_path / "policy.toml", f"{topo.SERVER4}/32", "fd91:2::/64")
    tproxy_sh(topo, "--backend", backend, "--policy", policy, "up")
    for host in (topo.SERVER4, topo.SERVER6):
        ttl, client = syn_seen_by_server(topo, host)
        with client:
            assert ttl == CLIENT_TTL - 1, "the server got a SYN that is not the client's"
            assert not listed(daemon, host)
    assert not daemon.lines_by_now(f":{PROBE_PORT}")

    # The set changes in place: the IPv6 server is intercepted again.
    write(tmp_path / "policy.toml", f"{topo.SERVER4}/32")
    tproxy_sh(topo, "--backend", backend, "--policy", policy, "bypass")
    ttl, client = syn_seen_by_server(topo, topo.SERVER6)
    with client:
        assert ttl == 64  # the router's own SYN
        assert listed(daemon, topo.SERVER6)
    ttl, client = syn_seen_by_server(topo, topo.SERVER4)
    with client:
        assert ttl == CLIENT_TTL - 1


def peer_seen_by_client(topo) -> str:
    """A connection the other way, from the server to a listener of the
    client: the address the client saw it come from (the router's, when
    intercepted without -B client)."""
    listener = topo.socket(topo.cli)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((topo.CLIENT4, PROBE_PORT))
        listener.listen(8)
        listener.settimeout(10)
        with topo.connect(topo.srv, topo.CLIENT4, PROBE_PORT):
            accepted, peer = listener.accept()
            accepted.close()
    return peer[0]


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_a_bypassed_destination_s_own_connections_are_intercepted(topo, peers, start_daemon,
                                                                  tmp_path, backend):
    """A destination bypassed is not a client bypassed: the connections it
    opens itself (here the server toward the client) are intercepted."""
    start_daemon(listen=f"[::]:[{topo.port}]", control=True)
    policy = write(tmp_path / "policy.toml", f"{topo.SERVER4}/32")
    tproxy_sh(topo, "--backend", backend, "--policy", policy, "up")
    if backend == "iptables":
        topo.wait_heartbeat("4")  # TPROXY applies once the daemon's heartbeat is seen
    assert peer_seen_by_client(topo) == topo.ROUTER4_C
    write(tmp_path / "policy.toml", f"{topo.SERVER4}/32", key="client")
    tproxy_sh(topo, "--backend", backend, "--policy", policy, "bypass")
    assert peer_seen_by_client(topo) == topo.SERVER4


def test_bypassed_clients_and_everything_else_intercepted(topo, peers, start_daemon,
                                                          tmp_path):
    daemon = start_daemon(listen=f"[::]:[{topo.port}]", control=True, log_file=True)
    policy = write(tmp_path / "policy.toml", f"{topo.CLIENT6}/128", key="client")
    tproxy_sh(topo, "--policy", policy, "up")
    ttl, client = syn_seen_by_server(topo, topo.SERVER6)
    with client:
        assert ttl == CLIENT_TTL - 1 and not listed(daemon, topo.SERVER6)
    ttl, client = syn_seen_by_server(topo, topo.SERVER4)
    with client:
        assert ttl == 64 and listed(daemon, topo.SERVER4)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_a_policy_that_does_not_parse_changes_nothing(topo, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]]\nbypass = true\ndestination = '10.0.0.1/8'\n")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TCP_INTERCEPT_PYTHON": sys.executable,
           "PYTHONPATH": str(TPROXY_SH.parent.parent)}
    result = topo.run(topo.rtr, str(TPROXY_SH), "--policy", str(bad), "up", env=env,
                      check=False)
    assert result.returncode == 1
    assert "has host bits set" in result.stderr and "cannot read the bypass rules" in result.stderr
    assert "tcp_intercept" not in topo.run(topo.rtr, "nft", "list", "ruleset").stdout
