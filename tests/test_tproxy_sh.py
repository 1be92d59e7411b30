"""contrib/tproxy.sh in a router namespace, with the real daemon behind it.

The module builds a topology without interception rules, so each test
starts from a bare router; every test ends with `tproxy.sh down` (both
backends) and the router bare again. A connection is intercepted when the
daemon logs its id and the echo server sees it come from the router; it is
not when the server sees the client itself and the daemon logs nothing.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shutil

import pytest

from lab.peers import ECHO, exchange, payload, sha256
from lab.topology import TPROXY_SH, Topology

BACKENDS = ["iptables", "nft"]
FAMILIES = ["4", "6"]
EX_USAGE = 64
_seeds = itertools.count(7_000_000)
# conftest's topo: this module's own topology, the router without interception rules.
WORLD = functools.partial(Topology, tproxy=False)


@pytest.fixture(autouse=True)
def bare_router(topo):
    """Every test ends without our rules in the router, so the next starts so."""
    yield
    tproxy_sh(topo, "down")
    assert rules(topo) == NONE


def tproxy_sh(topo: Topology, *args: str, status: int | None = 0):
    """tproxy.sh args in the router; its exit status checked unless status is None."""
    result = topo.run(topo.rtr, str(TPROXY_SH), *args, check=False, timeout=20)
    if status is not None:
        assert result.returncode == status, f"tproxy.sh {' '.join(args)} exited " \
            f"{result.returncode}:\n{result.stdout}{result.stderr}"
    return result


SNAPSHOT = "; echo '%%'; ".join([
    "nft list ruleset", "iptables-save -t mangle", "ip6tables-save -t mangle",
    "ip -4 rule show", "ip -6 rule show", "ip -4 route show table all",
    "ip -6 route show table all"])


def rules(topo: Topology) -> dict[str, int]:
    """How many of each kind of our rules the router has, per family."""
    out = topo.run(topo.rtr, "bash", "-c", f"set -e; {SNAPSHOT}").stdout.split("%%\n")
    ruleset, mangle, rule, route = out[0], out[1:3], out[3:5], out[5:7]
    counts = {}
    for i, (fam, nft_family) in enumerate((("4", "ip"), ("6", "ip6"))):
        counts[f"ip{fam} rule"] = rule[i].count("fwmark")
        counts[f"ip{fam} route"] = len(re.findall(r"^local default dev lo table", route[i], re.M))
        counts[f"ip{fam} jump"] = len(re.findall(r"^-A PREROUTING -j TCP_INTERCEPT$", mangle[i],
                                                 re.M))
        counts[f"ip{fam} chain"] = len(re.findall(r"^-A TCP_INTERCEPT ", mangle[i], re.M))
        counts[f"ip{fam} heartbeat"] = len(re.findall(
            r"^-A (OUTPUT -j TCP_INTERCEPT_ALIVE|TCP_INTERCEPT_ALIVE .*--dport \d+ -m recent)",
            mangle[i], re.M))
        counts[f"ip{fam} nft"] = ruleset.count(f"table {nft_family} tcp_intercept {{")
        table = re.search(rf"^table {nft_family} tcp_intercept {{$.*?^}}$", ruleset,
                          re.M | re.S)  # the whole table: its bypass set comes first
        counts[f"ip{fam} nft tproxy"] = int(bool(table) and "tproxy to :" in table.group(0))
    return counts


NONE = {f"ip{fam} {kind}": 0 for fam in FAMILIES
        for kind in ("rule", "route", "jump", "chain", "heartbeat", "nft", "nft tproxy")}


def installed(backend: str, families=FAMILIES, fail: str = "open") -> dict[str, int]:
    """The counts of one set of our rules with backend, in families."""
    counts = dict(NONE)
    for fam in families:
        counts |= {f"ip{fam} rule": 1, f"ip{fam} route": 1}
        if backend == "iptables" and fail == "closed":
            counts |= {f"ip{fam} jump": 1, f"ip{fam} chain": 4}
        elif backend == "iptables":  # and the heartbeat's gate, jump and rule
            counts |= {f"ip{fam} jump": 1, f"ip{fam} chain": 5, f"ip{fam} heartbeat": 2}
        else:
            counts |= {f"ip{fam} nft": 1, f"ip{fam} nft tproxy": 1}
    return counts


def echo(topo: Topology, peers, family: str) -> tuple[str, tuple]:
    """A connection from the client to the echo server, bytes both ways.

    Returns the daemon's id for it and the peer address the server saw.
    """
    server = topo.SERVER6 if family == "6" else topo.SERVER4
    data = payload(100_000, seed=next(_seeds))
    sock = topo.connect(topo.cli, server, ECHO)
    with sock:
        (cip, cport), (dip, dport) = sock.getsockname()[:2], sock.getpeername()[:2]
        received, digest, end = exchange(sock, data)
    assert (received, digest, end) == (len(data), sha256(data), "eof")
    record = peers.wait_digests({sha256(data)})[0]
    return f"[{cip}]:{cport}-->[{dip}]:{dport}", record.peer


def assert_intercepted(topo, peers, daemon, family: str) -> None:
    topo.wait_heartbeat(family)
    conn_id, peer = echo(topo, peers, family)
    daemon.wait_log(f"{conn_id}: closed")
    assert daemon.lines(f"{conn_id}: Connection intercepted")
    assert peer[0] == (topo.ROUTER6_S if family == "6" else topo.ROUTER4_S)


def assert_not_intercepted(topo, peers, daemon, family: str) -> None:
    conn_id, peer = echo(topo, peers, family)
    # The daemon (without -B client) would have connected from the router's
    # address: the server saw the client's own, so the daemon was not on the way.
    assert peer[0] == (topo.CLIENT6 if family == "6" else topo.CLIENT4)
    assert daemon.lines(conn_id.split("-->")[0]) == [], "the daemon saw it"


def listen(family: str, port: int = 5000) -> str:
    return f"[::]:[{port}]" if family == "6" else f"[0.0.0.0]:[{port}]"


@pytest.mark.parametrize("family", FAMILIES, ids=[f"ipv{f}" for f in FAMILIES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_up_intercepts_and_down_lets_connections_pass(topo, peers, start_daemon,
                                                      backend, family):
    daemon = start_daemon(listen=listen(family))
    tproxy_sh(topo, "--backend", backend, "--family", family, "up")
    assert rules(topo) == installed(backend, [family])
    assert_intercepted(topo, peers, daemon, family)

    tproxy_sh(topo, "--backend", backend, "--family", family, "down")
    assert rules(topo) == NONE
    assert_not_intercepted(topo, peers, daemon, family)


@pytest.mark.parametrize("backend", BACKENDS)
def test_up_twice_is_one_set_and_down_keeps_what_is_not_ours(topo, backend):
    foreign = [("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "ACCEPT"),
               ("ip", "-6", "rule", "add", "fwmark", "0x1/0x1", "lookup", "5")]
    for cmd in foreign:
        topo.run(topo.rtr, *cmd)
    try:
        before = rules(topo)
        tproxy_sh(topo, "--backend", backend, "up")
        tproxy_sh(topo, "--backend", backend, "up")
        expected = installed(backend)
        expected["ip6 rule"] += 1
        assert rules(topo) == expected
        tproxy_sh(topo, "--backend", backend, "down")
        assert rules(topo) == before
        assert "-A PREROUTING -p udp -j ACCEPT" in topo.run(topo.rtr, "iptables-save").stdout
    finally:
        topo.run(topo.rtr, "iptables", "-t", "mangle", "-D", "PREROUTING", "-p", "udp",
                 "-j", "ACCEPT", check=False)
        topo.run(topo.rtr, "ip", "-6", "rule", "del", "fwmark", "0x1/0x1", "lookup", "5",
                 check=False)


# nft's fail-closed rule as nft lists it: a SYN that no socket took is dropped.
SYN_DROP = "tcp flags syn / fin,syn,rst,ack drop"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fail_closed_and_open_replace_each_other(topo, backend):
    """--fail closed: the original's rules (nft's drop, no heartbeat)."""
    tproxy_sh(topo, "--backend", backend, "--fail", "closed", "up")
    assert rules(topo) == installed(backend, fail="closed")
    ruleset = topo.run(topo.rtr, "nft", "list", "ruleset").stdout
    assert (SYN_DROP in ruleset) == (backend == "nft")
    tproxy_sh(topo, "--backend", backend, "up")
    assert rules(topo) == installed(backend)
    assert SYN_DROP not in topo.run(topo.rtr, "nft", "list", "ruleset").stdout
    tproxy_sh(topo, "--backend", backend, "--fail", "closed", "up")
    assert rules(topo) == installed(backend, fail="closed")


def test_up_with_the_other_backend_replaces_the_first(topo):
    tproxy_sh(topo, "--backend", "iptables", "up")
    tproxy_sh(topo, "--backend", "nft", "up")
    assert rules(topo) == installed("nft")
    tproxy_sh(topo, "--backend", "iptables", "up")
    assert rules(topo) == installed("iptables")


@pytest.mark.parametrize("args", [(), ("--backend", "iptables"), ("--backend", "nft"),
                                  ("--family", "6")])
def test_down_with_nothing_installed_exits_0_silently(topo, args):
    result = tproxy_sh(topo, *args, "down")
    assert (result.stdout, result.stderr) == ("", "")


def test_status_exit_codes(topo, tmp_path):
    assert "IPv4: not installed" in tproxy_sh(topo, "status", status=3).stdout
    tproxy_sh(topo, "--family", "4", "up")
    shown = tproxy_sh(topo, "--family", "4", "status", status=0).stdout
    assert "IPv4: installed" in shown and "fwmark 0x1/0x1 lookup 5" in shown
    assert "IPv6: not installed" in tproxy_sh(topo, "status", status=3).stdout
    tproxy_sh(topo, "up")
    tproxy_sh(topo, "status", status=0)
    # Policy routing without firewall rules is not an installation.
    tproxy_sh(topo, "--backend", "nft", "up")
    topo.run(topo.rtr, "nft", "delete", "table", "ip", "tcp_intercept")
    shown = tproxy_sh(topo, "status", status=3).stdout
    assert "IPv4: incomplete" in shown and "IPv6: installed (nft)" in shown
    tproxy_sh(topo, "down")
    tproxy_sh(topo, "status", status=3)
    # An error: no `ip` command to look with.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "id", "grep", "sed", "cat"):
        (tools / tool).symlink_to(shutil.which(tool))
    result = topo.run(topo.rtr, "env", f"PATH={tools}", "bash", str(TPROXY_SH), "status",
                      check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "tproxy.sh: IPv4: cannot list the ip rules" in result.stderr, result.stderr


@pytest.mark.parametrize("family", FAMILIES, ids=[f"ipv{f}" for f in FAMILIES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_port_mark_and_table_are_honoured(topo, peers, start_daemon, backend, family):
    # -B client: the server's answers go to the client's address, and only
    # the socket match, the mark and the table bring them to the daemon.
    daemon = start_daemon("-B", "client", listen=listen(family, 6000))
    tproxy_sh(topo, "--backend", backend, "--family", family, "--port", "6000",
              "--mark", "0x40/0xc0", "--table", "77", "up")
    fam = f"-{family}"
    assert "fwmark 0x40/0xc0 lookup 77" in topo.run(topo.rtr, "ip", fam, "rule").stdout
    assert topo.run(topo.rtr, "ip", fam, "route", "show", "table", "77").stdout.startswith(
        "local default dev lo")
    shown = tproxy_sh(topo, "--family", family, "status").stdout
    assert re.search(r"(on-port|tproxy to :)\s*6000", shown), shown
    topo.wait_heartbeat(family)
    conn_id, peer = echo(topo, peers, family)
    assert daemon.wait_log(f"{conn_id}: server accepted connection, splicing")
    assert peer[0] == (topo.CLIENT6 if family == "6" else topo.CLIENT4)


# Rules of the operator's own that mark some packets before ours (what
# contrib/multi-router's hand-off does): here every packet to and from the
# echo port.
PASS_MARK_RULES = f"""table inet pass_mark_test {{
    chain prerouting {{
        type filter hook prerouting priority -160; policy accept;
        tcp dport {ECHO} meta mark set meta mark or 0x2
        tcp sport {ECHO} meta mark set meta mark or 0x2
    }}
}}
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_pass_mark_leaves_marked_packets_alone(topo, peers, start_daemon, backend):
    daemon = start_daemon()
    tproxy_sh(topo, "--backend", backend, "--family", "4", "--pass-mark", "0x2/0x2", "up")
    assert_intercepted(topo, peers, daemon, "4")
    topo.run(topo.rtr, "nft", "-f", "-", input=PASS_MARK_RULES)
    try:
        conn_id, peer = echo(topo, peers, "4")
        assert peer[0] == topo.CLIENT4  # routed past the daemon
        assert not daemon.lines_by_now(conn_id)
    finally:
        topo.run(topo.rtr, "nft", "delete", "table", "inet", "pass_mark_test")


