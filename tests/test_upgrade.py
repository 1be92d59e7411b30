"""The seamless upgrade: SIGUSR2 to the master re-executes the installed
program in place; under load no connection is refused, dropped or cut;
connections waiting in a listener's queue at the hand-over are served; a
broken install leaves the old daemon serving."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from lab.intercept import installed_copy
from lab.load import ShortConnections
from lab.peers import ECHO, payload, sha256
from lab.topology import pid_alive, wait_for


class Trickle(threading.Thread):
    """A long connection through the daemon sending a piece every 0.1 s for
    `seconds`, reading the echo back: (bytes, SHA-256 sent, SHA-256 echoed)."""

    def __init__(self, topo, seed: int, seconds: float = 4.0):
        super().__init__(daemon=True)
        self.sock = topo.connect(topo.cli, topo.SERVER4, ECHO)
        self.sock.settimeout(10)
        self.data = payload(int(seconds * 10) * 1000, seed=seed)
        self.echoed = hashlib.sha256()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.sock:
                for start in range(0, len(self.data), 1000):
                    piece = self.data[start:start + 1000]
                    self.sock.sendall(piece)
                    self.echoed.update(self.sock.recv(len(piece), socket.MSG_WAITALL))
                    time.sleep(0.1)
                self.sock.shutdown(socket.SHUT_WR)
                assert self.sock.recv(1) == b""
        except BaseException as err:  # checked by the test
            self.error = err

    def intact(self) -> bool:
        return self.error is None and self.echoed.hexdigest() == sha256(self.data)


def upgraded(daemon) -> list[str]:
    return daemon.wait_log("Upgrade done", timeout=20)


def test_an_upgrade_under_load_loses_nothing(topo, peers, start_daemon):
    daemon = start_daemon("-w", "2", control=True, log_file=True)
    old = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "workers")
    listeners_before = _listening_sockets(topo)
    trickles = [Trickle(topo, seed=n) for n in range(6)]
    for trickle in trickles:
        trickle.start()
    with ShortConnections(topo, threads=6) as load:
        load.wait_for(200)
        before = load.total
        daemon.signal(signal.SIGUSR2)
        upgraded(daemon)
        load.wait_for(load.total + 300)
        during = load.total - before
        for trickle in trickles:
            trickle.join(timeout=20)
    assert not load.failed, f"{dict(load.failed)} of {load.total} short connections failed"
    assert during >= 300
    assert all(t.intact() for t in trickles), [t.error for t in trickles]
    assert daemon.alive() and int(daemon.info()["Pid"]) == daemon.pid
    # The old workers left once their connections ended; new ones serve.
    wait_for(lambda: not any(pid_alive(pid) for pid in old), 10, "the old workers to exit")
    new = daemon.workers()
    assert len(new) == 2 and not set(new) & set(old)
    assert daemon.info()["Workers"] == "2"
    # The very same listening sockets: none was closed and made anew.
    assert _listening_sockets(topo) == listeners_before


def _listening_sockets(topo) -> list[str]:
    out = topo.run(topo.rtr, "ss", "-Htlne", "sport", "= :5000").stdout
    return sorted(word for line in out.splitlines() for word in line.split()
                  if word.startswith("ino:"))


def test_connections_queued_at_the_hand_over_are_served(topo, peers, start_daemon):
    """Connections waiting in the accept queue of a listening socket whose
    worker is being replaced: with a new socket per new worker, closing the
    old one would reset them. The sockets are kept, and the new worker
    takes them from the very same queue."""
    daemon = start_daemon(control=True, log_file=True)
    [old] = wait_for(lambda: len(daemon.workers()) == 1 and daemon.workers(), 10, "worker")
    os.kill(old, signal.SIGSTOP)  # accepts nothing: connections queue up
    try:
        queued = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(20)]
        daemon.signal(signal.SIGUSR2)
        upgraded(daemon)
    finally:
        os.kill(old, signal.SIGCONT)
    for n, sock in enumerate(queued):
        with sock:
            data = payload(2000, seed=50 + n)
            sock.sendall(data)
            assert sock.recv(len(data), socket.MSG_WAITALL) == data
    wait_for(lambda: not pid_alive(old), 10, "the old worker to exit")


@pytest.mark.parametrize("breakage", ["import error", "option refused"])
def test_a_broken_install_leaves_the_old_daemon_serving(topo, peers, start_daemon,
                                                        tmp_path, breakage):
    install = installed_copy(tmp_path)
    daemon = start_daemon("-w", "2", control=True, log_file=True, repo=install)
    workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "workers")
    if breakage == "import error":
        (install / "tcp_intercept" / "worker.py").write_text("raise ImportError('broken')\n")
    else:  # a program that no longer takes an option of the running command line
        config = install / "tcp_intercept" / "config.py"
        config.write_text(config.read_text().replace('("--control",)', '("--kontrol",)'))
    daemon.signal(signal.SIGUSR2)
    [line] = daemon.wait_log("Upgrade aborted, this program goes on")
    assert ("ImportError: broken" if breakage == "import error" else "control") in line, line
    assert daemon.workers() == workers and daemon.alive()
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"still here")
        assert sock.recv(10, socket.MSG_WAITALL) == b"still here"
    assert daemon.info()["Workers"] == "2"


def test_new_workers_accept_even_if_the_old_ones_never_say_drained(topo, peers, start_daemon,
                                                                   tmp_path):
    """The new worker N waits for the old worker N's "drained" before it
    accepts (channel.py). Old workers that never say it (an older program,
    or one stuck) hold it back a second at most: once they stop accepting,
    a connection is served only if the new one took over anyway."""
    install = installed_copy(tmp_path)
    worker = install / "tcp_intercept" / "worker.py"
    text = worker.read_text()
    assert text.count("self.channel.send(Word.DRAINED)") == 2
    worker.write_text(text.replace("self.channel.send(Word.DRAINED)", "pass"))
    daemon = start_daemon(control=True, log_file=True, repo=install)
    [old] = wait_for(lambda: len(daemon.workers()) == 1 and daemon.workers(), 10, "worker")
    # A connection keeps the old worker draining (else its exit lets the new one go).
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as held:
        held.sendall(b"held")
        assert held.recv(4, socket.MSG_WAITALL) == b"held"
        daemon.signal(signal.SIGUSR2)
        upgraded(daemon)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            sock.settimeout(10)
            sock.sendall(b"served")
            assert sock.recv(6, socket.MSG_WAITALL) == b"served"
        assert pid_alive(old)
    wait_for(lambda: not pid_alive(old), 10, "the old worker to exit")
    [new] = daemon.workers()
    assert new != old


def test_a_slow_check_holds_up_nothing(topo, peers, start_daemon, tmp_path):
    """While the installed program's check is still starting (it waits for
    a gate the test opens last), the master answers the control socket and
    replaces a killed worker; then the upgrade goes on. No clock: all of it
    happens while the check is held."""
    install = installed_copy(tmp_path)
    daemon = start_daemon("-w", "2", control=True, log_file=True, repo=install)
    workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "workers")
    gate = tmp_path / "gate"
    with open(install / "tcp_intercept" / "worker.py", "a") as module:
        module.write("\nimport os as _os\nimport time as _time\n"
                     "if _os.environ.get('TCP_INTERCEPT_UPGRADE_CHECK'):\n"
                     f"    while not _os.path.exists({str(gate)!r}):\n"
                     "        _time.sleep(0.05)\n")
    daemon.signal(signal.SIGUSR2)
    daemon.wait_log("Received SIGUSR2, upgrading")
    assert daemon.info()["Workers"] == "2"
    os.kill(workers[0], signal.SIGKILL)
    daemon.wait_log("Worker 1 (pid")
    wait_for(lambda: daemon.info()["Worker_restarts"] == "1", 10, "worker 1 replaced")
    assert not daemon.lines("The installed program starts")  # the check is still held
    gate.touch()
    upgraded(daemon)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"upgraded")
        assert sock.recv(8, socket.MSG_WAITALL) == b"upgraded"


def test_the_histograms_go_on_through_an_upgrade(topo, peers, start_daemon):
    """--leg-stats: the histograms' memfd is handed over like the counters'."""
    daemon = start_daemon("-w", "2", "--leg-stats", control=True, log_file=True)

    def closed(count: int) -> None:
        for _ in range(count):
            with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
                sock.sendall(b"h" * 100)
                assert sock.recv(100, socket.MSG_WAITALL) == b"h" * 100
        wait_for(lambda: daemon.info()["Connections_open"] == "0", 10, "closes")

    def observed() -> float:
        [value] = [line.split()[-1] for line in daemon.ask("show metrics").splitlines()
                   if line.startswith("tcp_intercept_connection_duration_seconds_count")]
        return float(value)

    closed(3)
    assert observed() == 3
    daemon.signal(signal.SIGUSR2)
    upgraded(daemon)
    assert observed() == 3
    closed(2)
    assert observed() == 5


def test_a_check_that_never_finishes_is_killed_after_30_s(topo, peers, start_daemon, tmp_path):
    """The README's promise: the installed program's check gets 30 s, then
    it is killed and the running daemon carries on (30 s of this test)."""
    install = installed_copy(tmp_path)
    daemon = start_daemon("-w", "2", control=True, log_file=True, repo=install)
    workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "workers")
    check_pid = tmp_path / "check.pid"
    with open(install / "tcp_intercept" / "worker.py", "a") as module:
        module.write("\nimport os as _os\nimport time as _time\n"
                     "if _os.environ.get('TCP_INTERCEPT_UPGRADE_CHECK'):\n"
                     f"    open({str(check_pid)!r}, 'w').write(str(_os.getpid()))\n"
                     "    while True:\n"
                     "        _time.sleep(1)\n")
    signalled = time.monotonic()
    daemon.signal(signal.SIGUSR2)
    [line] = daemon.wait_log("Upgrade aborted, this program goes on", timeout=60)
    assert time.monotonic() - signalled >= 30
    assert "did not finish within 30 s" in line, line
    assert not pid_alive(int(check_pid.read_text()))
    assert daemon.workers() == workers and daemon.alive()
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"still me")
        assert sock.recv(8, socket.MSG_WAITALL) == b"still me"


def test_drain_timeout_resets_what_old_workers_still_hold(topo, peers, start_daemon):
    """--drain-timeout 1: after the upgrade, an old worker resets the
    connections it still holds 1 s later (never sooner) and exits; a
    connection to the new workers is untouched."""
    daemon = start_daemon("-w", "2", "--drain-timeout", "1", control=True, log_file=True)
    old = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "workers")
    held = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(4)]
    try:
        for sock in held:
            sock.sendall(b"held")
            assert sock.recv(4, socket.MSG_WAITALL) == b"held"
        signalled = time.monotonic()
        daemon.signal(signal.SIGUSR2)
        upgraded(daemon)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as new:
            new.sendall(b"new")
            assert new.recv(3, socket.MSG_WAITALL) == b"new"
            for sock in held:
                with pytest.raises(ConnectionResetError):
                    sock.recv(1)  # within the client's 10 s
            assert time.monotonic() - signalled >= 1
            wait_for(lambda: not set(old) & set(daemon.workers()), 10, "the old workers' exit")
            new.sendall(b"still")
            assert new.recv(5, socket.MSG_WAITALL) == b"still"
    finally:
        for sock in held:
            sock.close()
    lines = daemon.lines("Drain timeout: closing the last ")
    assert sum(int(line.split("closing the last ")[1].split()[0]) for line in lines) == 4
