"""The channel between the master and one worker: a socketpair, lines of text.

    master -> worker   "ping"   answer "pong" (liveness.py: a worker whose
                                loop does not answer within a second is
                                killed and replaced)
                       "conns"  answer with one line per connection, oldest
                                first, then an empty line
                       "conns full"  the same with both legs' TCP_INFO
                       "conn SELECTOR"  one JSON line on that connection
                                (if it is here), then an empty line
                       "drain"  stop accepting; exit once the last
                                connection is gone (or --drain-timeout)
                       "accept"  start accepting (a worker started by an
                                upgrade waits for it: see "drained")
                       "held ADDRESS N", "closed ADDRESS N"
                                the draining worker of this number holds
                                N more, or N fewer, connections from
                                ADDRESS: they count against the limits
                       "flush"  write out the log lines you hold; answer
                                "flushed" (the master's line about a
                                signal then stands after them)
                       "policy SHA256"  load the policy file again, if
                                its digest is that (the master checked it)
    worker -> master   "ready"  once, when the worker's loop runs
                       "pong"   at once after "ping" (also amid an answer)
                       "full", "room"  --when-full bypass: it stopped
                                listening at --max-connections, and
                                listens again
                       the answer to "conns"
                       "held ADDRESS N"   after "drain", with limits: what
                                it holds, per client address
                       "drained"  after those: it no longer accepts,
                                and what it holds is said; the master
                                then tells the new worker of its number
                                "accept" (so only one of the two accepts
                                at a time, and the limits are exact)
                       "closed ADDRESS N" then, as its connections close
                       "matched RULE N"   N more connections got the
                                policy rule RULE (each second, if any)
                       "policy SHA256 loaded|kept"   the answer to
                                "policy": in force here from now on, or
                                the old one kept (the log says why)

Both ends are non-blocking and watched by their own loop: a slow reader
never blocks the writer, whose lines wait in memory. The master's end
survives the master's exec (upgrade), so the new program goes on talking
to the old workers; a worker that reads EOF has lost its master for good.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable

from .evloop import READ, WRITE, Loop

MAX_LINE = 1 << 20  # a line longer than this is a broken peer


class Word(enum.StrEnum):
    """The first word of every line on the channel, but for an answer's lines
    (which the master reads as such while it waits for one)."""
    READY = "ready"
    PING = "ping"
    PONG = "pong"
    FULL = "full"
    ROOM = "room"
    CONNS = "conns"     # "conns" or "conns full"
    CONN = "conn"       # "conn SELECTOR"
    DRAIN = "drain"
    DRAINED = "drained"   # worker -> master: the answer, after its HELD lines
    ACCEPT = "accept"     # master -> the new worker of that number: go
    HELD = "held"
    CLOSED = "closed"
    FLUSH = "flush"       # master -> worker: write out your log lines now
    FLUSHED = "flushed"   # the answer
    POLICY = "policy"
    MATCHED = "matched"


def count_line(word: Word, what: str, count: int) -> str:
    """A HELD, CLOSED (what: an address) or MATCHED (a rule's name) line."""
    return f"{word} {what} {count}"


def parse_count(line: str) -> tuple[Word, str, int] | None:
    """(HELD, CLOSED or MATCHED, what, count) from such a line, else None."""
    parts = line.split()
    if len(parts) == 3 and parts[0] in (Word.HELD, Word.CLOSED, Word.MATCHED):
        return Word(parts[0]), parts[1], int(parts[2])
    return None


class State(enum.StrEnum):
    """A worker's life as its master sees it (show info shows it)."""
    STARTING = "starting"   # forked, not yet READY
    SERVING = "serving"
    OLD = "old"             # a replaced program's, serving until ours do
    DRAINING = "draining"   # told DRAIN: accepts no more, ends with its last connection
    STOPPING = "stopping"   # sent SIGTERM
    HUNG = "hung"           # stopped answering PING: killed, to be replaced


class Channel:
    """One end: on_line(line) for every line read, on_eof() once at the end
    (EOF, an error, or a line too long). close() is idempotent."""

    def __init__(self, loop: Loop, sock: socket.socket, on_line: Callable[[str], None],
                 on_eof: Callable[[], None]):
        sock.setblocking(False)
        self.sock = sock
        self.on_line = on_line
        self.on_eof = on_eof
        self._in = b""
        self._out: list[bytes] = []
        self._reader = loop.io(sock.fileno(), READ)
        self._writer = loop.io(sock.fileno(), WRITE)
        self._reader.start(self._on_readable)
        self.closed = False

    def send(self, *lines: str) -> None:
        if self.closed:
            return
        self._out.append("".join(f"{line}\n" for line in lines).encode())
        if not self._writer.active:
            self._on_writable()

    def _on_writable(self) -> None:
        data = b"".join(self._out)
        self._out.clear()
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._end()
            return
        if sent < len(data):
            self._out.append(data[sent:])
            if not self._writer.active:
                self._writer.start(self._on_writable)
        elif self._writer.active:
            self._writer.stop()

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end()
            return
        *lines, self._in = (self._in + data).split(b"\n")
        if len(self._in) > MAX_LINE:
            self._end()
            return
        for line in lines:
            if self.closed:
                return
            self.on_line(line.decode(errors="replace"))

    def _end(self) -> None:
        if not self.closed:
            self.close()
            self.on_eof()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for watcher in (self._reader, self._writer):
            watcher.stop()
            watcher.close()
        self.sock.close()
