"""Both legs of every connection, as an operator sees them: the server leg
made slow (netem: the server's packets wait SLOW_MS), the client leg left
fast. `show conn` and `show conns full` must tell which leg is slow, agree
with `ss -ti` on the same sockets, and give the throughput of a transfer
of known rate; at close, the summary line (or JSON object) and the
metrics' histograms must say the same."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.delayline import FAST_MS, SLOW4, SLOW_MS
from lab.peers import ECHO, REFUSED, RESET, exchange, paced_echo, payload, sha256
from lab.ss import ss
from lab.topology import inside, wait_for

METRICS = "[127.0.0.1]:[9107]"


@pytest.fixture(scope="module")
def daemon(topo, peers, slow_server_leg, start_module_daemon):
    return start_module_daemon("-w", "2", "--leg-stats", "--log-format", "summary",
                               "--metrics", METRICS, control=True, log_file=True)


def fields(lines: list[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def leg(text: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in text.split())


def test_show_conn_tells_the_slow_leg_and_agrees_with_ss(topo, daemon):
    with topo.connect(topo.cli, SLOW4, ECHO) as sock:
        data = payload(1 << 20, seed=1)
        assert exchange_keep_open(sock, data) == sha256(data)
        client = "[{}]:{}".format(*sock.getsockname())
        shown = fields(daemon.ask(f"show conn {client}").splitlines())
        sockets = {(s.local, s.peer): s.info for s in ss(topo)}
    assert shown["Client"] == client and shown["Destination"] == f"[{SLOW4}]:{ECHO}"
    assert shown["State"] == "relaying" and shown["Rule"] == "default"
    assert int(shown["Bytes_c2s"]) == int(shown["Bytes_s2c"]) == len(data)
    client_leg, server_leg = leg(shown["Client_leg"]), leg(shown["Server_leg"])
    assert float(server_leg["rtt_ms"]) >= SLOW_MS > FAST_MS > float(client_leg["rtt_ms"])
    assert float(server_leg["min_rtt_ms"]) >= SLOW_MS > FAST_MS > float(client_leg["min_rtt_ms"])
    # The same sockets as ss prints them (both idle: nothing changes in between).
    source = shown["Source"].replace("[", "").replace("]", "")
    theirs = {"client": sockets[(f"{SLOW4}:{ECHO}", client.replace("[", "")
                                 .replace("]", ""))],
              "server": sockets[(source, f"{SLOW4}:{ECHO}")]}
    for name, ours in (("client", client_leg), ("server", server_leg)):
        info = theirs[name]
        rtt, rttvar = re.search(r"\brtt:([\d.]+)/([\d.]+)", info).groups()
        assert float(ours["rtt_ms"]) == pytest.approx(float(rtt), abs=0.0011), (name, info)
        assert float(ours["rttvar_ms"]) == pytest.approx(float(rttvar), abs=0.0011), info
        assert float(ours["min_rtt_ms"]) == pytest.approx(
            float(re.search(r"\bminrtt:([\d.]+)", info).group(1)), abs=0.0011), info
        for key, ss_key in (("cwnd", "cwnd"), ("bytes_acked", "bytes_acked"),
                            ("bytes_received", "bytes_received"), ("mss", "mss")):
            found = re.search(rf"\b{ss_key}:(\d+)", info)
            assert int(ours[key]) == (int(found.group(1)) if found else 0), (name, key, info)
        found = re.search(r"\bretrans:\d+/(\d+)", info)
        assert int(ours["retrans"]) == (int(found.group(1)) if found else 0), info
        assert ours["cc"] in info.split(), info


def exchange_keep_open(sock, data: bytes) -> str:
    """Send data and read its echo, leaving the connection open."""
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    got = bytearray()
    while len(got) < len(data):
        got += sock.recv(65536)
    sender.join()
    return sha256(bytes(got))


def test_show_conn_measures_a_transfer_of_known_rate(topo, daemon):
    """200 KB/s for 3 s each way (the echo returns it): show conn's two
    readings, 1 s apart, see about that."""
    rate = 200_000
    with topo.connect(topo.cli, SLOW4, ECHO) as sock, paced_echo(sock, rate):
        time.sleep(0.5)
        shown = fields(daemon.ask("show conn [{}]:{}".format(*sock.getsockname())).splitlines())
    assert 0.99 <= float(shown["Measured_over_s"]) < 1.2
    for way in ("c2s", "s2c"):
        assert 0.6 * rate < float(shown[f"Throughput_{way}_Bps"]) < 1.5 * rate, shown


def test_show_conns_full_gives_both_legs_and_an_id_for_show_conn(topo, daemon):
    with topo.connect(topo.cli, SLOW4, ECHO) as sock:
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
        header, *rows = daemon.ask("show conns full").splitlines()
        plain_header = daemon.ask("show conns").splitlines()[0]
        columns = header.split()[1:]
        [row] = [dict(zip(columns, r.split(), strict=True)) for r in rows
                 if r.split()[1] == "[{}]:{}".format(*sock.getsockname())]
        shown = fields(daemon.ask(f"show conn {row['id']}").splitlines())
    assert header.startswith(plain_header + " id c_cc c_rtt_ms")
    assert float(row["s_rtt_ms"]) >= SLOW_MS > FAST_MS > float(row["c_rtt_ms"])
    assert row["c_subflows"] == row["s_subflows"] == "0"
    assert int(row["worker"]) in daemon.workers() and row["id"].startswith(row["worker"] + ".")
    assert shown["Client"] == row["client"] and shown["Id"] == row["id"]
    assert daemon.ask("show conn [10.99.99.99]:1").startswith("ERROR: no connection")
    assert daemon.ask("show conn").startswith("ERROR: show conn ID|ADDR")


def summaries(daemon, client: str) -> list[dict[str, str]]:
    found = daemon.lines_by_now(f"{client}-->")
    return [leg(line.split(": summary ", 1)[1]) for line in found if ": summary " in line]


def test_one_summary_line_per_connection_at_close(topo, peers, daemon):
    data = payload(300_000, seed=3)
    with topo.connect(topo.cli, SLOW4, ECHO) as sock:
        port = sock.getsockname()[1]
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    with pytest.raises(ConnectionResetError), topo.connect(topo.cli, SLOW4,
                                                             REFUSED) as sock:
        refused_port = sock.getsockname()[1]
        sock.recv(1)
    with topo.connect(topo.cli, SLOW4, RESET) as sock:
        reset_port = sock.getsockname()[1]
        sock.sendall(b"r" * 1000)
        with pytest.raises(ConnectionResetError):
            while sock.recv(4096):
                pass
    wait_for(lambda: all(summaries(daemon, f"[{topo.CLIENT4}]:{p}")
                         for p in (port, refused_port, reset_port)), 10, "three summaries")
    [clean] = summaries(daemon, f"[{topo.CLIENT4}]:{port}")
    assert (int(clean["bytes_c2s"]), int(clean["bytes_s2c"])) == (len(data), len(data))
    assert clean["end"] == "CFD" and clean["source"].startswith(f"[{topo.ROUTER4_S}]:")
    assert int(clean["server_rtt_us"]) >= SLOW_MS * 1000 > FAST_MS * 1000 > int(
        clean["client_rtt_us"])
    assert int(clean["server_min_rtt_us"]) >= SLOW_MS * 1000 > FAST_MS * 1000 > int(
        clean["client_min_rtt_us"])
    assert int(clean["connect_us"]) >= SLOW_MS * 1000
    assert float(clean["duration_s"]) >= 2 * SLOW_MS / 1000
    [refused] = summaries(daemon, f"[{topo.CLIENT4}]:{refused_port}")
    assert (refused["end"], refused["connect_us"], refused["server_rtt_us"]) == ("SRC", "-", "-")
    [reset] = summaries(daemon, f"[{topo.CLIENT4}]:{reset_port}")
    assert reset["end"] == "SRD"
    assert not daemon.lines_by_now("Connection intercepted")  # not the six lines


def test_histograms_and_retransmits_in_the_metrics(topo, daemon):
    for n in range(3):
        with topo.connect(topo.cli, SLOW4, ECHO) as sock:
            data = payload(10_000, seed=n)
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
    wait_for(lambda: daemon.info()["Connections_open"] == "0", 10, "every connection closed")
    with inside(topo.rtr):
        text = urllib.request.urlopen("http://127.0.0.1:9107/metrics", timeout=10).read()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    closed = daemon.info()
    n = int(closed["Connections_accepted"])
    connected = n - int(closed["Connect_failed_refused"])
    assert found[("tcp_intercept_connection_duration_seconds_count", ())] == n
    assert found[("tcp_intercept_connect_seconds_count", ())] == connected
    assert found[("tcp_intercept_connect_seconds_bucket", (("le", "0.02"),))] == 0
    server = ("leg", "server")
    assert found[("tcp_intercept_leg_rtt_seconds_count", (server,))] == connected
    assert found[("tcp_intercept_leg_rtt_seconds_bucket", (("le", "0.02"), server))] == 0
    assert found[("tcp_intercept_leg_rtt_seconds_bucket", (("le", "0.1"), server))] == connected
    client = ("leg", "client")
    assert found[("tcp_intercept_leg_rtt_seconds_bucket", (("le", "0.02"), client))] == n
    assert ("tcp_intercept_retransmits_total", (server,)) in found
