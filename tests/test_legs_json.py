"""Per-leg telemetry with daemons of their own (test_legs.py's serves the
summary format): --log-format json, one JSON object per line; a client
refused by a limit; a server that stops answering; the --policy rule in
show conn."""

from __future__ import annotations

import json
import time

import pytest

from lab.delayline import FAST_MS, SLOW4, SLOW_MS
from lab.peers import ECHO, exchange, payload, sha256


def test_json_log_format_has_the_same_fields(topo, peers, slow_server_leg, start_daemon):
    daemon = start_daemon("--log-format", "json", log_file=True)
    data = payload(50_000, seed=9)
    with topo.connect(topo.cli, SLOW4, ECHO) as sock:
        port = sock.getsockname()[1]
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    [line] = daemon.wait_log(f'"client": "[{topo.CLIENT4}]:{port}"')
    record = json.loads(line)
    assert record["destination"] == f"[{SLOW4}]:{ECHO}"
    assert (record["bytes_c2s"], record["bytes_s2c"], record["end"]) == (len(data),
                                                                         len(data), "CFD")
    assert record["server_leg"]["rtt_us"] >= SLOW_MS * 1000 > FAST_MS * 1000 > record[
        "client_leg"]["rtt_us"]
    assert set(record) == {"time", "client", "destination", "source", "duration_s",
                           "connect_us", "bytes_c2s", "bytes_s2c", "end", "client_leg",
                           "server_leg"}
    assert abs(record["time"] - time.time()) < 30


@pytest.mark.parametrize("limit, end", [(("--max-per-client", "1"), "PLC"),
                                        (("--max-connections", "1", "--when-full", "reset"),
                                         "PMC")], ids=["max-per-client", "when-full-reset"])
def test_a_client_refused_by_a_limit_has_its_line(topo, peers, start_daemon, limit, end):
    daemon = start_daemon("--log-format", "json", *limit, log_file=True)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        refused = topo.socket(topo.cli)
        refused.settimeout(10)
        # The reset can come before connect() returns, or after.
        with refused, pytest.raises((ConnectionResetError, BrokenPipeError)):
            try:
                refused.connect((topo.SERVER4, ECHO))
            finally:
                port = refused.getsockname()[1]
            refused.sendall(b"y")
            refused.recv(1)
    [line] = daemon.wait_log(f'"client": "[{topo.CLIENT4}]:{port}"')
    record = json.loads(line)
    assert (record["end"], record["source"], record["bytes_c2s"]) == (end, None, 0)


def test_a_server_that_stops_answering_ends_in_a_timeout(topo, peers, start_daemon):
    """--user-timeout gives up on the server leg: its socket fails with
    ETIMEDOUT, a timeout of the server's (STD), not a reset."""
    daemon = start_daemon("--log-format", "json", "--user-timeout", "1", log_file=True)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        topo.run(topo.srv, "nft", "add table inet silence; add chain inet silence in { type "
                 f"filter hook input priority 0; }}; add rule inet silence in tcp dport {ECHO} "
                 "drop")
        try:
            sock.sendall(b"y")  # unacknowledged from now on: 1 s later the daemon gives up
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        finally:
            topo.run(topo.srv, "nft", "delete table inet silence")
    [line] = daemon.wait_log(f'"client": "[{topo.CLIENT4}]:{port}"')
    assert json.loads(line)["end"] == "STD"


def test_show_conn_names_the_policy_rule_and_its_congestion_control(topo, peers, tmp_path,
                                                                    start_daemon):
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[rule]]\nname = "echo-cubic"\nport = {ECHO}\n'
                      '[rule.server_leg]\ncongestion = "cubic"\n')
    daemon = start_daemon("--policy", str(policy), "--client-congestion", "reno",
                          control=True)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        shown = dict(line.split(": ", 1) for line in daemon.ask(
            "show conn [{}]:{}".format(*sock.getsockname())).splitlines())
    assert shown["Rule"] == "echo-cubic"
    assert shown["Server_leg"].startswith("cc=cubic ") and shown["Client_leg"].startswith(
        "cc=reno ")
