#!/usr/bin/env python3
"""The bench's client side, run in the client namespace; prints JSON.

    loadgen.py rate --host H --port P [--inflight 32] [--duration 5] [--procs 1]
        closed loop: each connection connects, sends 100 B, reads the 100 B
        echo, closes; --inflight of them at once. Connections per second
        (those completed before the deadline), latency p50/p99 (socket() to
        full echo), errors by kind, the generator's own CPU.
    loadgen.py pingpong --host H --port P [--count 20000] [--warmup 1000]
        one connection (TCP_NODELAY), 64 B round trips one after the other;
        p50/p99 in microseconds.
    loadgen.py hold --host H --port P --count N [--parallel 64]
        opens N connections (--parallel connecting at a time), each echoes
        100 B once, and holds them. Prints one JSON line, then obeys lines on
        stdin: "check" sends 16 B on every held connection and reads them back
        (prints a JSON line); "close" or EOF closes everything and exits.

Non-blocking sockets and one epoll per process; standard library only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable

IN, OUT = select.EPOLLIN, select.EPOLLOUT
FAILED = select.EPOLLERR | select.EPOLLHUP


def raise_descriptor_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def error_kind(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno:
        return errno.errorcode.get(err.errno, str(err.errno))
    return type(err).__name__


class Exchange:
    """One socket's echo in flight: sent the payload (or waiting to), reading it back."""

    __slots__ = ("sock", "started", "sent", "got")

    def __init__(self, sock: socket.socket, started: float):
        self.sock, self.started, self.sent, self.got = sock, started, False, b""


class Flight:
    """Up to ``parallel`` echo exchanges at once, on one epoll.

    add() starts an exchange on a socket (connecting or connected); run()
    keeps feeding new ones through feed() until it says no more or the
    deadline passes, and calls done(sock) for each that got its bytes back.
    A failed or late (``timeout``) exchange closes its socket and counts its
    error by kind.
    """

    def __init__(self, payload: bytes, parallel: int, timeout: float = 10.0):
        self.epoll = select.epoll()
        self.payload, self.parallel, self.timeout = payload, parallel, timeout
        self.active: dict[int, Exchange] = {}
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []

    def connect(self, addr: tuple, family: int) -> None:
        started = time.perf_counter()
        sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            status = sock.connect_ex(addr)
            if status not in (0, errno.EINPROGRESS):
                raise OSError(status, os.strerror(status))
        except OSError as err:
            self.errors[error_kind(err)] += 1
            if sock is not None:
                sock.close()
            return
        self.add(sock, started)

    def add(self, sock: socket.socket, started: float | None = None) -> None:
        exchange = Exchange(sock, time.perf_counter() if started is None else started)
        self.active[sock.fileno()] = exchange
        self.epoll.register(sock.fileno(), OUT)

    def run(self, feed: Callable[[], bool], done: Callable[[socket.socket], None],
            deadline: float | None = None) -> None:
        more, next_expiry = True, time.perf_counter() + 0.5
        while True:
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                more = False
            while more and len(self.active) < self.parallel:
                more = feed()
            if not self.active:
                return
            for fd, mask in self.epoll.poll(0.2):
                self.step(self.active[fd], mask, done)
            if now >= next_expiry:
                self.expire(now)
                next_expiry = now + 0.5

    def step(self, ex: Exchange, mask: int, done: Callable[[socket.socket], None]) -> None:
        try:
            if not ex.sent:
                if ex.sock.send(self.payload) != len(self.payload):
                    raise OSError(errno.EMSGSIZE, "short send")
                ex.sent = True
                self.epoll.modify(ex.sock.fileno(), IN)
                return
            data = ex.sock.recv(65536)
            if not data:
                raise EOFError("closed before the echo")
        except BlockingIOError:
            if mask & FAILED:
                self.fail(ex, "EPOLLERR")
            return
        except (OSError, EOFError) as err:
            self.fail(ex, error_kind(err))
            return
        ex.got += data
        if len(ex.got) < len(self.payload):
            return
        if ex.got != self.payload:
            self.fail(ex, "mismatch")
            return
        self.latencies.append(time.perf_counter() - ex.started)
        self.epoll.unregister(ex.sock.fileno())
        del self.active[ex.sock.fileno()]
        done(ex.sock)

    def fail(self, ex: Exchange, kind: str) -> None:
        self.errors[kind] += 1
        self.epoll.unregister(ex.sock.fileno())
        del self.active[ex.sock.fileno()]
        ex.sock.close()

    def expire(self, now: float) -> None:
        for ex in [ex for ex in self.active.values() if now - ex.started > self.timeout]:
            self.fail(ex, "timeout")


def target(args) -> tuple[tuple, int]:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    return (args.host, args.port), family


