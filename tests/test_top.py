"""tcp-intercept-ctl top, run for real in tmux (a server of its own) against
a daemon relaying two transfers of known rates: what a person would see on
the screen (capture-pane), the order after a key press, pause and quit; a
terminal too small; the daemon gone."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from tcp_intercept import top

from lab.intercept import REPO
from lab.peers import ECHO, paced_echo
from lab.topology import wait_for

CTL = str(REPO / ".venv" / "bin" / "tcp-intercept-ctl")
SLOW_RATE, FAST_RATE = 100_000, 400_000  # bytes a second, each way (echoed)


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
def paced(topo, rate: int):
    """A connection through the daemon sending rate bytes a second (20 chunks
    a second) to the echo server and reading the echo: the client's port."""
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock, paced_echo(sock, rate):
        yield sock.getsockname()[1]


def row_of(screen: str, port: int) -> tuple[int, list[str]]:
    """(line number, cells) of the connection from that client port."""
    for number, line in enumerate(screen.splitlines()):
        if f":{port} " in line:
            return number, line.split()
    return -1, []


def rate(cell: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)([KMG]?B)", cell).groups()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_top_shows_the_busiest_connections_and_obeys_its_keys(topo, peers, start_daemon,
                                                               tmux):
    daemon = start_daemon("-w", "2", control=True)
    with paced(topo, SLOW_RATE) as slow:
        time.sleep(0.3)  # an older connection, by more than top's 0.1 s of age
        with paced(topo, FAST_RATE) as fast:
            watch(tmux, daemon, slow, fast)


def watch(tmux, daemon, slow: int, fast: int) -> None:
    """What a person running top sees of the slow and the fast transfer."""
    tmux.start(f"{CTL} -s {daemon.control_path} top")

    def both_measured():
        screen = tmux.screen()
        rows = [row_of(screen, port)[1] for port in (slow, fast)]
        return all(r and rate(r[4]) > 0 for r in rows) and screen
    screen = wait_for(both_measured, 10, "top to show both transfers")
    assert "sorted by throughput" in screen and "connections 2" in screen
    (slow_at, slow_row), (fast_at, fast_row) = row_of(screen, slow), row_of(screen, fast)
    assert fast_at < slow_at, screen  # the busiest first
    for row, expected in ((slow_row, SLOW_RATE), (fast_row, FAST_RATE)):
        assert 0.5 * expected < rate(row[4]) < 1.6 * expected, screen  # C>S/s
        assert 0.5 * expected < rate(row[5]) < 1.6 * expected, screen  # S>C/s
        assert float(row[6]) < 20 and float(row[7]) < 20, screen  # both legs' RTT, ms
        assert row[-1] == "relaying"
    tmux.keys("a")  # by age: the slow one began first
    screen = wait_for(lambda: "sorted by age" in (s := tmux.screen()) and s, 5, "age")
    assert row_of(screen, slow)[0] < row_of(screen, fast)[0], screen
    tmux.keys("p")
    wait_for(lambda: "[PAUSED]" in tmux.screen(), 5, "the pause")
    tmux.keys("q")
    wait_for(lambda: not tmux.alive(), 5, "top to quit")


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
