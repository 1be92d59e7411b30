"""A connection aimed at the daemon's own listening address is dropped, not
relayed to itself; one to the same port elsewhere is relayed.

The original misjudged some of these (its IPv6 "any address" test was
inverted, its IPv4 loopback test compared in the wrong byte order). The
connections come from the router itself, where no TPROXY rule applies, so
they reach the listener directly, as a local client's would.
"""

from __future__ import annotations

import pytest

from lab.peers import PeerServer, exchange, payload, sha256

CASES = [
    ("[0.0.0.0]:[5000]", "127.0.0.1"),
    ("[0.0.0.0]:[5000]", "127.0.0.2"),       # all of 127/8 is local
    ("[0.0.0.0]:[5000]", "10.91.1.1"),
    ("[0.0.0.0]:[5000]", "10.91.2.1"),
    ("[127.0.0.1]:[5000]", "127.0.0.1"),
    ("[::]:[5000]", "::1"),
    ("[::]:[5000]", "fd91:1::1"),
    ("[::]:[5000]", "fd91:2::1"),
    ("[::1]:[5000]", "::1"),
    ("[10.91.2.1]:[5000]", "10.91.2.1"),
]
DROPPED = "Connection directly to us, dropping"


@pytest.mark.parametrize("listen, target", CASES, ids=[f"{a}<-{b}" for a, b in CASES])
def test_connection_to_our_own_address_is_dropped(topo, start_daemon, listen, target):
    daemon = start_daemon(listen=listen)
    with topo.connect(topo.rtr, target, daemon.port) as sock:
        client_port = sock.getsockname()[1]
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass  # dropped with a reset: as good as a FIN
    [line] = daemon.wait_log(DROPPED)
    assert f":{client_port}-->" in line
    assert not daemon.lines("Connection intercepted")


@pytest.mark.parametrize("family", ["4", "6"])
def test_same_port_on_another_host_is_relayed(topo, start_daemon, family):
    """The server listens on the daemon's port too: that is not us."""
    v6 = family == "6"
    daemon = start_daemon(listen="[::]:[5000]" if v6 else "[0.0.0.0]:[5000]")
    server = topo.SERVER6 if v6 else topo.SERVER4
    data = payload(100_000, seed=int(family))
    with PeerServer(topo, {"echo": daemon.port}) as peers:
        with topo.connect(topo.cli, server, daemon.port) as sock:
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
        [record] = peers.wait_records(sha256=sha256(data))
    assert record.local[:2] == (server, daemon.port)
    assert not daemon.lines(DROPPED)
    daemon.wait_log("Connection intercepted")
