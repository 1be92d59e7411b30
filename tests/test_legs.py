"""Both legs of every connection, as an operator sees them: the server leg
made slow (lab/delayline.py: packets to SLOW4 wait SLOW_MS), the client leg
left fast. `show conn` and `show conns full` must tell which leg is slow, agree
with `ss -ti` on the same sockets (every field ss prints: exactly on legs
that cannot move between the readings, idle or stuck; the rates within a
factor on a leg that moves), and give the throughput of a transfer of
known rate; at close, the summary line (or JSON object) and the metrics'
histograms must say the same."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.delayline import FAST_MS, SLOW4, SLOW_MS
from lab.peers import DIGEST, ECHO, REFUSED, RESET, abort, exchange, paced_echo, payload, sha256
from lab.ss import ss
from lab.topology import inside, wait_for

METRICS = "[127.0.0.1]:[9107]"


@pytest.fixture(scope="module")
def daemon(topo, peers, slow_server_leg, start_module_daemon, tmp_path_factory):
    # Connections to the digest port get cubic on the server leg: it sets an
    # ssthresh at the first loss (bbr, the default here, never does).
    policy = tmp_path_factory.mktemp("policy") / "policy.toml"
    policy.write_text(f'[[rule]]\nname = "digest-cubic"\nport = {DIGEST}\n'
                      '[rule.server_leg]\ncongestion = "cubic"\n')
    return start_module_daemon("-w", "2", "--leg-stats", "--log-format", "summary",
                               "--metrics", METRICS, "--policy", str(policy), control=True,
                               log_file=True)


def fields(lines: list[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def leg(text: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in text.split())


# What ss -ti prints of a socket, under the names show conn gives them.
SS_TIMES = {"rtt_ms": r"\brtt:([\d.]+)/", "rttvar_ms": r"\brtt:[\d.]+/([\d.]+)",
            "min_rtt_ms": r"\bminrtt:([\d.]+)"}
SS_COUNTS = {"cwnd": r"\bcwnd:(\d+)", "ssthresh": r"\bssthresh:(\d+)", "mss": r"\bmss:(\d+)",
             "retrans": r"\bretrans:\d+/(\d+)", "lost": r"\blost:(\d+)",
             "bytes_acked": r"\bbytes_acked:(\d+)", "bytes_received": r"\bbytes_received:(\d+)",
             "bytes_retrans": r"\bbytes_retrans:(\d+)", "unacked": r"\bunacked:(\d+)",
             "notsent": r"\bnotsent:(\d+)"}
# ss -n prints rates in bits a second, whole: ours (bytes) times 8 exactly.
SS_RATES = {"delivery_rate_Bps": r"\bdelivery_rate (\d+)bps", "pacing_rate_Bps":
            r"\bpacing_rate (\d+)bps"}
# show conns full's columns of a leg (c_ or s_ before them), by show conn's names.
FULL_COLUMNS = {"rtt_ms": "rtt_ms", "rttvar_ms": "rttvar_ms", "min_rtt_ms": "min_rtt_ms",
                "cwnd": "cwnd", "retrans": "retrans", "lost": "lost",
                "delivery_rate_Bps": "delivery_Bps", "unacked": "unacked", "notsent": "notsent",
                "cc": "cc"}


def as_ss(info: str) -> dict[str, float]:
    """ss's numbers of one socket; a count ss leaves out is 0 (it prints
    none that is 0, nor an ssthresh not yet set)."""
    found: dict[str, float] = {}
    for key, pattern in SS_TIMES.items():
        found[key] = float(re.search(pattern, info).group(1))
    for key, pattern in SS_COUNTS.items():
        match = re.search(pattern, info)
        found[key] = int(match.group(1)) if match else 0
    for key, pattern in SS_RATES.items():
        match = re.search(pattern, info)
        found[key] = int(match.group(1)) / 8 if match else 0
    return found


def number(text: str) -> float:
    return 0 if text == "-" else float(text)


def disagreements(ours: dict[str, str], info: str, rates: float = 1.0,
                  after: str | None = None) -> list[str]:
    """Where a leg as we show it (show conn's words, or show conns full's
    columns renamed) differs from ss's reading info: times to ss's three
    decimals, counts exactly, and the rates exactly or, with rates > 1 on a
    leg that moves, within that factor of ss's readings info and after
    (taken before and after ours)."""
    theirs, later = as_ss(info), as_ss(after or info)
    wrong = [] if ours["cc"] in info.split() else [f"cc={ours['cc']}"]
    for key in (*SS_TIMES, *SS_COUNTS, *SS_RATES):
        if key not in ours:
            continue
        value = number(ours[key])
        if key in SS_TIMES:
            right = value == pytest.approx(theirs[key], abs=0.0011)
        elif key in SS_RATES and rates > 1:
            low, high = sorted((theirs[key], later[key]))
            right = low / rates <= value <= high * rates
        else:
            right = value == theirs[key]
        if not right:
            wrong.append(f"{key}: ours {ours[key]}, ss {theirs[key]}"
                         + (f"..{later[key]}" if after else ""))
    return wrong


def full_row(daemon, client: str) -> dict[str, str]:
    """show conns full's row of the connection from client ({} if none)."""
    header, *rows = daemon.ask("show conns full").splitlines()
    found = [dict(zip(header.split()[1:], r.split(), strict=True)) for r in rows
             if r.split()[1] == client]
    assert len(found) <= 1, found
    return found[0] if found else {}


def full_leg(row: dict[str, str], side: str) -> dict[str, str]:
    """One leg's columns of a show conns full row (side "c" or "s")."""
    return {key: row[f"{side}_{column}"] for key, column in FULL_COLUMNS.items()}


