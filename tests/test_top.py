"""tcp-intercept-ctl top, run for real in tmux (a server of its own) against
a daemon relaying two transfers of known rates, one with a slow server leg
(lab/delayline.py), the other with retransmits (its server drops some of
its packets for a while), then new connections at a known rate: what a
person would see on the screen (capture-pane): the totals at the head, each
row's throughput and which leg is slow, the order after each sort key,
pause (the screen holds still, then moves again) and quit; a terminal too
small; the daemon gone."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tcp_intercept import top

from lab.delayline import FAST_MS, SLOW4, SLOW_MS
from lab.intercept import REPO
from lab.peers import ECHO, paced_echo
from lab.topology import wait_for

CTL = str(REPO / ".venv" / "bin" / "tcp-intercept-ctl")
SLOW_RATE, FAST_RATE = 100_000, 400_000  # bytes a second, each way (echoed)
NEW_RATE = 10  # short connections a second, in the last part
HEAD = re.compile(r"connections (\d+)  new/s ([\d.]+)  C>S (\S+)/s  S>C (\S+)/s  "
                  r"sorted by (\w+)")


class Tmux:
    """A tmux server of our own (-L), killed at the end."""

    def __init__(self):
        self.name = f"hl-{secrets.token_hex(3)}"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.name, *args], capture_output=True,
                              text=True, timeout=10, check=check)

    def start(self, command: str, columns: int = 160, lines: int = 30) -> None:
        # The size asked for from the start (a detached session may otherwise
        # begin at tmux's default 80x24 before taking -x -y).
        self.run("-f", "/dev/null", "start-server", ";", "set-option", "-g", "default-size",
                 f"{columns}x{lines}", ";", "new-session", "-d", "-s", "top",
                 "-x", str(columns), "-y", str(lines), command)

    def resize(self, columns: int, lines: int) -> None:
        self.run("resize-window", "-t", "top", "-x", str(columns), "-y", str(lines))

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top").stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def alive(self) -> bool:
        return self.run("has-session", "-t", "top", check=False).returncode == 0

    def kill(self) -> None:
        """The server and its socket file (which tmux leaves behind)."""
        path = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / self.name
        self.run("kill-server", check=False)
        path.unlink(missing_ok=True)


@pytest.fixture
def tmux():
    server = Tmux()
    yield server
    server.kill()


@contextlib.contextmanager
def paced(topo, host: str, rate: int):
    """A connection through the daemon to host's echo server, sending rate
    bytes a second (20 chunks a second) and reading the echo: the client's
    port."""
    with topo.connect(topo.cli, host, ECHO) as sock, paced_echo(sock, rate):
        yield sock.getsockname()[1]


@contextlib.contextmanager
def new_connections(topo, rate: int):
    """rate short connections a second through the daemon (connect, a byte
    echoed, close), one every 1/rate s at most (a late one does not make
    the next ones come faster), while inside."""
    stop, failed = threading.Event(), []

    def run() -> None:
        due = time.monotonic()
        try:
            while not stop.is_set():
                with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
                    sock.sendall(b"n")
                    assert sock.recv(1) == b"n"
                due = max(due + 1 / rate, time.monotonic())
                stop.wait(due - time.monotonic())
        except BaseException as err:  # the test's failure, below
            failed.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
    assert not failed, failed


def retransmitting(topo, daemon, port: int, count: int) -> None:
    """The server drops every 4th data packet of the connection to its own
    address (the other one goes to SLOW4) until the daemon has retransmitted
    count segments on that connection's server leg."""
    def retransmits() -> int:
        header, *rows = daemon.ask("show conns full").splitlines()
        for row in rows:
            cells = dict(zip(header.split()[1:], row.split(), strict=True))
            if cells["client"].endswith(f":{port}"):
                return int(cells["s_retrans"])
        return 0
    topo.run(topo.srv, "nft", "add table inet lossy; add chain inet lossy in { type filter "
             "hook input priority 0; }; add rule inet lossy in ip daddr "
             f"{topo.SERVER4} tcp dport {ECHO} meta length > 1000 numgen inc mod 4 0 drop")
    try:
        wait_for(lambda: retransmits() >= count, 10, f"{count} retransmits")
    finally:
        topo.run(topo.srv, "nft", "delete table inet lossy")


def row_of(screen: str, port: int) -> tuple[int, list[str]]:
    """(line number, cells) of the connection from that client port."""
    for number, line in enumerate(screen.splitlines()):
        if f":{port} " in line:
            return number, line.split()
    return -1, []


def rate(cell: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)([KMG]?B)", cell).groups()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def head(screen: str) -> dict[str, str]:
    """The totals at the head: connections, new/s, C>S, S>C, sort; workers."""
    found = HEAD.search(screen)
    assert found, screen
    return {"connections": found[1], "new/s": found[2], "C>S": found[3], "S>C": found[4],
            "sort": found[5], "workers": re.search(r"\bworkers (\d+)", screen)[1]}


def test_top_shows_the_busiest_connections_and_obeys_its_keys(topo, peers, slow_server_leg,
                                                               start_daemon, tmux):
    daemon = start_daemon("-w", "2", control=True)
    with paced(topo, SLOW4, SLOW_RATE) as slow:
        time.sleep(0.3)  # an older connection, by more than top's 0.1 s of age
        with paced(topo, topo.SERVER4, FAST_RATE) as fast:
            retransmitting(topo, daemon, fast, 3)
            tmux.start(f"{CTL} -s {daemon.control_path} top")
            watch(tmux, slow, fast)
            sort_keys(tmux, slow, fast)
            with new_connections(topo, NEW_RATE):
                count_new(tmux)
            pause(tmux, slow)
    tmux.keys("q")
    wait_for(lambda: not tmux.alive(), 5, "top to quit")


