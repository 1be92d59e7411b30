"""A client reuses its port toward the same server while a socket with that
4-tuple still closes in the router (-B client): the daemon takes the 4-tuple
back from an orphan, refuses when a live socket holds it, and counts and
logs each case once.

The earlier connection's socket is made by the test itself in the router:
transparent, bound to the client's address and port, connected to a server
that never closes its end. Closed by us while the server's acknowledgements
are dropped, it waits in FIN_WAIT1 with no process holding it (what the
daemon's own socket does when the server's answers go to another router of
an ECMP group); held open, it is a live socket. (An orphan whose FIN was
acknowledged becomes a FIN_WAIT2 time-wait socket, which the kernel reuses
by itself.)
"""

from __future__ import annotations

import socket

import pytest

from tcp_intercept.sockopts import set_transparent

from lab.netns import wait_for
from lab.peers import payload, sha256

TCP_CLOSE = 7
PORT = 7100  # a server of this test's own that never closes its end
# In the router: the server's packets without SYN to the client's port are
# lost (the SYN-ACK of a new connection passes).
LOSE_ACKS = """table inet port_reuse {{
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        {ip} saddr {server} tcp sport {port} tcp dport {client_port} tcp flags & syn == 0 drop
    }}
}}
"""
# (daemon's listening address, the clients' family): a v4 client of a
# dual-stack listener has a v4-mapped IPv6 socket toward the server.
CASES = [("[0.0.0.0]:[5000]", "4"), ("[::]:[5000]", "4"), ("[::]:[5000]", "6")]
IDS = ["ipv4", "ipv4-mapped", "ipv6"]


def addresses(topo, family: str) -> tuple[str, str]:
    return (topo.CLIENT6, topo.SERVER6) if family == "6" else (topo.CLIENT4, topo.SERVER4)


@pytest.fixture
def hold_open(topo):
    """A listener in the server namespace; what it accepts is kept open."""
    listener = topo.socket(topo.srv, socket.AF_INET6)  # both families
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", PORT))
    listener.listen(16)
    listener.settimeout(10)
    accepted = []
    yield listener, accepted
    for sock in accepted:
        sock.close()
    listener.close()


def earlier_socket(topo, family: str, client_port: int) -> socket.socket:
    """In the router: the client's 4-tuple toward PORT, established."""
    client, server = addresses(topo, family)
    sock = topo.socket(topo.rtr, socket.AF_INET6 if family == "6" else socket.AF_INET)
    set_transparent(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((client, client_port))
    sock.settimeout(10)
    sock.connect((server, PORT))
    return sock


def client_from(topo, family: str, client_port: int) -> socket.socket:
    sock = topo.socket(topo.cli, socket.AF_INET6 if family == "6" else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addresses(topo, family)[0], client_port))
    sock.settimeout(10)
    return sock


def router_states(topo, family: str, client_port: int) -> str:
    client = addresses(topo, family)[0]
    client = f"[{client}]" if family == "6" else client
    return topo.run(topo.rtr, "ss", "-tanH", f"src {client}:{client_port}").stdout


@pytest.mark.parametrize(("listen", "family"), CASES, ids=IDS)
def test_orphan_is_reclaimed(topo, start_daemon, hold_open, listen, family):
    listener, accepted = hold_open
    daemon = start_daemon("-B", "client", listen=listen, control=True, log_file=True)
    client_port = 41001 + CASES.index((listen, family))
    client_addr, server_addr = addresses(topo, family)
    earlier = earlier_socket(topo, family, client_port)
    accepted.append(listener.accept()[0])
    topo.run(topo.rtr, "nft", "-f", "-", input=LOSE_ACKS.format(
        ip="ip6" if family == "6" else "ip", server=server_addr, port=PORT,
        client_port=client_port))
    try:
        earlier.close()  # FIN, never acknowledged
        wait_for(lambda: "FIN-WAIT-1" in router_states(topo, family, client_port), 5,
                 "the orphan")
        client = client_from(topo, family, client_port)
        client.connect((server_addr, PORT))
        daemon.wait_log("port reuse")
    finally:
        topo.run(topo.rtr, "nft", "delete", "table", "inet", "port_reuse")
    data = payload(100_000, seed=1)
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    server_end = listener.accept()[0]
    accepted.append(server_end)
    got = b""
    while chunk := server_end.recv(65536):
        got += chunk
    assert sha256(got) == sha256(data)
    peer = server_end.getpeername()
    assert (peer[0].removeprefix("::ffff:"), peer[1]) == (client_addr, client_port)
    client.close()

    info = daemon.info()
    assert (info["Port_reuse_reclaimed"], info["Port_reuse_refused"]) == ("1", "0")
    lines = daemon.wait_log("port reuse")
    assert len(lines) == 1 and "FIN_WAIT1" in lines[0], lines
    # The earlier connection's server end heard of its end: a reset took
    # it from CLOSE_WAIT to CLOSE.
    assert accepted[0].getsockopt(socket.SOL_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE


def test_live_socket_is_not_taken(topo, start_daemon, hold_open):
    listener, accepted = hold_open
    daemon = start_daemon("-B", "client", control=True, log_file=True)
    client_port = 41010
    earlier = earlier_socket(topo, "4", client_port)
    try:
        accepted.append(listener.accept()[0])
        client = client_from(topo, "4", client_port)
        # The daemon accepts, then refuses: the reset may come before
        # connect() returns.
        with pytest.raises(ConnectionResetError):
            client.connect((topo.SERVER4, PORT))
            client.recv(1)
        client.close()
        # The live socket still works.
        earlier.sendall(b"still here")
        assert accepted[0].recv(64) == b"still here"
    finally:
        earlier.close()
    info = daemon.info()
    assert (info["Port_reuse_reclaimed"], info["Port_reuse_refused"]) == ("0", "1")
    lines = daemon.wait_log("port reuse")
    assert len(lines) == 1 and "refusing" in lines[0] and "ESTABLISHED" in lines[0], lines
    assert not daemon.lines_by_now("connect to server failed")
