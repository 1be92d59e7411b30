"""logs.Log on its own: a syslog that falls behind loses nothing until the
backlog bound, and says what it lost; a pipe gets whole lines only."""

from __future__ import annotations

import os
import re
import socket

import pytest

from tcp_intercept import evloop, logs


class Timer:
    """A loop timer that fires only when the test says so."""

    active = False

    def start(self, callback) -> None:
        self.active, self.callback = True, callback

    def stop(self) -> None:
        self.active = False

    def close(self) -> None:
        pass


class Loop:
    def __init__(self):
        self.timers: list[Timer] = []

    def timer(self, after: float, repeat: float) -> Timer:
        self.timers.append(Timer())
        return self.timers[-1]

    def fire(self) -> None:
        for timer in self.timers:
            if timer.active:
                timer.callback()


@pytest.fixture
def syslog(tmp_path, monkeypatch):
    """A syslog socket nobody reads yet; (the socket, an attached Log)."""
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    monkeypatch.setattr(logs, "SYSLOG_PATH", path)
    log = logs.Log(None)
    log.open(detached=True)
    loop = Loop()
    log.attach(loop)
    yield server, log, loop
    log.close()
    server.close()


def read_all(server: socket.socket) -> list[str]:
    found = []
    server.setblocking(False)
    try:
        while True:
            found.append(server.recv(65536).decode())
    except BlockingIOError:
        return found


def test_a_slow_syslog_gets_every_line_later(syslog):
    server, log, loop = syslog
    for n in range(2000):  # more than a datagram queue holds (max_dgram_qlen)
        log.info(f"line {n}")
    log.flush()
    assert log._lines, "the queue took everything: the test proves nothing"
    got = []
    while log._lines or not got:
        got += read_all(server)
        loop.fire()  # the flush timer: what was refused is sent again
    got += read_all(server)
    assert got == [f"<30>tcp-intercept: line {n}" for n in range(2000)]


def test_beyond_the_backlog_lines_are_dropped_and_said_so(syslog, monkeypatch):
    server, log, loop = syslog
    monkeypatch.setattr(logs, "MAX_BACKLOG", 100)
    for n in range(5000):
        log.info(f"line {n}")
    log.flush()
    got = read_all(server)
    while log._lines:
        loop.fire()
        got += read_all(server)
    log.info("after")
    log.flush()
    got += read_all(server)
    [note] = [line for line in got if "dropped" in line]
    dropped = int(re.search(r"<28>tcp-intercept: (\d+) log line\(s\) dropped since", note)[1])
    numbered = [line for line in got if "line " in line]
    assert dropped + len(numbered) == 5000
    assert got[-1] == "<30>tcp-intercept: after" and got.index(note) < len(got) - 1


def test_a_pipe_gets_whole_lines_of_at_most_pipe_buf(monkeypatch):
    """stderr under a supervisor is a pipe: a write() there is atomic only up
    to PIPE_BUF, so workers sharing it must write whole lines at most that long."""
    writes: list[bytes] = []
    real_write = os.write

    def write(fd: int, data) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    read_end, write_end = os.pipe()
    try:
        target = logs._FileTarget(write_end, owned=False)
        lines = [f"{n:05d} " + "x" * (n % 300) + "\n" for n in range(200)]
        monkeypatch.setattr(os, "write", write)
        assert target.write(list(lines)) == []
        monkeypatch.undo()
        received = os.read(read_end, 1 << 20)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert received.decode() == "".join(lines)
    assert len(writes) > 1 and all(len(w) <= 4096 and w.endswith(b"\n") for w in writes)


def test_the_fast_path_writes_the_line_stamp_writes(monkeypatch):
    """Log.info/warning/error inline _stamp(): both make the very same line,
    in loguru's FORMAT, across a change of second."""
    written: list[str] = []
    log = logs.Log(None)
    monkeypatch.setattr(log, "_added", written.append)
    for now in (1796380000.0004, 1796380000.9996, 1796380001.5):
        monkeypatch.setattr(logs, "_now", lambda now=now: now)
        log.info("i")
        log.warning("w")
        log.error("e")
        assert written[-3:] == [logs._stamp("INFO", "i"), logs._stamp("WARNING", "w"),
                                logs._stamp("ERROR", "e")]
        ms = int(round(now % 1, 4) * 1000)
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.{ms:03d} INFO: i\n", written[-3])


def test_what_a_sigkill_can_lose_is_at_most_64_kib_or_50_ms_of_lines(tmp_path):
    """Lines wait in the buffer until 64 KiB have gathered or 50 ms have
    passed: at any moment, what is not yet in the file (what a SIGKILL would
    lose) is less than 64 KiB, and one turn of the loop's timer writes it."""
    path = tmp_path / "d.log"
    log = logs.Log(str(path))
    log.open()
    loop = evloop.Loop()  # the real one: its timer writes what waits
    log.attach(loop)
    try:
        added = path.stat().st_size
        for n in range(3000):  # about 200 KiB of connection lines
            line = f"[10.0.0.{n % 250}]:{40000 + n}-->[10.1.0.1]:443: Connection intercepted"
            log.info(line)
            added += len(logs._stamp("INFO", line))
            assert added - path.stat().st_size < logs.FLUSH_SIZE == 64 * 1024
        assert path.stat().st_size < added  # some wait for the timer
        assert logs.FLUSH_DELAY == 0.05
        stop = loop.timer(2 * logs.FLUSH_DELAY)
        stop.start(loop.stop)
        loop.run()
        stop.close()
        assert path.stat().st_size == added
    finally:
        log.close()
        loop.destroy()
