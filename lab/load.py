"""A steady stream of short connections through the daemon, from test threads.

Each connection is what the bench's rate phase does: connect from the client
namespace, send 100 bytes to the echo server, read them back, close. The
threads run until stop(); every connection that did not get its bytes back
intact is counted as failed, with its error.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter

from .peers import ECHO
from .topology import Topology

PAYLOAD_SIZE = 100


class ShortConnections:
    """threads x (connect, 100 B echoed, close) in a loop; a context manager."""

    def __init__(self, topo: Topology, threads: int = 4, host: str | None = None,
                 port: int = ECHO, timeout: float = 10):
        self.topo = topo
        self.host = host or topo.SERVER4
        self.port = port
        self.timeout = timeout
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.slowest = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> ShortConnections:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)

    @property
    def total(self) -> int:
        return self.ok + sum(self.failed.values())

    def wait_for(self, count: int, timeout: float = 30) -> None:
        """Until count connections have been made (ok or not)."""
        deadline = time.monotonic() + timeout
        while self.total < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.total} of {count} short connections made")
            time.sleep(0.02)

    def _run(self) -> None:
        while not self._stop.is_set():
            data = os.urandom(PAYLOAD_SIZE)
            started = time.monotonic()
            try:
                with self.topo.connect(self.topo.cli, self.host, self.port,
                                       timeout=self.timeout) as sock:
                    sock.sendall(data)
                    echoed = sock.recv(PAYLOAD_SIZE, socket.MSG_WAITALL)
                error = None if echoed == data else f"got {len(echoed)} bytes back"
            except OSError as err:
                error = type(err).__name__
            with self._lock:
                self.slowest = max(self.slowest, time.monotonic() - started)
                if error is None:
                    self.ok += 1
                else:
                    self.failed[error] += 1
