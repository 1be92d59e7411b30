"""The pure parts of per-leg telemetry: struct tcp_info's layout, an MPTCP
leg from its subflows, the histograms' words, the close summary's line and
show conn's text; and tcp_info read from real loopback connections (an
MPTCP one of two subflows in the topology's client namespace)."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tcp_intercept import histograms, report, summary, tcpinfo



def raw_tcp_info(**fields: int) -> bytes:
    """A struct tcp_info with the named fields set (tuple indices of _TCP_INFO)."""
    values = [0] * 54  # the fields of _TCP_INFO
    for index, value in fields.items():
        values[int(index.removeprefix("f"))] = value
    return tcpinfo._TCP_INFO.pack(*values)


def test_the_layout_is_linux_struct_tcp_info():
    assert tcpinfo._TCP_INFO.size == 232  # up to tcpi_snd_wnd, no padding
    raw = raw_tcp_info(f23=40_392, f24=229, f39=40_054, f26=735, f25=0x7FFFFFFF, f31=3,
                       f14=2, f42=12_772_008, f34=1_048_577, f35=1_048_576, f12=5, f38=7,
                       f10=1448)
    leg = tcpinfo.parse(raw, "bbr")
    assert (leg.rtt_us, leg.rttvar_us, leg.min_rtt_us, leg.cwnd, leg.ssthresh) == (
        40_392, 229, 40_054, 735, 0)
    assert (leg.retrans, leg.lost, leg.delivery_rate, leg.bytes_acked, leg.bytes_received,
            leg.unacked, leg.notsent, leg.mss, leg.congestion) == (
        3, 2, 12_772_008, 1_048_577, 1_048_576, 5, 7, 1448, "bbr")
    # at close, the same three fields straight from the bytes
    assert tcpinfo._AT_CLOSE.unpack(raw[:tcpinfo._AT_CLOSE.size]) == (40_392, 3, 40_054)
    # an older kernel's shorter struct: the missing fields read 0
    assert tcpinfo.parse(raw[:104]).min_rtt_us == 0


def test_an_mptcp_leg_combines_its_subflows():
    first = tcpinfo.parse(raw_tcp_info(f23=30_000, f39=20_000, f31=1, f34=100, f26=10,
                                       f42=1_000, f32=3_000))
    second = tcpinfo.parse(raw_tcp_info(f23=50_000, f39=45_000, f31=4, f34=900, f26=20,
                                        f42=2_000, f32=5_000))
    leg = tcpinfo.combine([first, second], "cubic")
    assert (leg.rtt_us, leg.cwnd) == (50_000, 20)  # the subflow that carried the most
    assert (leg.min_rtt_us, leg.retrans, leg.bytes_acked, leg.subflows) == (20_000, 5, 1000, 2)
    assert (leg.delivery_rate, leg.pacing_rate) == (3_000, 8_000)  # the subflows at once
    assert "subflows=2" in tcpinfo.describe(leg)


def test_a_real_socket_reads_as_ss_would():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                client.sendall(b"x" * 5000)
                accepted.recv(5000, socket.MSG_WAITALL)
                leg = tcpinfo.read(client)
                rtt, retrans, min_rtt = tcpinfo.at_close(client)
    assert leg.bytes_acked == 5001 and leg.subflows == 0 and leg.congestion
    assert leg.mss > 0 and leg.cwnd >= 10 and 0 < leg.min_rtt_us <= leg.rtt_us + leg.rttvar_us
    assert retrans == 0 and 0 < min_rtt
    assert tcpinfo.read(None) is None


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"),
                                          (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def test_an_mptcp_socket_fallen_back_to_tcp_reads_as_tcp(family, host):
    """The server speaks plain TCP: the MPTCP socket's subflow request is
    refused, with EOPNOTSUPP over IPv4 and ENOPROTOOPT over IPv6."""
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.socket(family, socket.SOCK_STREAM, tcpinfo.IPPROTO_MPTCP) as client:
            client.connect(listener.getsockname()[:2])
            accepted, _ = listener.accept()
            with accepted:
                client.sendall(b"x" * 5000)
                accepted.recv(5000, socket.MSG_WAITALL)
                assert tcpinfo.mptcp_subflows(client.fileno()) == []
                leg = tcpinfo.read(client)
    assert leg is not None and leg.bytes_acked == 5001 and leg.subflows == 0 and leg.congestion


def test_an_mptcp_leg_at_close_counts_every_subflow(topo):
    """The close summary's reading of an MPTCP leg (at_close) is the leg that
    show conn gives, made of all its subflows, not TCP_INFO's first one. A
    loopback MPTCP connection in the client namespace, with a second subflow
    from 127.0.0.2."""
    topo.run(topo.cli, "ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
    topo.run(topo.cli, "ip", "mptcp", "endpoint", "add", "127.0.0.2", "dev", "lo", "subflow")
    listener = topo.socket(topo.cli, socket.AF_INET, proto=tcpinfo.IPPROTO_MPTCP)
    client = topo.socket(topo.cli, socket.AF_INET, proto=tcpinfo.IPPROTO_MPTCP)
    with listener, client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            deadline = time.monotonic() + 10  # the second subflow joins soon after
            while time.monotonic() < deadline:
                client.sendall(b"x" * 20_000)
                accepted.recv(20_000, socket.MSG_WAITALL)
                if len(tcpinfo.mptcp_subflows(client.fileno())) == 2:
                    break
                time.sleep(0.01)
            for _ in range(100):  # a reading between two equal ones: no ACK moved it
                before = tcpinfo.mptcp_subflows(client.fileno())
                closing = tcpinfo.at_close(client)
                if tcpinfo.mptcp_subflows(client.fileno()) == before:
                    break
                time.sleep(0.01)
            subflows = [tcpinfo.parse(raw) for raw in before]
            assert len(subflows) == 2, subflows
            leg = tcpinfo.combine(subflows, "")
            assert closing == (leg.rtt_us, leg.retrans, leg.min_rtt_us)
            assert leg.min_rtt_us == min(s.min_rtt_us for s in subflows if s.min_rtt_us)


def test_histogram_buckets_count_up_to_their_bound():
    words = [0] * histograms.WORDS
    for seconds in (0.0004, 0.0005, 0.6, 0.65, 7.0):
        histograms.observe(words, histograms.RTT_SERVER, seconds)
    buckets, total = histograms.read(words, histograms.RTT_SERVER)
    counts = dict(buckets)
    assert (counts["0.0005"], counts["0.6"], counts["0.7"], counts["5"], counts["+Inf"]) == (
        2, 3, 4, 4, 5)
    assert total == pytest.approx(0.0004 + 0.0005 + 0.6 + 0.65 + 7.0, abs=1e-5)
    assert histograms.read(words, histograms.RTT_CLIENT)[0][-1] == ("+Inf", 0)


class Relay:
    def __init__(self, moved: int):
        self.moved = moved


class Closed:
    id = "[10.0.0.2]:40000-->[10.1.0.1]:443"
    peer, dst = ("10.0.0.2", 40000), ("10.1.0.1", 443)
    source = "[10.0.0.9]:51000"
    started, connected = 100.0, 100.0412

    def __init__(self, connected: bool = True):
        self.c2s = Relay(10) if connected else None
        self.s2c = Relay(20) if connected else None

    def end_code(self) -> str:
        return "CFD" if self.c2s else "SRC"


def test_the_summary_line_and_its_json_say_the_same():
    line = summary.summary_line(Closed(), 1.5, (34, 0, 8), (40_392, 3, 40_054))
    assert line == ("[10.0.0.2]:40000-->[10.1.0.1]:443: summary source=[10.0.0.9]:51000 "
                    "duration_s=1.500 connect_us=41200 bytes_c2s=10 bytes_s2c=20 end=CFD "
                    "client_rtt_us=34 client_min_rtt_us=8 client_retrans=0 "
                    "server_rtt_us=40392 server_min_rtt_us=40054 server_retrans=3")
    record = json.loads(summary.json_line(Closed(), 1.5, (34, 0, 8), (40_392, 3, 40_054)))
    assert (record["connect_us"], record["end"], record["server_leg"]) == (
        41200, "CFD", {"rtt_us": 40392, "min_rtt_us": 40054, "retrans": 3})
    refused = json.loads(summary.json_line(Closed(False), 0.04, (19, 0, 19), None))
    assert (refused["connect_us"], refused["server_leg"], refused["end"]) == (None, None, "SRC")
    assert "connect_us=- " in summary.summary_line(Closed(False), 0.04, None, None)


def test_show_conn_gives_throughput_from_two_readings():
    leg = tcpinfo.parse(raw_tcp_info(f23=1000), "cubic")._asdict()
    first = {"id": "77.3", "time": 10.0, "end": None, "rule": None, "client_leg": leg,
             "server_leg": None,
             "snapshot": [1.0, "[c]:1", "[d]:2", "[s]:3", "relaying", 5.0, 0.0, 1000, 0, "-"]}
    second = {**first, "time": 11.0,
              "snapshot": [1.0, "[c]:1", "[d]:2", "[s]:3", "relaying", 6.0, 0.0, 251_000, 0,
                           "-"]}
    lines = dict(line.split(": ", 1) for line in report.conn_lines(first, second))
    assert (lines["Throughput_c2s_Bps"], lines["Throughput_s2c_Bps"]) == ("250000", "0")
    assert lines["Rule"] == "-" and lines["Server_leg"] == "-"
    assert lines["Client_leg"].startswith("cc=cubic rtt_ms=1.000")
    closed = dict(line.split(": ", 1) for line in report.conn_lines(first, None))
    assert closed["State"].startswith("closed") and "Throughput_c2s_Bps" not in closed


def test_the_termination_codes_are_listed():
    codes = {word for line in summary.TERMINATION_CODES.splitlines()
             for word in line.split() if len(word) == 3 and word.isupper()}
    assert {"CFD", "SFD", "CRD", "SRD", "STD", "CTD", "SRC", "STC", "PTC", "PTD", "PKD",
            "PED", "PLC", "PMC"} <= codes
