#!/usr/bin/env python3
"""The CPU cost of one per-connection log line, in this process, per
destination: the daemon's own Log (tcp_intercept/logs.py) writing the six
lines of a connection, as Connection says them, to a file, to a pipe (as
stderr under a supervisor), and to a syslog datagram socket.

    bench/logcost.sh [--connections N]

A second table compares what the log costs one connection, to a file, in
each --log-format: original (the six lines), summary and json (one line at
close, after reading both legs' TCP_INFO from a real pair of loopback TCP
sockets, as summary.Closing does in the daemon without --leg-stats; both
with -B client, where the outgoing source needs no getsockname()).

The cost is this thread's user + system CPU time (RUSAGE_THREAD: a reader
thread drains the pipe, another process the syslog socket, as syslogd
would; neither is counted), divided by the lines written, median of 5
runs. No line may be dropped. Less noisy than the daemon-level
difference of bench/variants.py logging (which also shows what the lines
cost the connection rate), and it measures the formatting and the writes
alone. No root needed.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tcp_intercept import logs, summary  # noqa: E402
from tcp_intercept.address import format_sockaddr  # noqa: E402
from tcp_intercept.counters import SLOT_WORDS  # noqa: E402


class NeverFires:
    """A loop timer that never fires: the buffer is written when it fills,
    as under load (the 50 ms timer fires only when lines come slowly)."""

    active = False

    def start(self, callback) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class Loop:
    def timer(self, after: float, repeat: float) -> NeverFires:
        return NeverFires()


def connection_lines(log: logs.Log, n: int) -> None:
    """What n connections log: the id formatted once, then six lines."""
    dst = ("10.1.0.1", 80)
    for i in range(n):
        peer = ("10.0.0.2", 10000 + i % 50000)
        conn_id = f"{format_sockaddr(peer)}-->{format_sockaddr(dst)}"
        log.info(f"{conn_id}: Connection intercepted")
        log.info(f"{conn_id}: Connecting {conn_id}")
        log.info(f"{conn_id}: server accepted connection, splicing")
        log.info(f"{conn_id} C>S: EOF")
        log.info(f"{conn_id} S>C: EOF")
        log.info(f"{conn_id}: closed")


class Moved:
    def __init__(self, moved: int):
        self.moved = moved


class Closed:
    """What summary.Closing reads of a Connection, over real sockets."""

    def __init__(self, client: socket.socket, server: socket.socket, peer: tuple, dst: tuple):
        self.client, self.server, self.peer, self.dst = client, server, peer, dst
        self.c2s, self.s2c = Moved(1000), Moved(250_000)
        self.started, self.connected, self.ended = 100.0, 100.001, "CFD"

    @property
    def id(self) -> str:  # formatted once per connection, as Connection does
        return f"{format_sockaddr(self.peer)}-->{format_sockaddr(self.dst)}"

    @property
    def source(self) -> str:  # -B client, like the six lines above (no getsockname)
        return format_sockaddr(self.peer)

    def end_code(self) -> str:
        return self.ended


def tcp_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    client.sendall(b"x" * 10_000)
    accepted.recv(10_000)
    return listener, client, accepted


def summaries(log: logs.Log, n: int, fmt: str) -> None:
    """What n connections cost in --log-format fmt (summary or json)."""
    listener, client, accepted = tcp_pair()
    closing = summary.Closing(log, fmt, None, memoryview(bytearray(SLOT_WORDS * 8)).cast("Q"))
    conn = Closed(accepted, client, None, ("10.1.0.1", 80))
    for i in range(n):  # the bench's own work as the six lines': a peer per connection
        conn.peer = ("10.0.0.2", 10000 + i % 50000)
        closing(conn, 101.5)
    for sock in (listener, client, accepted):
        sock.close()


def per_connection(fmt: str, connections: int, tmp: Path) -> float:
    """Microseconds of CPU per connection, logging to a file in format fmt."""
    log = logs.Log(str(tmp / "cost.log"))
    log.open()
    log.attach(Loop())
    started = cpu()
    if fmt == "original":
        connection_lines(log, connections)
    else:
        summaries(log, connections, fmt)
    log.flush()
    spent = cpu() - started
    log.close()
    os.unlink(tmp / "cost.log")
    return spent / connections * 1e6


# A syslogd: reads datagrams from its stdin (the bound socket) and drops them.
SYSLOGD = "import os\nwhile True: os.read(0, 65536)"


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def drain(fd: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not os.read(fd, 1 << 20):
                return
        except OSError:
            return


def measure(target: str, connections: int, tmp: Path) -> float:
    """Microseconds of CPU per line for one run."""
    log = logs.Log(str(tmp / "cost.log") if target == "file" else None)
    stop, reader, saved = threading.Event(), None, None
    if target == "file":
        log.open()
    elif target == "pipe":
        read_end, write_end = os.pipe()
        saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        reader = threading.Thread(target=drain, args=(read_end, stop), daemon=True)
        log.open()
    else:  # syslog: a socket of ours, read by another process (as syslogd)
        path = str(tmp / "log.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(path)
        syslogd = subprocess.Popen([sys.executable, "-c", SYSLOGD], stdin=server)
        logs.SYSLOG_PATH = path
        log.open(detached=True)
    if reader:
        reader.start()
    log.attach(Loop())
    started = cpu()
    connection_lines(log, connections)
    log.flush()
    while log._lines:  # what a full syslog queue refused: again, as the timer would
        time.sleep(0.001)
        log.flush()
    spent = cpu() - started
    dropped = log._target.dropped
    log.close()
    stop.set()
    if target == "pipe":
        os.dup2(saved, 2)
        os.close(saved)
        os.close(read_end)
    elif target == "syslog":
        syslogd.kill()
        syslogd.wait()
        server.close()
        os.unlink(path)
    if target == "file":
        os.unlink(tmp / "cost.log")
    if dropped:
        raise RuntimeError(f"{target}: {dropped} lines dropped: the reader fell behind")
    return spent / (6 * connections) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ti-logcost-") as tmp:
        print("| destination | CPU us per line (median of 5) |")
        print("|---|---|")
        for target in ("file", "pipe", "syslog"):
            runs = [measure(target, args.connections, Path(tmp)) for _ in range(5)]
            print(f"| {target} | {statistics.median(runs):.2f} |")
        print()
        print("| --log-format (to a file) | CPU us per connection (median of 5, alternating) |")
        print("|---|---|")
        runs: dict[str, list[float]] = {"original": [], "summary": [], "json": []}
        for _ in range(5):
            for fmt, found in runs.items():
                found.append(per_connection(fmt, args.connections, Path(tmp)))
        for fmt, found in runs.items():
            print(f"| {fmt} | {statistics.median(found):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
