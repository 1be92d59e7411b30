#!/usr/bin/env python3
"""The bench's far end: an epoll echo server for many connections at once.

Sends back every byte it reads; at the peer's EOF it shuts down its own side
and closes. One thread, level-triggered epoll, non-blocking sockets; a
connection whose echo cannot be written at once keeps the rest and waits
for EPOLLOUT (no reading meanwhile, so a slow reader only slows itself).
Runs until SIGTERM or SIGINT. Standard library only; run it in the server
namespace: ``echo_server.py --port 7007 [--host ADDR]``.
"""

from __future__ import annotations

import argparse
import resource
import select
import signal
import socket
import sys

CHUNK = 64 * 1024
IN, OUT = select.EPOLLIN, select.EPOLLOUT
DROP = (ConnectionError, TimeoutError)


def raise_descriptor_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class EchoServer:
    """Listener and connections behind one epoll object."""

    def __init__(self, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(socket.SOMAXCONN)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), IN)
        self.conns: dict[int, socket.socket] = {}
        self.pending: dict[int, bytes] = {}  # echo not yet written, per fd
        self.running = True

    def run(self) -> None:
        lfd = self.listener.fileno()
        while self.running:
            try:
                events = self.epoll.poll(1.0, 1024)
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == lfd:
                    self.accept()
                elif mask & OUT or fd in self.pending:
                    self.flush(fd)
                else:
                    self.echo(fd)

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: try again on the next event
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[sock.fileno()] = sock
            self.epoll.register(sock.fileno(), IN)

    def echo(self, fd: int) -> None:
        sock = self.conns[fd]
        try:
            data = sock.recv(CHUNK)
        except BlockingIOError:
            return
        except DROP:
            self.close(fd)
            return
        if not data:
            self.close(fd, shutdown=True)
            return
        self.send(fd, sock, data)

    def send(self, fd: int, sock: socket.socket, data: bytes) -> None:
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except DROP:
            self.close(fd)
            return
        if sent < len(data):
            self.pending[fd] = data[sent:]
            self.epoll.modify(fd, OUT)
        elif fd in self.pending:
            del self.pending[fd]
            self.epoll.modify(fd, IN)

    def flush(self, fd: int) -> None:
        self.send(fd, self.conns[fd], self.pending[fd])

    def close(self, fd: int, shutdown: bool = False) -> None:
        sock = self.conns.pop(fd)
        self.pending.pop(fd, None)
        self.epoll.unregister(fd)
        if shutdown:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        sock.close()

    def stop(self, *_) -> None:
        self.running = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=7007)
    args = parser.parse_args(argv)
    raise_descriptor_limit()
    server = EchoServer(args.host, args.port)
    # TERM and INT: leave the loop after the current batch of events.
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
