#!/usr/bin/env python3
"""What listing the connections costs relaying: with N idle connections
held through the daemon (-w 1, -q), one echo connection sends 100 B and
waits for them back, again and again, while the control socket is asked
`show conns`, `show conns full`, or nothing, in a loop. Reported per
question: the echo's round trip, p50, p99.9 and worst, medians over the
rounds (the questions alternate in each round).

    bench/showconns.sh [--connections 10000] [--seconds 5] [--rounds 3]

Needs root (namespaces). Touches nothing outside its namespaces.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.phases import ECHO_PORT  # noqa: E402
from bench.run import raise_descriptor_limit  # noqa: E402
from bench.variants import world_for  # noqa: E402
from tcp_intercept.ctl import ask  # noqa: E402
from lab.topology import Daemon  # noqa: E402

QUESTIONS = ("none", "show conns", "show conns full")


def hold(topo, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        held.append(topo.connect(topo.cli, topo.SERVER4, ECHO_PORT))
    return held


def echo_times(topo, seconds: float, question: str, control: str) -> list[float]:
    """Round trips (ms) of 100 B echoes while question is asked in a loop."""
    stop = threading.Event()

    def asking() -> None:
        while not stop.is_set():
            ask(control, question, timeout=30)

    asker = threading.Thread(target=asking) if question != "none" else None
    times = []
    with topo.connect(topo.cli, topo.SERVER4, ECHO_PORT) as sock:
        if asker:
            asker.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            sock.sendall(b"e" * 100)
            got = 0
            while got < 100:
                got += len(sock.recv(100 - got))
            times.append((time.perf_counter() - started) * 1000)
            time.sleep(0.001)
        stop.set()
        if asker:
            asker.join(60)
    return sorted(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    raise_descriptor_limit(args.connections)
    found: dict[str, list[tuple[float, float, float]]] = {q: [] for q in QUESTIONS}
    with tempfile.TemporaryDirectory(prefix="ti-showconns-") as tmp:
        topo = world_for(True)
        try:
            daemon = Daemon(topo, "-q", workdir=Path(tmp), control=True).start()
            held = hold(topo, args.connections)
            for rnd in range(args.rounds):
                order = QUESTIONS if rnd % 2 == 0 else tuple(reversed(QUESTIONS))
                for question in order:
                    times = echo_times(topo, args.seconds, question, str(daemon.control_path))
                    found[question].append((times[len(times) // 2],
                                            times[int(len(times) * 0.999)], times[-1]))
                    print(f"round {rnd + 1} {question}: {found[question][-1]}",
                          file=sys.stderr, flush=True)
            for sock in held:
                sock.close()
            daemon.stop()
        finally:
            topo.down()
    print(f"| asked in a loop ({args.connections} connections held) | echo p50 ms | "
          "p99.9 ms | worst ms |")
    print("|---|---|---|---|")
    for question, rows in found.items():
        print(f"| {question} | " + " | ".join(
            f"{statistics.median(r[i] for r in rows):.2f}" for i in range(3)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
