"""One request, one answer: the connections of operators' tools (the
control socket, the metrics endpoint), served by the master's loop.

Nothing such a client does may slow the daemon or grow without bound:
  - a request is read until its end marker, at most `max_request` bytes;
    longer, it is answered as too long (the protocol says how) and closed;
  - a client that has not sent its whole request, or has not taken its
    answer, within `timeout` seconds of its last progress is dropped;
  - the answer is written without blocking, as the client takes it;
  - at most `max_clients` at once; another is closed at once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from loguru import logger as log

from .evloop import READ, WRITE, Loop

# handle(request, respond): request is the bytes up to the end marker, or
# None when it was too long; respond(answer) may be called later (the
# answer of `show conns` waits for the workers).
Handler = Callable[[bytes | None, Callable[[bytes], None]], None]


class RequestServer:
    def __init__(self, loop: Loop, sock: socket.socket, handle: Handler, *, end: bytes,
                 max_request: int = 1024, timeout: float = 10.0, max_clients: int = 128):
        sock.setblocking(False)
        self.loop = loop
        self.sock = sock
        self.handle = handle
        self.end = end
        self.max_request = max_request
        self.timeout = timeout
        self.max_clients = max_clients
        self.clients: set[_Client] = set()
        self.watcher = loop.io(sock.fileno(), READ)
        self.watcher.start(self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of descriptors: the clients wait
                log.warning("accept() on an operator's socket: {}", err.strerror)
                return
            if len(self.clients) >= self.max_clients:
                conn.close()
                continue
            self.clients.add(_Client(self, conn))

    def close(self) -> None:
        """Stop serving; the socket itself is closed by its owner."""
        self.watcher.stop()
        self.watcher.close()
        for client in list(self.clients):
            client.close()


class _Client:
    __slots__ = ("server", "sock", "data", "out", "answered", "reader", "writer", "timer",
                 "last", "closed")

    def __init__(self, server: RequestServer, sock: socket.socket):
        sock.setblocking(False)
        self.server = server
        self.sock = sock
        self.data = b""
        self.out = memoryview(b"")
        self.answered = False
        self.closed = False
        loop = server.loop
        self.reader = loop.io(sock.fileno(), READ)
        self.writer = loop.io(sock.fileno(), WRITE)
        self.last = loop.now()
        # Repeating: it checks progress, see evloop on one-shot timers.
        self.timer = loop.timer(server.timeout / 4, server.timeout / 4)
        self.reader.start(self._on_readable)
        self.timer.start(self._on_timer)

    def _on_readable(self) -> None:
        try:
            chunk = self.sock.recv(self.server.max_request + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # gone before asking
            self.close()
            return
        self.last = self.server.loop.now()
        self.data += chunk
        end = self.data.find(self.server.end)
        if end < 0 and len(self.data) <= self.server.max_request:
            return
        self.reader.stop()
        request = self.data[:end] if 0 <= end <= self.server.max_request else None
        self.data = b""
        self.server.handle(request, self.respond)

    def respond(self, answer: bytes) -> None:
        if self.closed or self.answered:
            return
        self.answered = True
        self.out = memoryview(answer)
        self.last = self.server.loop.now()
        self._on_writable()

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent:
            self.last = self.server.loop.now()
        self.out = self.out[sent:]
        if not self.out:
            self.close()
        elif not self.writer.active:
            self.writer.start(self._on_writable)

    def _on_timer(self) -> None:
        if self.server.loop.now() - self.last >= self.server.timeout:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for watcher in (self.reader, self.writer, self.timer):
            watcher.stop()
            watcher.close()
        self.sock.close()
        self.server.clients.discard(self)