def watch(tmux, slow: int, fast: int) -> None:
    """What a person running top sees of the slow and the fast transfer."""
    def both_measured():
        screen = tmux.screen()
        rows = [row_of(screen, port)[1] for port in (slow, fast)]
        return all(r and rate(r[4]) > 0 for r in rows) and screen
    screen = wait_for(both_measured, 10, "top to show both transfers")
    totals = head(screen)
    assert (totals["sort"], totals["connections"], totals["workers"]) == ("throughput", "2",
                                                                          "2"), screen
    # Both connections were there at the reading before: none new since.
    assert totals["new/s"] == "0.0", screen
    for way in ("C>S", "S>C"):  # the two transfers' rates added up
        assert 0.5 * (SLOW_RATE + FAST_RATE) < rate(totals[way]) < 1.6 * (
            SLOW_RATE + FAST_RATE), screen
    (slow_at, slow_row), (fast_at, fast_row) = row_of(screen, slow), row_of(screen, fast)
    assert fast_at < slow_at, screen  # the busiest first
    for row, expected in ((slow_row, SLOW_RATE), (fast_row, FAST_RATE)):
        assert 0.5 * expected < rate(row[4]) < 1.6 * expected, screen  # C>S/s
        assert 0.5 * expected < rate(row[5]) < 1.6 * expected, screen  # S>C/s
        assert float(row[6]) < FAST_MS, screen  # the client leg's RTT, ms: fast
        assert row[-1] == "relaying"
    # Which leg is slow: the server leg of the connection to SLOW4, only.
    assert float(slow_row[7]) >= SLOW_MS > FAST_MS > float(fast_row[7]), screen
    assert int(fast_row[9]) >= 3, screen  # S_RETR: the drops


def sort_keys(tmux, slow: int, fast: int) -> None:
    """Each key changes the order: by age the slow one (older) first, by
    retransmits the fast one, by RTT the slow one, by throughput the fast."""
    for key, sort, first in (("a", "age", slow), ("t", "retransmits", fast),
                             ("r", "rtt", slow), ("b", "throughput", fast)):
        tmux.keys(key)
        screen = wait_for(lambda s=sort: f"sorted by {s}" in (x := tmux.screen()) and x, 5,
                          f"sorted by {sort}")
        (slow_at, slow_row), (fast_at, fast_row) = row_of(screen, slow), row_of(screen, fast)
        assert (fast_at < slow_at) == (first == fast), (key, screen)
        if sort == "retransmits":
            assert int(fast_row[8]) + int(fast_row[9]) > int(slow_row[8]) + int(slow_row[9])
        if sort == "rtt":
            assert float(slow_row[7]) > max(float(fast_row[6]), float(fast_row[7])), screen


def count_new(tmux) -> None:
    """new/s at the head while NEW_RATE short connections a second are
    made, on a screen 2.5 s after they began: both readings its rate comes
    from are later than the first of them (top reads every second). A
    total instead of a rate would be past 20 by then."""
    time.sleep(2.5)
    screen = tmux.screen()
    assert 0.5 * NEW_RATE <= float(head(screen)["new/s"]) <= 1.5 * NEW_RATE, screen


def pause(tmux, slow: int) -> None:
    """p: the screen holds still (ages, rates), whatever the daemon does;
    p again: it moves on."""
    tmux.keys("p")
    held = wait_for(lambda: "[PAUSED]" in (s := tmux.screen()) and s, 5, "the pause")
    time.sleep(2.5)  # two refreshes and more
    assert tmux.screen() == held
    age = float(row_of(held, slow)[1][3])
    tmux.keys("p")
    wait_for(lambda: "[PAUSED]" not in (s := tmux.screen())
             and float(row_of(s, slow)[1][3]) >= age + 2, 5, "the view to move again")


def test_top_says_when_the_terminal_is_too_small_or_the_daemon_gone(topo, start_daemon,
                                                                    tmux):
    daemon = start_daemon(control=True)
    tmux.start(f"{CTL} -s {daemon.control_path} top", columns=60, lines=10)
    wait_for(lambda: "Terminal too small: 60x10" in tmux.screen(), 5, "too small")
    tmux.resize(160, 30)
    wait_for(lambda: "connections 0" in tmux.screen(), 5, "the view once it fits")
    daemon.stop()
    wait_for(lambda: "The daemon is gone" in tmux.screen(), 5, "the daemon gone")
    tmux.keys("q")
    wait_for(lambda: not tmux.alive(), 5, "top to quit")


def test_rows_sort_by_the_key_asked():
    def row(conn_id, age, c2s, rtt, retrans):
        return {"id": conn_id, "age_s": str(age), "bytes_c2s": str(c2s), "bytes_s2c": "0",
                "c_rtt_ms": "0.1", "s_rtt_ms": str(rtt), "c_retrans": "0",
                "s_retrans": str(retrans)}
    before = top.Sample(0.0, {}, {"1.1": row("1.1", 5, 0, 1, 0), "1.2": row("1.2", 2, 0, 1, 0)})
    now = top.Sample(1.0, {}, {"1.1": row("1.1", 6, 1000, 600.0, 0),
                               "1.2": row("1.2", 3, 5000, "-", 7)})
    assert [r["id"] for r in top.rows(now, before, "throughput")] == ["1.2", "1.1"]
    assert [r["id"] for r in top.rows(now, before, "age")] == ["1.1", "1.2"]
    assert [r["id"] for r in top.rows(now, before, "rtt")] == ["1.1", "1.2"]
    assert [r["id"] for r in top.rows(now, before, "retransmits")] == ["1.2", "1.1"]
    assert top.rows(now, before, "throughput")[0]["c2s_rate"] == 5000
