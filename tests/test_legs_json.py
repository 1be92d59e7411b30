"""--log-format json: the close summary as one JSON object per line, with a
daemon of its own (test_legs.py's serves the summary format)."""

from __future__ import annotations

import json
import time

import pytest

from .peers import ECHO, exchange, payload, sha256
from .test_legs import FAST_MS, SLOW4, SLOW_MS
from .test_legs import slow_server_leg as slow_server_leg  # a fixture


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


def test_a_client_refused_by_its_limit_has_its_line(topo, peers, start_daemon):
    daemon = start_daemon("--log-format", "json", "--max-per-client", "1", log_file=True)
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
    assert (record["end"], record["source"], record["bytes_c2s"]) == ("PLC", None, 0)
