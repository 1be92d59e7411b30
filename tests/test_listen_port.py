"""-B client when the client's own source port is our listening port.

Our outgoing socket must bind the client's address and port; the listener
holds that port on the wildcard address. The original failed such
connections; here both sockets share the port (SO_REUSEPORT), while a second
daemon still cannot take it.
"""

from __future__ import annotations

import socket

from lab.peers import PORTS, exchange, payload, sha256


def test_client_whose_source_port_is_the_listening_port(topo, peers, start_daemon):
    daemon = start_daemon("-B", "client")
    sock = topo.socket(topo.cli)
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((topo.CLIENT4, daemon.port))
    sock.connect((topo.SERVER4, PORTS["digest"]))
    data = payload(200_000, seed=5000)
    with sock:
        received, _, end = exchange(sock, data)
    assert end == "eof" and received == 65  # the digest line
    record = peers.wait_records(peer=(topo.CLIENT4, daemon.port))[0]
    assert record.sha256 == sha256(data)


def test_a_second_daemon_on_the_same_port_still_fails(topo, start_daemon, tmp_path):
    first = start_daemon("-B", "client")
    second = topo.run(topo.rtr, *first.command, check=False, timeout=20)
    assert second.returncode == 71
    assert "Address already in use" in second.stderr
    assert first.alive()
