#!/usr/bin/env python3
"""Bonding two uplinks with -M, measured: one command, about half a minute.

    .venv/bin/python bench/mptcp.py [--seconds S] [--rate RATE] [--burst B] [--latency L]

Builds the world of lab/mptcp_world.py (router and server joined by two
links, each shaped to RATE with tc tbf both ways, a bucket of B and up to L
of queue; the server listens with
MPTCP and announces its second address) and uploads from a plain TCP client
in the client namespace for S seconds per case:

    direct          no daemon, no interception rules: the router forwards
    daemon          tcp-interceptd, default options
    -M              outgoing MPTCP
    -M -B client    outgoing MPTCP bound to the client's address
    -C cubic/reno   the congestion control of the router->server socket
                    (and of each subflow, with -M)

An IPv6 connection gets three subflows: the router accepts the server's
IPv4 announcement too, so two subflows share the second link. With a
shallow queue (--burst 64kb --latency 1ms) that case shows what -C changes.

Prints the rate at the server (bytes from first to last / time), that rate
over the one-link rate (the daemon row), the subflows the server's MPTCP
socket had, the address the server's accept() gave, and the smoothed RTT
that `ss -ti` showed for the sending sockets while the client sent (the
mean of samples 0.2 s apart, subflows included): a token bucket
queues up to 20 ms, and what the congestion control does with that queue is
the delay every other flow on the link suffers; and how many packets the
token buckets dropped. Needs root; touches nothing
outside its own namespaces; bounded in time (SIGALRM).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.mptcp_world import SINK_PORT, MptcpSink, MptcpWorld, Transfer, upload  # noqa: E402
from lab.topology import Daemon  # noqa: E402

RTT = re.compile(r"\brtt:([\d.]+)/")
DROPPED = re.compile(r"\(dropped (\d+),")
# (label, daemon arguments or None for the direct path, IPv6)
CASES = [
    ("direct (no daemon)", None, False),
    ("daemon", (), False),
    ("daemon -M", ("-M",), False),
    ("daemon -M -B client", ("-M", "-B", "client"), False),
    ("daemon -M -B client, IPv6", ("-M", "-B", "client"), True),
    ("daemon -C cubic", ("-C", "cubic"), False),
    ("daemon -C reno", ("-C", "reno"), False),
    ("daemon -C bbr", ("-C", "bbr"), False),
    ("daemon -M -C cubic", ("-M", "-C", "cubic"), False),
    ("daemon -M -C cubic, IPv6", ("-M", "-C", "cubic"), True),
]


@dataclass
class Row:
    label: str
    transfer: Transfer
    rtt_ms: float | None
    drops: int


def uplink_drops(world: MptcpWorld) -> int:
    """Packets the token buckets of the router's two uplinks dropped so far."""
    return sum(int(n) for dev in ("rs", "rs2") for n in DROPPED.findall(
        world.run(world.rtr, "tc", "-s", "qdisc", "show", "dev", dev).stdout))


def sender_rtt(world: MptcpWorld, ns: str) -> float | None:
    """Mean smoothed RTT (ms) of ns's TCP sockets (subflows too) towards the sink."""
    out = world.run(ns, "ss", "-Htin", "state", "established", f"dport = :{SINK_PORT}",
                    check=False).stdout
    rtts = [float(m) for m in RTT.findall(out)]
    return sum(rtts) / len(rtts) if rtts else None


def measure(world: MptcpWorld, sink: MptcpSink, label: str, args, ipv6: bool,
            seconds: float, workdir: Path) -> Row:
    daemon = None
    if args is not None:
        listen = "[::]:[5000]" if ipv6 else None
        name = re.sub(r"\W+", "_", label)
        daemon = Daemon(world, "-q", *args, workdir=workdir, name=name, listen=listen).start()
    rtts: list[float] = []
    done = threading.Event()
    ns = world.rtr if daemon else world.cli

    def sample() -> None:
        # From a quarter of the way in (past slow start) until the client stops.
        done.wait(seconds / 4)
        while not done.wait(0.2):
            if (rtt := sender_rtt(world, ns)) is not None:
                rtts.append(rtt)

    sampler = threading.Thread(target=sample, daemon=True)
    drops = uplink_drops(world)
    sampler.start()
    try:
        upload(world, world.SERVER6 if ipv6 else world.SERVER4, seconds=seconds)
    finally:
        done.set()
        sampler.join(timeout=10)
    try:
        transfer = sink.transfer()
    finally:
        if daemon:
            daemon.stop()
    drops = uplink_drops(world) - drops
    return Row(label, transfer, sum(rtts) / len(rtts) if rtts else None, drops)


def print_table(rows: list[Row], rate: str, default_cc: str) -> None:
    one_link = next(r.transfer.mbit for r in rows if r.label == "daemon")
    print(f"\nUpload from a plain TCP client, two router-server links of {rate} each "
          f"(default congestion control: {default_cc}):\n")
    print(f"{'case':<28}{'Mbit/s':>8}{'x 1 link':>10}{'subflows':>10}  "
          f"{'server saw':<12}{'RTT ms':>8}{'drops':>7}")
    for row in rows:
        t = row.transfer
        rtt = f"{row.rtt_ms:8.1f}" if row.rtt_ms is not None else f"{'-':>8}"
        print(f"{row.label:<28}{t.mbit:8.0f}{t.mbit / one_link:10.2f}{t.subflows:10d}  "
              f"{t.peer[0]:<12}{rtt}{row.drops:7d}")
    print("\nsubflows: the most the server's MPTCP socket had at once (1: plain TCP).\n"
          "RTT: the sending sockets' smoothed RTT under load (the links' own is 0.05 ms).\n"
          "drops: packets the token buckets on the router's uplinks dropped.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="upload time per case")
    parser.add_argument("--rate", default="200mbit", help="each link's rate (tc syntax)")
    parser.add_argument("--burst", default="256kb", help="each token bucket's size")
    parser.add_argument("--latency", default="20ms", help="each token bucket's queue, in time")
    opts = parser.parse_args(argv)
    limit = int(len(CASES) * (opts.seconds + 15) + 30)
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"bench/mptcp.py: over {limit} s"))
    signal.alarm(limit)
    rows = []
    with (tempfile.TemporaryDirectory() as workdir,
          MptcpWorld(rate=opts.rate, burst=opts.burst, latency=opts.latency,
                     tproxy=False) as world, MptcpSink(world) as sink):
        for label, args, ipv6 in CASES:
            if args is not None and not world.tproxy:
                world.install_tproxy()
                world.tproxy = True
            rows.append(measure(world, sink, label, args, ipv6, opts.seconds, Path(workdir)))
            print(f"  {label}: {rows[-1].transfer.mbit:.0f} Mbit/s", file=sys.stderr, flush=True)
        default_cc = world.run(world.rtr, "sysctl", "-n",
                               "net.ipv4.tcp_congestion_control").stdout.strip()
    signal.alarm(0)
    print_table(rows, f"{opts.rate} (burst {opts.burst}, queue {opts.latency})", default_cc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
