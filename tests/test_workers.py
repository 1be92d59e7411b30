"""Several workers (-w): connections spread over them, a worker that dies is
replaced while the others go on relaying, and signals to the master mean
what they meant with one process."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from datetime import datetime

from lab.intercept import installed_copy
from lab.peers import ECHO, exchange, payload, read_to_eof, sha256
from lab.ss import owners
from lab.topology import pid_alive, wait_for

def test_connections_land_on_both_workers(topo, peers, start_daemon):
    daemon = start_daemon("-w", "2")
    workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10,
                       "two workers")
    socks = [topo.connect(topo.cli, topo.SERVER4, ECHO) for _ in range(40)]
    try:
        for n, sock in enumerate(socks):
            data = payload(1000, seed=n)
            sock.sendall(data)
            assert sock.recv(len(data), socket.MSG_WAITALL) == data
        seen = owners(topo, topo.CLIENT4)
        assert set(seen) == set(workers), f"sockets owned by {seen}, workers {workers}"
        assert sum(seen.values()) == 40
        assert daemon.pid not in seen, "the master holds a connection"
    finally:
        for sock in socks:
            sock.close()


def test_a_killed_worker_is_replaced_and_the_others_transfer_goes_on(topo, peers,
                                                                    start_daemon):
    daemon = start_daemon("-w", "2", log_file=True, control=True)
    wait_for(lambda: len(daemon.workers()) == 2, 10, "two workers")
    data = payload(8 << 20, seed=7)
    killed_at: list[float] = []

    def kill(pid: int) -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    with topo.connect(topo.cli, topo.SERVER4, ECHO) as held:
        held.settimeout(30)
        [holder] = owners(topo, topo.CLIENT4)
        [victim] = set(daemon.workers()) - {holder}
        # Half the bytes, the other worker killed, the other half.
        sender = threading.Thread(target=_send_in_halves, args=(held, data), daemon=True)
        killer = threading.Timer(0.15, kill, args=(victim,))
        sender.start()
        killer.start()
        got = read_to_eof(held)
        sender.join(timeout=30)
        killer.join(timeout=5)
    assert got == (len(data), sha256(data), "eof"), "the held transfer was damaged"
    new = wait_for(lambda: len(daemon.workers()) == 2 and victim not in daemon.workers()
                   and daemon.workers(), 5, "a new worker")
    assert holder in new
    [noticed] = daemon.wait_log(f"(pid {victim}) was killed by SIGKILL; starting another")
    replaced = [w for w in new if w != holder][0]
    started = float(open(f"/proc/{replaced}/stat").read().rsplit(")", 1)[1].split()[19])
    started /= os.sysconf("SC_CLK_TCK")
    # At once, not after the 1 s a second young death waits: the master forks
    # right after logging the death (a span free of the machine's load, unlike
    # one measured from the kill).
    assert started - _uptime_at_stamp(noticed) < 0.5
    assert started > _uptime_at(killed_at[0]) - 0.02  # /proc counts in 10 ms ticks
    assert daemon.info()["Worker_restarts"] == "1"
    for n in range(10):  # and both serve
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            small = payload(100, seed=100 + n)
            assert exchange(sock, small) == (100, sha256(small), "eof")


def _uptime_at(monotonic: float) -> float:
    """The system's uptime (the clock of /proc/PID/stat's start time) at a
    time.monotonic() reading."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - (time.monotonic() - monotonic)


def _uptime_at_stamp(line: str) -> float:
    """The system's uptime when a log line was stamped (ms, local time)."""
    wall = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return time.clock_gettime(time.CLOCK_BOOTTIME) - (time.time() - wall)


def _send_in_halves(sock, data: bytes) -> None:
    half = len(data) // 2
    sock.sendall(data[:half])
    time.sleep(0.3)
    sock.sendall(data[half:])
    sock.shutdown(1)  # SHUT_WR


def test_the_launcher_waits_for_every_worker(topo, peers, start_daemon, tmp_path):
    """-w 3, the last worker 1 s slow to start: the launcher exits 0 only once
    all three serve."""
    install = installed_copy(tmp_path)
    with open(install / "tcp_intercept" / "worker.py", "a") as module:
        module.write("\nimport time as _time\n"
                     "_init = Worker.__init__\n"
                     "def _slow_init(self, config, number, *rest):\n"
                     "    if number == 2:\n"
                     "        _time.sleep(1)\n"
                     "    _init(self, config, number, *rest)\n"
                     "Worker.__init__ = _slow_init\n")
    daemon = start_daemon("-w", "3", foreground=False, pid_file=True, log_file=True,
                          control=True, repo=install)
    assert daemon.launcher_status == 0, daemon.output()
    # Asked the moment the launcher exited: all three serve already.
    workers = [line for line in daemon.info_at_launch.splitlines()
               if line.startswith("Process: worker")]
    assert len(workers) == 3 and all("state=serving" in w for w in workers), workers


