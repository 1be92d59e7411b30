"""The far ends of intercepted connections, driven from the test process.

PeerServer listens in the server namespace (IPv4 and IPv6), one port per
behaviour:

    echo    sends back every byte; at EOF shuts down its own side.
    digest  reads to EOF, then answers with the SHA-256 of what it read (hex,
            newline) and closes: its client half-closes first and must still
            get the answer.
    first   speaks first (GREETING), shuts down its side, then reads to EOF:
            the server half-closes first and the client can still send.
    reset   reads the first bytes, then aborts (SO_LINGER 0): its peer gets
            a reset, not a FIN.

Every connection leaves a Record: the peer address the server saw, the
address it was reached on, the size and SHA-256 of what it received, and how
the connection ended ("eof", or the errno name of the error that ended it).
The client helpers hash on the fly, so end-to-end checks compare digests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass

from .topology import Topology, TopologyError, inside

ECHO, DIGEST, FIRST, RESET = 7001, 7002, 7003, 7004
PORTS = {"echo": ECHO, "digest": DIGEST, "first": FIRST, "reset": RESET}
REFUSED = 7999  # nothing listens there in the server namespace
GREETING = b"the server speaks first, then listens\n" * 100
CHUNK = 256 * 1024


@dataclass(frozen=True)
class Record:
    mode: str
    local: tuple
    peer: tuple
    received: int
    sha256: str
    end: str


def payload(size: int, seed: int) -> bytes:
    """size bytes of their own for each seed: no two connections send the same."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def abort(sock: socket.socket) -> None:
    """Close with a reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _end_name(err: OSError) -> str:
    return errno.errorcode.get(err.errno, str(err)) if err.errno else type(err).__name__


def read_to_eof(sock: socket.socket) -> tuple[int, str, str]:
    """(bytes, SHA-256, "eof" or errno name) of everything until the peer's FIN."""
    digest, total = hashlib.sha256(), 0
    buf = bytearray(CHUNK)
    try:
        while n := sock.recv_into(buf):
            digest.update(memoryview(buf)[:n])
            total += n
    except OSError as err:
        return total, digest.hexdigest(), _end_name(err)
    return total, digest.hexdigest(), "eof"


def exchange(sock: socket.socket, data: bytes) -> tuple[int, str, str]:
    """Send data and half-close while reading to EOF (no deadlock on big data).

    Returns what read_to_eof() returns; a send error is raised.
    """
    failure: list[BaseException] = []

    def send() -> None:
        try:
            view = memoryview(data)
            for start in range(0, len(data), CHUNK):
                sock.sendall(view[start:start + CHUNK])
            sock.shutdown(socket.SHUT_WR)
        except BaseException as err:  # handed to the caller below
            failure.append(err)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    result = read_to_eof(sock)
    sender.join(timeout=(sock.gettimeout() or 30) + 5)
    if failure:
        raise failure[0]
    if sender.is_alive():
        raise TopologyError("sending did not finish")
    return result


def echo_burst(sock: socket.socket, data: bytes) -> str:
    """Send data to an echo server and read as much back, leaving the
    connection open; the SHA-256 of what came back."""
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    digest, buf, got = hashlib.sha256(), bytearray(CHUNK), 0
    while got < len(data):
        n = sock.recv_into(buf, min(len(buf), len(data) - got))
        if not n:
            raise TopologyError(f"EOF after {got} of {len(data)} echoed bytes")
        digest.update(memoryview(buf)[:n])
        got += n
    sender.join(timeout=(sock.gettimeout() or 30) + 5)
    return digest.hexdigest()


