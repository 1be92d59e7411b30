"""The process's log: one writer, fed by loguru and by the connections.

Start-up, shutdown, warnings and the daemon's own errors (with their
tracebacks) go through loguru as `log.info(...)`. The per-connection lines,
six for every connection, would cost more than relaying it if each went
through loguru and a write() of its own, so connections say
`ctx.log.info(text)` instead: the line is formatted once (a timestamp
prefix cached per second, milliseconds from a table), appended to a
buffer, and the buffer is written with one write() when it holds 64 KiB, or
50 ms after its first line, whichever comes first. Writing once per loop
iteration was tried first: under load an iteration carries a few events,
and the write() plus the watcher around it cost more than the lines. A
loguru line flushes the buffer before itself, so the file keeps the order
in which things happened. Lines are the original's (operators grep them):
`YYYY-MM-DD HH:MM:SS.mmm LEVEL: text`.

What can be lost, and what is said about it:
  SIGKILL       the lines of the last 50 ms, at most 64 KiB.
  a full disk   writing fails: the lines are dropped, never waited for; the
                first write that works again is preceded by a warning that
                says how many lines were dropped and why.
  rotation      SIGHUP flushes to the old file, closes it, opens the path
                anew: nothing is lost between the two.
Several processes (the workers) appending to one file never interleave
inside a line: the file is opened O_APPEND and every write() holds whole
lines (for a pipe, at most PIPE_BUF bytes of whole lines at a time).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import sys
import time
from time import time as _now

from loguru import logger

FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level}: {message}"
FLUSH_SIZE = 64 * 1024
FLUSH_DELAY = 0.05  # seconds from a buffer's first line to its write()
SYSLOG_PATH = "/dev/log"
SYSLOG_IDENT = "tcp-intercept"
MAX_BACKLOG = 10_000  # lines kept for a slow syslog before they are dropped
# <facility daemon (3) * 8 + severity> for the levels we write.
SYSLOG_PRIORITY = {"INFO": 30, "WARNING": 28, "ERROR": 27, "CRITICAL": 26, "DEBUG": 31}
LOG_FILE_MODE = 0o640


def _adder(level: str):
    """Log.info, .warning, .error: _stamp()'s line, with _stamp() inlined,
    for they run six times per connection (a call less is a quarter of a
    line's cost; tests/test_logs.py checks both make the same line)."""
    def add(self: Log, text: str) -> None:
        now = _now()
        second = int(now)
        if second != _second:
            _new_second(second)
        self._added(f"{_prefix}{_MILLISECONDS[int((now - second) * 1000)]}{level}: {text}\n")
    add.__name__ = level.lower()
    return add


class Log:
    """Where this process's log goes: the file (`path`), else stderr in the
    foreground, else syslog once detached. info()/warning()/error() are the
    fast path for connection lines; loguru's lines go through the same
    buffer. attach() lets the buffer wait on a loop's timer; until then
    (start-up) and after detach() every line is written at once."""

    def __init__(self, path: str | None):
        self.path = os.path.abspath(path) if path else None
        self._target: _Target | None = None
        self._sink_id: int | None = None
        self._lines: list[str] = []
        self._size = 0
        self._flusher = None  # a timer of the loop, when attached
        self._pending = False
        logger.remove()

    # -- where the lines go ---------------------------------------------------

    def open(self, detached: bool = False) -> None:
        """The log file if there is one (OSError if it cannot be opened);
        else stderr, or syslog once detached."""
        if self.path:
            target = _FileTarget(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                         | os.O_CLOEXEC, LOG_FILE_MODE))
        elif detached:
            target = _SyslogTarget.connect()
        else:
            target = _FileTarget(sys.stderr.fileno(), owned=False)
        self._replace(target)
        if self._sink_id is None:
            self._sink_id = logger.add(self._from_loguru, level="INFO", format=FORMAT,
                                       backtrace=False, diagnose=False, colorize=False,
                                       catch=False)

    def reopen(self) -> None:
        """SIGHUP: logrotate moved the file away; flush to it, start a new one.
        If the new one cannot be opened the old one stays, and says so."""
        if not self.path:
            return
        logger.info("Received SIGHUP, closing this logfile")
        try:
            target = _FileTarget(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                         | os.O_CLOEXEC, LOG_FILE_MODE))
        except OSError as err:
            logger.error("Can not reopen log file {}: {}; still writing to the old one",
                         self.path, err.strerror)
            return
        self._replace(target)
        logger.info("Received SIGHUP, (re)opening this logfile")

    def close(self) -> None:
        """Flush and close; loguru's lines are dropped until open()."""
        self.detach()
        if self._sink_id is not None:
            logger.remove(self._sink_id)
            self._sink_id = None
        self._replace(None)

    def fileno(self) -> int | None:
        """The descriptor a forked worker must keep (the file, stderr or the
        syslog socket; None when there is none)."""
        if self._target is None or self._target.fd < 0:
            return None
        return self._target.fd

    def _replace(self, target: _Target | None) -> None:
        self.flush()
        if self._target is not None:
            self._target.close()
        self._target = target

    # -- batching ---------------------------------------------------------------

    def attach(self, loop) -> None:
        """From now on, connection lines wait up to FLUSH_DELAY on loop's timer."""
        self.detach()
        # Repeating, and stopped once it fired: see evloop on one-shot timers.
        self._flusher = loop.timer(FLUSH_DELAY, FLUSH_DELAY)

    def detach(self) -> None:
        """Back to writing every line at once (the loop is about to end, or
        this is a forked child whose loop is its parent's)."""
        self.flush()
        if self._flusher is not None:
            if self._pending:
                self._flusher.stop()
            self._flusher.close()
            self._flusher = None
            self._pending = False

    # -- the fast path: info(), warning(), error() -----------------------------

    info = _adder("INFO")
    warning = _adder("WARNING")
    error = _adder("ERROR")

    def raw(self, text: str) -> None:
        """A line as it is, without the time and level (--log-format json: a
        JSON object per line, which carries its own time)."""
        self._added(text + "\n")

    def _added(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_SIZE or self._flusher is None:
            self.flush()
        else:
            self._flush_later()

    def _flush_later(self) -> None:
        if not self._pending:
            self._pending = True
            self._flusher.start(self._on_timer)

    def _on_timer(self) -> None:
        self._flusher.stop()
        self._pending = False
        self.flush()

    def _from_loguru(self, message) -> None:
        """loguru's sink: its line, formatted by FORMAT, after what is buffered."""
        if self._target is None:
            return
        self._lines.append(str(message))
        self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        if self._target is not None:
            # What a slow syslog could not take yet waits for the next flush
            # (not counted in _size: it must not make every line flush).
            self._lines = self._target.write(lines)
            if self._lines and self._flusher is not None:
                self._flush_later()


class _Target:
    """A destination that takes whole lines and never blocks the loop on a
    failure: it counts the lines it could not write, and says so in a
    warning before the first lines it can write again."""

    fd = -1

    def __init__(self):
        self.dropped = 0
        self.reason = ""
        self.since = 0.0

    def write(self, lines: list[str]) -> list[str]:
        """Write lines; those to try again at the next flush (syslog only)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _lost(self, count: int, err: OSError) -> None:
        if not self.dropped:
            self.since = time.time()
            self.reason = err.strerror or str(err)
        self.dropped += count

    def _note(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        return _stamp("WARNING", f"{self.dropped} log line(s) dropped since {since}: "
                                 f"writing the log failed ({self.reason})")


class _FileTarget(_Target):
    """A file (O_APPEND) or a stream such as stderr."""

    def __init__(self, fd: int, owned: bool = True):
        super().__init__()
        self.fd = fd
        self.owned = owned  # stderr is not ours to close
        # A write() to a pipe or socket is atomic only up to PIPE_BUF.
        self.chunk = None if stat.S_ISREG(os.fstat(fd).st_mode) else select.PIPE_BUF
        self.mid_line = False  # a failed write left the file inside a line
        self.error: OSError | None = None

    def write(self, lines: list[str]) -> list[str]:
        data = "".join(lines).encode("utf-8", "backslashreplace")
        if self.dropped:
            note = (("\n" if self.mid_line else "") + self._note()).encode()
            if self._put(note) < len(note):
                self._lost(data.count(b"\n"), self.error)
                return []
            self.dropped = 0
        done = self._put(data)
        if done < len(data):
            self._lost(data.count(b"\n", done), self.error)
        return []

    def _put(self, data: bytes) -> int:
        """Write data; how much of it was written before a failure."""
        done = 0
        try:
            while done < len(data):
                end = len(data) if self.chunk is None else _whole_lines(data, done, self.chunk)
                done += os.write(self.fd, data[done:end])
        except OSError as err:
            self.error = err
        if done:
            self.mid_line = data[done - 1] != 10  # b"\n"
        return done

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


class _SyslogTarget(_Target):
    """/dev/log: one datagram per line (the protocol has no batches), sent
    together at each flush, without waiting when syslog is slow: what its
    full queue (net.unix.max_dgram_qlen datagrams) refuses is sent at the
    next flush, up to MAX_BACKLOG lines; beyond, lines are dropped, counted
    and noted."""

    def __init__(self, sock: socket.socket | None):
        super().__init__()
        self.sock = sock
        self.fd = sock.fileno() if sock is not None else -1

    @classmethod
    def connect(cls) -> _SyslogTarget:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(SYSLOG_PATH)
        except OSError:
            sock.close()
            return cls(None)  # no syslog: the lines go nowhere, as before
        return cls(sock)

    def write(self, lines: list[str]) -> list[str]:
        if self.sock is None:
            return []
        noted = 1 if self.dropped else 0
        if noted:
            lines.insert(0, self._note())
        for index, line in enumerate(lines):
            level, text = _parse(line)
            try:
                self.sock.send(f"<{SYSLOG_PRIORITY.get(level, 30)}>{SYSLOG_IDENT}: "
                               f"{text}".encode("utf-8", "backslashreplace"))
            except BlockingIOError as err:
                left = lines[max(index, noted):]
                if len(left) > MAX_BACKLOG:
                    self._lost(len(left) - MAX_BACKLOG, err)
                    left = left[-MAX_BACKLOG:]
                return left
            except OSError as err:
                if err.errno in (errno.ECONNREFUSED, errno.ENOTCONN):
                    self._reconnect()
                self._lost(len(lines) - max(index, noted), err)
                return []
            if index == 0:
                self.dropped = 0
        return []

    def _reconnect(self) -> None:
        """syslogd restarted: its socket is a new one."""
        try:
            self.sock.connect(SYSLOG_PATH)
        except OSError:
            pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


_second = -1
_prefix = ""
_MILLISECONDS = [f"{ms:03d} " for ms in range(1000)]


def _new_second(second: int) -> None:
    """The part of the stamp up to the second, formatted once per second."""
    global _second, _prefix
    _prefix = time.strftime("%Y-%m-%d %H:%M:%S.", time.localtime(second))
    _second = second


def _stamp(level: str, text: str) -> str:
    """The line as loguru's FORMAT writes it: local time to the millisecond."""
    now = _now()
    second = int(now)
    if second != _second:
        _new_second(second)
    return f"{_prefix}{_MILLISECONDS[int((now - second) * 1000)]}{level}: {text}\n"


def _parse(line: str) -> tuple[str, str]:
    """(level, text) of a formatted line, for syslog, which adds its own time."""
    if line.startswith("{"):  # Log.raw()'s JSON
        return "INFO", line.rstrip("\n")
    head, _, text = line.partition(": ")
    return head.rsplit(" ", 1)[-1], text.rstrip("\n")


def _whole_lines(data: bytes, start: int, limit: int) -> int:
    """Where to end the next write() from start: after the last whole line
    within limit bytes (or after one longer line, which cannot be helped)."""
    if len(data) - start <= limit:
        return len(data)
    end = data.rfind(b"\n", start, start + limit) + 1
    if end:
        return end
    end = data.find(b"\n", start) + 1
    return end or len(data)