def test_sigterm_to_the_master_stops_every_worker_and_removes_the_pid_file(topo, peers,
                                                                           start_daemon):
    daemon = start_daemon("-w", "3", foreground=False, pid_file=True, log_file=True)
    assert daemon.launcher_status == 0, daemon.output()
    workers = wait_for(lambda: len(daemon.workers()) == 3 and daemon.workers(), 10,
                       "three workers")
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
        daemon.signal(signal.SIGTERM)
        assert sock.recv(1) == b"", "the connection was not closed"
    wait_for(lambda: not pid_alive(daemon.pid), 10, "the master to exit")
    assert not any(pid_alive(pid) for pid in workers)
    assert not daemon.pid_path.exists()
    assert daemon.lines("Received SIGTERM, exiting") and daemon.lines("Exiting cleanly")


def test_a_worker_that_cannot_start_fails_the_launch_with_71(topo, start_daemon, tmp_path):
    """The launcher waits for every worker: one that dies before it serves
    is the daemon's start-up failure, reported with its reason."""
    install = installed_copy(tmp_path)
    worker = install / "tcp_intercept" / "worker.py"
    worker.write_text(worker.read_text() + (
        "\n\ndef _planted(*args, **kwargs):\n"
        "    raise RuntimeError('planted: this worker cannot start')\n\n\n"
        "Worker.run = _planted\n"))
    daemon = start_daemon(foreground=False, pid_file=True, log_file=True, repo=install)
    assert daemon.launcher_status == 71, daemon.output()
    assert "Worker 1 exited with status 70 during start-up" in daemon.output()
    assert "RuntimeError: planted: this worker cannot start" in daemon.output()
    assert not daemon.pid_path.exists()
    assert "5000" not in topo.run(topo.rtr, "ss", "-Htln").stdout


def test_the_masters_line_about_a_signal_stands_after_the_workers_earlier_lines(
        topo, peers, start_daemon):
    """The workers hold their connection lines up to 50 ms (logs.py); at a
    signal the master has them written out before its own line."""
    daemon = start_daemon("-w", "2", log_file=True)
    wait_for(lambda: len(daemon.workers()) == 2, 10, "two workers")
    for n in range(20):
        data = payload(100, seed=n)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            # The client's EOF comes from the callback that closes (and logs).
            assert exchange(sock, data) == (100, sha256(data), "eof")
    daemon.signal(signal.SIGUSR1)  # at once: the last lines are still held
    daemon.wait_log("show conns: # worker")
    text = daemon.log_path.read_text().splitlines()
    received = next(i for i, line in enumerate(text) if "Received SIGUSR1" in line)
    closed = [i for i, line in enumerate(text) if line.endswith(": closed")]
    assert len(closed) == 20 and max(closed) < received, "\n".join(text[-30:])


COUNTED = ("Connections_accepted", "Closed_clean", "Bytes_c2s", "Bytes_s2c")


def test_counters_never_go_back_when_a_worker_dies_or_an_upgrade_replaces_them(
        topo, peers, start_daemon):
    daemon = start_daemon("-w", "2", control=True, log_file=True)
    wait_for(lambda: len(daemon.workers()) == 2, 10, "two workers")
    for n in range(20):  # over both workers
        data = payload(1000 + n, seed=300 + n)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
    wait_for(lambda: daemon.info()["Closed_clean"] == "20", 10, "20 connections counted")
    before = {key: daemon.info()[key] for key in COUNTED}
    assert before["Connections_accepted"] == "20"

    workers = daemon.workers()
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: len(daemon.workers()) == 2 and workers[0] not in daemon.workers(), 10,
             "the killed worker replaced")
    info = daemon.info()
    assert {key: info[key] for key in COUNTED} == before
    assert info["Worker_restarts"] == "1"
    assert "tcp_intercept_worker_restarts_total 1.0" in daemon.ask("show metrics").splitlines()

    old = daemon.workers()
    daemon.signal(signal.SIGUSR2)
    daemon.wait_log("Upgrade done", timeout=20)
    wait_for(lambda: not set(old) & set(daemon.workers()), 10, "the old workers to exit")
    info = daemon.info()
    assert {key: info[key] for key in COUNTED} == before
    assert info["Worker_restarts"] == "1"  # workers replaced by an upgrade did not die