def rate_worker(args, inflight: int) -> dict:
    addr, family = target(args)
    flight = Flight(b"r" * args.size, inflight)
    counted = [0]
    deadline = time.perf_counter() + args.duration

    def feed() -> bool:
        flight.connect(addr, family)
        return True

    def done(sock: socket.socket) -> None:
        sock.close()
        if time.perf_counter() < deadline:
            counted[0] += 1

    flight.run(feed, done, deadline)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"completed": counted[0], "errors": dict(flight.errors),
            "latencies_us": [round(s * 1e6) for s in flight.latencies],
            "cpu_s": usage.ru_utime + usage.ru_stime}


def rate(args) -> dict:
    """--procs workers (forked), --inflight shared among them, results merged."""
    shares = [args.inflight // args.procs + (i < args.inflight % args.procs)
              for i in range(args.procs)]
    readers = []
    for share in shares[1:]:
        read_end, write_end = os.pipe()
        if os.fork() == 0:
            os.close(read_end)
            with os.fdopen(write_end, "w") as out:
                json.dump(rate_worker(args, share), out)
            os._exit(0)
        os.close(write_end)
        readers.append(read_end)
    results = [rate_worker(args, shares[0])]
    for read_end in readers:
        with os.fdopen(read_end) as pipe:
            results.append(json.load(pipe))
        os.wait()
    return merge_rates(results, args.duration)


def merge_rates(results: list[dict], duration: float) -> dict:
    errors: Counter[str] = Counter()
    latencies = []
    for result in results:
        errors.update(result["errors"])
        latencies += result["latencies_us"]
    completed = sum(r["completed"] for r in results)
    return {"completed": completed, "duration_s": duration, "conn_per_s": completed / duration,
            "errors": sum(errors.values()), "error_kinds": dict(errors),
            "p50_ms": (percentile(latencies, 0.5) or 0) / 1e3,
            "p99_ms": (percentile(latencies, 0.99) or 0) / 1e3,
            "loadgen_cpu_s": sum(r["cpu_s"] for r in results)}


def pingpong(args) -> dict:
    addr, family = target(args)
    payload = b"p" * args.size
    times = []
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(addr)
        for i in range(args.warmup + args.count):
            started = time.perf_counter_ns()
            sock.sendall(payload)
            got = 0
            while got < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError("the echo server closed the connection")
                got += len(chunk)
            if i >= args.warmup:
                times.append((time.perf_counter_ns() - started) / 1e3)
    return {"count": len(times), "p50_us": percentile(times, 0.5),
            "p99_us": percentile(times, 0.99), "mean_us": sum(times) / len(times)}


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


def hold(args) -> dict:
    addr, family = target(args)
    held: list[socket.socket] = []
    opening = Flight(b"h" * args.size, args.parallel, timeout=30)
    started = time.perf_counter()

    def feed() -> bool:
        opening.connect(addr, family)
        return len(held) + len(opening.active) + sum(opening.errors.values()) < args.count

    opening.run(feed, held.append)
    say({"opened": len(held), "errors": sum(opening.errors.values()),
         "error_kinds": dict(opening.errors), "open_s": time.perf_counter() - started})
    while sys.stdin.readline().strip() == "check":
        held = check(held, args.parallel)
    for sock in held:
        sock.close()
    return {"closed": len(held)}


def check(held: list[socket.socket], parallel: int) -> list[socket.socket]:
    """A 16-byte echo on every held connection; the ones that worked stay held."""
    flight = Flight(b"c" * 16, parallel, timeout=30)
    alive: list[socket.socket] = []
    todo = list(reversed(held))
    started = time.perf_counter()

    def feed() -> bool:
        if todo:
            flight.add(todo.pop())
        return bool(todo)

    flight.run(feed, alive.append)
    say({"relaying": len(alive), "failed": len(held) - len(alive),
         "error_kinds": dict(flight.errors), "check_s": time.perf_counter() - started})
    return alive


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, size in (("rate", 100), ("pingpong", 64), ("hold", 100)):
        mode = modes.add_parser(name)
        mode.add_argument("--host", required=True)
        mode.add_argument("--port", type=int, required=True)
        mode.add_argument("--size", type=int, default=size)
    modes.choices["rate"].add_argument("--inflight", type=int, default=32)
    modes.choices["rate"].add_argument("--duration", type=float, default=5.0)
    modes.choices["rate"].add_argument("--procs", type=int, default=1)
    modes.choices["pingpong"].add_argument("--count", type=int, default=20000)
    modes.choices["pingpong"].add_argument("--warmup", type=int, default=1000)
    modes.choices["hold"].add_argument("--count", type=int, required=True)
    modes.choices["hold"].add_argument("--parallel", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    raise_descriptor_limit()
    say({"rate": rate, "pingpong": pingpong, "hold": hold}[args.mode](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