def leg_sockets(topo, row: dict[str, str]) -> tuple[str, str]:
    """ss's info of the router's two sockets of the connection in a show
    conns full row: (client leg, server leg)."""
    sockets = {(s.local, s.peer): s.info for s in ss(topo)}
    client, source, destination = (row[k].replace("[", "").replace("]", "")
                                   for k in ("client", "source", "destination"))
    return sockets[(destination, client)], sockets[(source, destination)]


def test_show_conn_tells_the_slow_leg_and_agrees_with_ss(topo, daemon):
    with topo.connect(topo.cli, SLOW4, ECHO) as sock:
        data = payload(1 << 20, seed=1)
        assert exchange_keep_open(sock, data) == sha256(data)
        client = "[{}]:{}".format(*sock.getsockname())
        shown = fields(daemon.ask(f"show conn {client}").splitlines())
        row = full_row(daemon, client)
        theirs = leg_sockets(topo, row)
    assert shown["Client"] == client and shown["Destination"] == f"[{SLOW4}]:{ECHO}"
    assert shown["State"] == "relaying" and shown["Rule"] == "default"
    assert int(shown["Bytes_c2s"]) == int(shown["Bytes_s2c"]) == len(data)
    client_leg, server_leg = leg(shown["Client_leg"]), leg(shown["Server_leg"])
    assert float(server_leg["rtt_ms"]) >= SLOW_MS > FAST_MS > float(client_leg["rtt_ms"])
    assert float(server_leg["min_rtt_ms"]) >= SLOW_MS > FAST_MS > float(client_leg["min_rtt_ms"])
    # The same sockets as ss prints them, every field exactly: both legs are
    # idle (show conn's reading is its second, 1 s after the echo was read),
    # nothing changes in between.
    for side, ours, info in (("c", client_leg, theirs[0]), ("s", server_leg, theirs[1])):
        assert not disagreements(ours, info), (side, disagreements(ours, info), info)
        assert not disagreements(full_leg(row, side), info), (side, row, info)
        assert int(ours["pacing_rate_Bps"]) > 0 and int(ours["delivery_rate_Bps"]) > 0, ours


def test_a_stuck_leg_agrees_with_ss_exactly(topo, peers, daemon):
    """The server's firewall drops the server leg's packets, then the client
    sends: the leg holds segments unacknowledged (and, after the first RTO,
    lost) and bytes not yet sent, retransmits by RTO, and cubic (the
    policy's rule for the digest port) sets an ssthresh. The RTOs back off
    to seconds apart and between two nothing moves: ss read before and
    after show conns full and show conn gives the same, and theirs must be
    exactly that."""
    with topo.connect(topo.cli, SLOW4, DIGEST) as sock:
        client = "[{}]:{}".format(*sock.getsockname())
        sock.sendall(b"x")
        row = wait_for(lambda: (r := full_row(daemon, client)).get("bytes_c2s") == "1"
                       and r["s_unacked"] == "0" and r, 10, "the first byte acknowledged")
        port = row["source"].rsplit(":", 1)[1].strip("[]")
        topo.run(topo.srv, "nft", "add table inet stuck; add chain inet stuck in { type "
                 "filter hook input priority 0; }; add rule inet stuck in ip saddr "
                 f"{topo.ROUTER4_S} tcp sport {port} drop")
        try:
            sock.setblocking(False)
            data, sent = payload(300_000, seed=5), 0
            with contextlib.suppress(BlockingIOError):
                while sent < len(data):
                    sent += sock.send(data[sent:])
            server_socket = (f"{topo.ROUTER4_S}:{port}", f"{SLOW4}:{DIGEST}")

            def server_info() -> str:
                return {(s.local, s.peer): s.info for s in ss(topo)}[server_socket]
            # Three retransmissions (a loss probe, RTOs): the timer has backed
            # off to about 2 s, then 4 s.
            wait_for(lambda: as_ss(server_info())["retrans"] >= 3, 15, "three retransmissions")
            for _ in range(6):
                before = server_info()
                row = full_row(daemon, client)
                shown = fields(daemon.ask(f"show conn {client}").splitlines())
                if as_ss(server_info()) == as_ss(before):
                    break
            else:
                pytest.fail(f"the stuck leg never held still for 1 s: {before}")
        finally:
            topo.run(topo.srv, "nft", "delete table inet stuck")
            abort(sock)
    assert shown["Rule"] == "digest-cubic"
    ours = leg(shown["Server_leg"])
    assert ours["cc"] == "cubic"
    for key in ("unacked", "lost", "notsent", "retrans", "bytes_retrans", "ssthresh"):
        assert int(ours[key]) > 0, (key, ours)
    assert not disagreements(ours, before), (disagreements(ours, before), before)
    assert not disagreements(full_leg(row, "s"), before), (row, before)


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
        client = "[{}]:{}".format(*sock.getsockname())
        row = full_row(daemon, client)
        before = leg_sockets(topo, row)
        shown = fields(daemon.ask(f"show conn {client}").splitlines())
        after = leg_sockets(topo, row)
    assert 0.99 <= float(shown["Measured_over_s"]) < 1.2
    for way in ("c2s", "s2c"):
        assert 0.6 * rate < float(shown[f"Throughput_{way}_Bps"]) < 1.5 * rate, shown
    # Both legs move: their rates as ss read them around show conn's second
    # reading, within a factor 2 (bits for bytes would be 8); the rest moves
    # too fast to compare.
    for name, ss_before, ss_after in zip(("Client_leg", "Server_leg"), before, after,
                                         strict=True):
        ours = {key: value for key, value in leg(shown[name]).items()
                if key in SS_RATES or key == "cc"}
        assert not disagreements(ours, ss_before, rates=2, after=ss_after), (
            name, disagreements(ours, ss_before, rates=2, after=ss_after), ss_before, ss_after)


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
