"""The log as operators read it: the original's lines, byte for byte, with
timestamps to the millisecond, and none lost on a clean exit, across a
rotation under load, or when the disk fills up for a while."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from lab.load import ShortConnections
from lab.peers import ECHO, REFUSED, exchange, payload, sha256
from lab.topology import pid_alive, wait_for
from tcp_intercept.logs import FLUSH_DELAY

STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})"
ADDR = r"\[[0-9a-f.:]+\]:\d+"
ID = rf"{ADDR}-->{ADDR}"
# Every per-connection line the daemon writes, as a whole line.
KINDS = {
    "intercepted": rf"INFO: {ID}: Connection intercepted",
    "connecting": rf"INFO: {ID}: Connecting {ADDR}-->{ADDR}",
    "splicing": rf"INFO: {ID}: server accepted connection, splicing",
    "eof": rf"INFO: {ID} (C>S|S>C): EOF",
    "closed": rf"INFO: {ID}: closed",
    "failed": rf"WARNING: {ID}: connect to server failed: \S.*",
    "error": rf"ERROR: {ID}( C>S| S>C)?: Error: \S.*",
}
LINE = re.compile(rf"^{STAMP} (?:{'|'.join(f'(?P<{k}>{v})' for k, v in KINDS.items())})$")
ANY = re.compile(rf"^{STAMP} (INFO|WARNING|ERROR): \S.*$")


def kinds(text: str) -> dict[str, int]:
    """How many lines of each kind; AssertionError for a line of no known form."""
    counts = dict.fromkeys(KINDS, 0)
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            counts[match.lastgroup] += 1
        else:
            assert ANY.match(line), f"a line of no known form: {line!r}"
    return counts


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def test_every_line_kind_is_the_originals_with_a_millisecond_timestamp(topo, peers,
                                                                         start_daemon):
    daemon = start_daemon(log_file=True)
    data = payload(5000, seed=1)
    before = time.time()
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        conn_id = f"[{topo.CLIENT4}]:{sock.getsockname()[1]}-->[{topo.SERVER4}]:{ECHO}"
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    with pytest.raises(ConnectionResetError):
        with topo.connect(topo.cli, topo.SERVER4, REFUSED) as sock:
            sock.recv(1)
    daemon.wait_log("connect to server failed")
    after = time.time()
    mine = daemon.wait_log(f"{conn_id}: closed") and daemon.lines(conn_id)
    assert [LINE.match(line).lastgroup for line in mine] == [
        "intercepted", "connecting", "splicing", "eof", "eof", "closed"], mine
    for line in daemon.lines("-->"):
        assert LINE.match(line), line
        # The stamp is the moment of the event: within the test's own window
        # (a millisecond either side for the rounding of both clocks).
        assert before - 0.001 <= stamp(line) <= after + 0.001, (line, before, after)


def test_sigterm_under_load_loses_no_line(topo, peers, start_daemon):
    daemon = start_daemon(log_file=True)
    with ShortConnections(topo) as load:
        load.wait_for(300)
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=15) == 0
    counts = kinds(daemon.log_path.read_text())
    assert counts["intercepted"] >= 300
    assert counts["closed"] == counts["intercepted"], counts
    assert daemon.log_path.read_text().rstrip().endswith("Exiting cleanly...")


def test_sigkill_loses_no_line_older_than_the_flush_delay(topo, peers, start_daemon):
    """On SIGKILL only the last 50 ms of lines may be lost: a second after the
    last connection closed (20 times that, for a loaded machine), every line
    of every connection is in the file. (The 64 KiB bound: test_logs.py.)"""
    daemon = start_daemon("-w", "1", log_file=True, control=True)
    with ShortConnections(topo) as load:
        load.wait_for(200)
    assert not load.failed, load.failed
    # The daemon's count, not its log: waiting for the lines would flush them.
    wait_for(lambda: daemon.info()["Closed_clean"] == str(load.total), 10, "all closed")
    time.sleep(20 * FLUSH_DELAY)
    worker = daemon.worker
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not pid_alive(worker), 10, "the killed worker gone")
    counts = kinds(daemon.log_path.read_text())
    assert counts["intercepted"] == counts["closed"] == load.total, counts


@pytest.mark.parametrize("workers", ["1", "2"])
def test_rotation_under_load_loses_no_line_and_closes_the_old_file(topo, peers, start_daemon,
                                                                     workers):
    """With two workers appending to one file, no line is cut by another
    (kinds() checks the form of every line)."""
    daemon = start_daemon("-w", workers, log_file=True)
    rotated: list[Path] = []
    with ShortConnections(topo) as load:
        for n in range(1, 6):
            load.wait_for(100 * n)
            rotated.append(daemon.log_path.with_suffix(f".log.{n}"))
            daemon.log_path.rename(rotated[-1])  # what logrotate does, then HUP
            daemon.signal(signal.SIGHUP)
            wait_for(daemon.log_path.exists, 10, "the new log file")
    assert not load.failed, load.failed
    wait_for(lambda: not any(str(path) in daemon.fds() + daemon.master_fds() for path in rotated),
             10, "the rotated files to be closed")
    daemon.stop()
    total = dict.fromkeys(KINDS, 0)
    for path in rotated:
        text = path.read_text()
        assert text.rstrip().endswith("Received SIGHUP, closing this logfile"), path
        for kind, count in kinds(text).items():
            total[kind] += count
    for kind, count in kinds(daemon.log_path.read_text()).items():
        total[kind] += count
    assert total["intercepted"] == load.total
    assert total["closed"] == total["intercepted"], total


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted whatever happens."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(path)],
                   check=True, timeout=10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def fill(disk: Path) -> Path:
    """A file taking every free byte of disk."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_a_full_disk_neither_blocks_relaying_nor_stops_the_daemon(topo, peers, start_daemon,
                                                                    small_disk):
    log = small_disk / "daemon.log"
    daemon = start_daemon(log_file=log)
    filler = fill(small_disk)
    while_full, sent = 50, set()
    for seed in range(while_full):
        data = payload(10_000, seed=100 + seed)
        started = time.monotonic()
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
        # Relaying never waits for the log (a loaded machine's delays aside).
        assert time.monotonic() - started < 5
        sent.add(sha256(data))
    peers.wait_digests(sent)
    # Lines wait up to FLUSH_DELAY (50 ms) in the worker: fifty connections
    # can all fit in that on an idle machine, and then nothing was written
    # while the disk was full. Give the worker time to try.
    time.sleep(10 * FLUSH_DELAY)
    filler.unlink()
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        conn_id = f"[{topo.CLIENT4}]:{sock.getsockname()[1]}-->[{topo.SERVER4}]:{ECHO}"
        exchange(sock, b"space again")
    daemon.wait_log(f"{conn_id}: closed")
    assert daemon.alive()
    text = log.read_text()
    # Lines still buffered when the space came back were written after it.
    written = kinds("\n".join(line for line in text.splitlines() if conn_id not in line))
    notes = daemon.lines("log line(s) dropped")
    # The disk filled up right after start-up: every line of the connections
    # made while it was full is either in the file or counted in the note.
    # (No note: the worker's loop did not get to write them before the space
    # came back, as on a machine too loaded to run it; then none is missing.)
    dropped = 0
    if notes:
        [note] = notes
        dropped = int(re.search(r"WARNING: (\d+) log line\(s\) dropped since \S+: writing "
                                r"the log failed \(No space left on device\)$", note).group(1))
        assert text.index(note) < text.index(f"{conn_id}: Connection intercepted")
    assert dropped + sum(written.values()) == 6 * while_full, (dropped, written)