@pytest.mark.parametrize("args", [
    ("--pass-mark", "0x1/0x1", "up"), ("--pass-mark", "0", "up"),
    ("--bogus", "up"), ("up", "down"), (), ("--port", "0", "up"), ("--port", "65536", "up"),
    ("--port",), ("--mark", "0", "up"), ("--mark", "0x3/0x1", "up"), ("--mark", "x", "up"),
    ("--table", "254", "up"), ("--table", "five", "up"), ("--family", "5", "up"),
    ("--backend", "pf", "up"), ("sideways",), ("--fail", "ajar", "up"),
])
def test_bad_command_line_exits_64_with_one_line(topo, args):
    result = tproxy_sh(topo, *args, status=EX_USAGE)
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert rules(topo) == NONE


def test_help(topo):
    result = tproxy_sh(topo, "--help")
    assert "up|down|status" in result.stdout
    for option in ("--backend", "--family", "--port", "--mark", "--table", "--fail",
                   "--pass-mark"):
        assert option in result.stdout


def test_default_backend_is_iptables_when_iptables_is_legacy(topo, tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("iptables", "ip6tables"):
        for suffix in ("", "-restore"):
            legacy = shutil.which(f"{name}-legacy{suffix}")
            assert legacy, "Debian's iptables package ships the legacy variant too"
            (tools / f"{name}{suffix}").symlink_to(legacy)
    path = f"PATH={tools}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"
    try:
        topo.run(topo.rtr, "env", path, str(TPROXY_SH), "--family", "4", "up")
        legacy = topo.run(topo.rtr, "iptables-legacy-save", "-t", "mangle").stdout
        assert "-j TPROXY --on-port 5000" in legacy
        assert "tcp_intercept" not in topo.run(topo.rtr, "nft", "list", "tables").stdout
        assert "installed (iptables)" in topo.run(topo.rtr, "env", path, str(TPROXY_SH),
                                                  "--family", "4", "status").stdout
    finally:
        topo.run(topo.rtr, "env", path, str(TPROXY_SH), "down", check=False)
    assert "TCP_INTERCEPT" not in topo.run(topo.rtr, "iptables-legacy-save").stdout


def test_default_backend_is_nft_unless_iptables_is_legacy(topo):
    legacy = "legacy" in topo.run(topo.rtr, "iptables", "-V").stdout
    tproxy_sh(topo, "up")
    assert rules(topo) == installed("iptables" if legacy else "nft")


def test_a_socket_of_the_router_itself_is_not_intercepted(topo, start_daemon):
    """Connections to the router's own addresses stay local (addrtype LOCAL)."""
    daemon = start_daemon(listen=listen("4"))
    tproxy_sh(topo, "up")
    with topo.socket(topo.rtr) as server:
        server.bind((topo.ROUTER4_C, 7100))
        server.listen()
        sock = topo.connect(topo.cli, topo.ROUTER4_C, 7100)
        with sock:
            conn, peer = server.accept()
            conn.close()
            # Through the daemon, the router's socket would have accepted the
            # daemon's connection, from the router's own address.
            assert peer == sock.getsockname()
    assert daemon.lines(":7100: Connection intercepted") == []


def test_up_with_a_backend_that_does_not_work_changes_nothing(topo, tmp_path):
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nft").write_text("#!/bin/sh\necho 'nft: broken' >&2\nexit 1\n")
    (tools / "nft").chmod(0o755)
    path = f"PATH={tools}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"
    result = topo.run(topo.rtr, "env", path, str(TPROXY_SH), "--backend", "nft", "up",
                      check=False)
    assert result.returncode == 1
    assert "nft cannot install" in result.stderr
    assert rules(topo) == NONE