class PeerServer:
    """The behaviours above on every port, both families, in topo.srv."""

    def __init__(self, topo: Topology, ports: dict[str, int] | None = None):
        self.topo = topo
        self.ports = ports or PORTS
        self.records: list[Record] = []
        self.accepted = 0
        self._live: set[socket.socket] = set()
        self._cond = threading.Condition()
        self._listeners: list[tuple[socket.socket, str]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> PeerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> PeerServer:
        with inside(self.topo.srv):
            for mode, port in self.ports.items():
                for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    self._listeners.append((sock, mode))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((host, port))
                    sock.listen(1024)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        with self._cond:
            for conn in self._live:  # wakes a thread blocked in recv(); close() would not
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for sock, _ in self._listeners:
            sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            for sock, mode in self._listeners:
                sel.register(sock, selectors.EVENT_READ, mode)
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    conn, peer = key.fileobj.accept()
                    with self._cond:
                        self.accepted += 1
                        self._live.add(conn)
                        self._cond.notify_all()
                    threading.Thread(target=self._serve, args=(conn, peer, key.data),
                                     daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple, mode: str) -> None:
        conn.settimeout(60)
        local = conn.getsockname()
        received, digest, end = 0, sha256(b""), "eof"
        try:
            if mode == "first":
                conn.sendall(GREETING)
                conn.shutdown(socket.SHUT_WR)
            if mode == "reset":
                data = conn.recv(CHUNK)
                received, digest, end = len(data), sha256(data), "reset sent"
                abort(conn)
            elif mode == "echo":
                received, digest, end = self._echo(conn)
            else:
                received, digest, end = read_to_eof(conn)
            if mode == "digest" and end == "eof":
                conn.sendall(digest.encode() + b"\n")
        except OSError as err:
            end = _end_name(err)
        finally:
            conn.close()
            with self._cond:
                self._live.discard(conn)
                self.records.append(Record(mode, local[:2], peer[:2], received, digest, end))
                self._cond.notify_all()

    @staticmethod
    def _echo(conn: socket.socket) -> tuple[int, str, str]:
        digest, total = hashlib.sha256(), 0
        buf = bytearray(CHUNK)
        try:
            while n := conn.recv_into(buf):
                digest.update(memoryview(buf)[:n])
                total += n
                conn.sendall(memoryview(buf)[:n])
            conn.shutdown(socket.SHUT_WR)
        except OSError as err:
            return total, digest.hexdigest(), _end_name(err)
        return total, digest.hexdigest(), "eof"

    def wait_records(self, count: int = 1, timeout: float = 10, **match) -> list[Record]:
        """The records whose fields equal match, once there are count of them."""
        def found():
            hits = [r for r in self.records if all(getattr(r, k) == v for k, v in match.items())]
            return hits if len(hits) >= count else None
        with self._cond:
            hits = self._cond.wait_for(found, timeout)
        if hits is None:
            raise TopologyError(f"timed out waiting for {count} record(s) {match}; "
                                f"have {self.records}")
        return hits

    def wait_digests(self, digests: set[str], timeout: float = 10) -> list[Record]:
        """One record for each SHA-256 in digests (what each client sent), in any order."""
        def found():
            hits = [r for r in self.records if r.sha256 in digests]
            return hits if {r.sha256 for r in hits} == digests else None
        with self._cond:
            hits = self._cond.wait_for(found, timeout)
        if hits is None:
            raise TopologyError(f"timed out waiting for {len(digests)} digests")
        return hits

    def wait_accepted(self, count: int, timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.accepted >= count, timeout):
                raise TopologyError(f"only {self.accepted} of {count} connections accepted")


@contextlib.contextmanager
def paced_echo(sock, rate: int):
    """While inside: rate bytes a second sent on sock, a connection to the
    echo server, in 20 chunks a second on a schedule (a late chunk does not
    push the next ones back), and the echo read and dropped. On the way out
    both threads stop and sock is shut down (not closed)."""
    stop = threading.Event()

    def send() -> None:
        chunk, start, sent = b"p" * (rate // 20), time.monotonic(), 0
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(chunk)
                sent += 1
                time.sleep(max(start + sent / 20 - time.monotonic(), 0))

    def drain() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set() and sock.recv(65536):
                pass

    threads = [threading.Thread(target=send), threading.Thread(target=drain)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
