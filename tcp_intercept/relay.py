"""One direction of a connection (C>S or S>C): bytes from src to dst.

A relay starts in copy mode: one recv() into a buffer shared by the whole
daemon, then send() straight on. Small exchanges (requests, pings, most of a
short connection's life) never need more. When a read fills the buffer the
stream is bulk, and the relay borrows a pipe from the pool and moves bytes
with splice() (socket -> pipe -> socket, never through user space). It keeps
the pipe while the stream moves: the pool takes it back once it stayed empty
and unused for a whole reclaim interval (see pipes.py), or at EOF.

States, as seen by the connection that owns the relay:
  reading   src is read whenever it is readable (nothing is waiting for dst)
  writing   bytes wait for dst to become writable: the `pending` copy, or the
            pipe's content; src is not read in copy mode, and in splice mode
            only until the pipe is full
  eof       src said EOF; once the waiting bytes are out, dst gets
            shutdown(SHUT_WR) and the relay is `done` (half-close: the other
            direction goes on); when the other is done already, the
            connection's close() says the FIN instead
Errors are not handled here: an OSError leaves the relay and the connection
decides (it resets both sides).
"""

from __future__ import annotations

import errno
import os
import socket

from .evloop import READ, WRITE
from .pipes import PipePool

COPY_SIZE = 64 * 1024
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

_buffer = bytearray(COPY_SIZE)
_view = memoryview(_buffer)


def interest(inbound: Relay, outbound: Relay) -> int:
    """The events a socket waits for: READ while `inbound` (which reads it) is
    reading, WRITE while `outbound` (which writes to it) is writing."""
    events = 0 if (inbound.eof or inbound.full or inbound.pending is not None) else READ
    return (events | WRITE) if outbound.writing else events


class Relay:
    __slots__ = ("src", "dst", "name", "pool", "pipe", "inpipe", "pending",
                 "full", "eof", "done", "can_splice", "busy", "moved", "ctr", "counter",
                 "other")

    def __init__(self, src: socket.socket, dst: socket.socket, name: str, pool: PipePool,
                 ctr: memoryview, counter: int):
        self.src = src
        self.dst = dst
        self.name = name          # "C>S" or "S>C", as in the log
        self.pool = pool
        self.moved = 0            # bytes delivered to dst
        self.ctr = ctr            # the worker's counters; ctr[counter] sums `moved`
        self.counter = counter
        self.pipe: tuple[int, int] | None = None
        self.inpipe = 0           # bytes sitting in the pipe
        self.pending: bytes | None = None  # copy mode: bytes dst did not take
        self.full = False         # splice mode: the pipe took nothing more
        self.eof = False
        self.done = False
        self.can_splice = True
        self.busy = False         # spliced since the pool's last reclaim()
        self.other: Relay | None = None  # the other direction, once both exist

    @property
    def writing(self) -> bool:
        return self.pending is not None or self.inpipe > 0

    def on_readable(self) -> bool:
        """Move what src has; True when this read found EOF."""
        if self.pipe is not None:
            return self._splice_in()
        try:
            n = self.src.recv_into(_buffer)
        except (BlockingIOError, InterruptedError):
            return False
        if n == 0:
            return self._end()
        self._send(n)
        if n == COPY_SIZE and self.can_splice and self.pending is None:
            try:
                self.pipe = self.pool.take(self)
            except OSError:
                pass  # out of descriptors: copying still works
        return False

    def on_writable(self) -> None:
        if self.pending is not None:
            pending = self.pending
            try:
                sent = self.dst.send(pending)
            except (BlockingIOError, InterruptedError):
                return
            self.pending = pending[sent:] if sent < len(pending) else None
            self.moved += sent  # count
            self.ctr[self.counter] += sent  # count
        else:
            self._drain()
        if self.eof and not self.writing:
            self._shutdown()

    def release(self) -> None:
        """Give the pipe back (or close it if bytes are still in it)."""
        if self.pipe is not None:
            self.pool.give(self, self.pipe, empty=self.inpipe == 0)
            self.pipe = None
            self.inpipe = 0

    def reclaim(self, idle_only: bool = True) -> None:
        """The pool's periodic question: give the pipe back if it stayed
        empty and unused since the last time."""
        if self.busy and idle_only:
            self.busy = False
        elif not self.inpipe:
            self.release()

    def _send(self, n: int) -> None:
        try:
            sent = self.dst.send(_view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        self.moved += sent  # count
        self.ctr[self.counter] += sent  # count
        if sent < n:
            self.pending = bytes(_view[sent:n])

    def _splice_in(self) -> bool:
        try:
            n = os.splice(self.src.fileno(), self.pipe[1], self.pool.size, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            # Readable, yet nothing moved: the pipe is full.
            self.full = self.inpipe > 0
            return False
        except OSError as err:
            if err.errno != errno.EINVAL or self.inpipe:
                raise
            # This socket type cannot splice: copy from now on.
            self.can_splice = False
            self.release()
            return self.on_readable()
        if n == 0:
            return self._end()
        self.inpipe += n
        self.busy = True
        self._drain()
        return False

    def _drain(self) -> None:
        dst = self.dst.fileno()
        while self.inpipe:
            try:
                n = os.splice(self.pipe[0], dst, self.inpipe, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            self.inpipe -= n
            self.moved += n  # count
            self.ctr[self.counter] += n  # count
            self.full = False

    def _end(self) -> bool:
        self.eof = True
        if not self.writing:
            self._shutdown()
        return True

    def _shutdown(self) -> None:
        self.release()
        self.done = True
        if self.other is not None and self.other.done:
            # Both directions are done: the connection closes both sockets
            # now, and close() sends this FIN (dst has nothing left unread:
            # its reader saw EOF, so no reset).
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # dst already gone: the other direction reports it
