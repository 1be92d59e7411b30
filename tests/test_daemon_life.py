"""The daemon's life as an init script sees it: detaching, the pid file, a
busy port, SIGTERM, SIGINT and SIGHUP."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from lab.peers import ECHO, REFUSED, RESET, exchange, payload, sha256
from lab.topology import pid_alive, wait_for


def relay_once(topo, peers, seed: int) -> str:
    """One connection through the daemon, checked end to end; its id."""
    data = payload(10_000, seed=seed)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        conn_id = f"[{topo.CLIENT4}]:{sock.getsockname()[1]}-->[{topo.SERVER4}]:{ECHO}"
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    peers.wait_records(sha256=sha256(data))
    return conn_id


def test_launcher_exits_0_once_the_daemon_listens_and_wrote_its_pid_file(
        topo, peers, start_daemon):
    daemon = start_daemon(foreground=False, pid_file=True, log_file=True)
    assert daemon.launcher_status == 0, daemon.output()
    assert daemon.listening_at_launch, "the launcher exited before the daemon listened"
    stat = Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()
    ppid, session = int(stat[1]), int(stat[3])
    assert ppid != os.getpid() and session != os.getsid(0), "not detached"
    assert os.readlink(f"/proc/{daemon.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    relay_once(topo, peers, seed=1)


def test_second_instance_on_a_busy_port_fails_with_a_message(topo, start_daemon):
    first = start_daemon(name="first")
    second = start_daemon(foreground=False, pid_file=True, name="second")
    assert second.launcher_status not in (None, 0)
    assert "Address already in use" in second.output(), second.output()
    assert not second.pid_path.exists()
    assert first.alive()


def test_sigterm_stops_the_detached_daemon_and_removes_its_pid_file(topo, peers, start_daemon):
    daemon = start_daemon(foreground=False, pid_file=True, log_file=True)
    assert daemon.launcher_status == 0, daemon.output()
    relay_once(topo, peers, seed=2)
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: not pid_alive(daemon.pid), 10, "the daemon to exit")
    assert not daemon.pid_path.exists()
    assert daemon.lines("Received SIGTERM, exiting")


def test_sigterm_and_sigint_in_the_foreground_exit_0(topo, peers, start_daemon):
    for seed, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
        daemon = start_daemon(name=sig.name)
        relay_once(topo, peers, seed=10 + seed)
        daemon.signal(sig)
        assert daemon.proc.wait(timeout=10) == 0, daemon.output()
        assert daemon.lines(f"Received {sig.name}, exiting")


def test_sighup_reopens_the_log_file(topo, peers, start_daemon):
    daemon = start_daemon(log_file=True)
    before = relay_once(topo, peers, seed=20)
    daemon.wait_log(f"{before}: closed")
    rotated = daemon.log_path.with_suffix(".log.1")
    daemon.log_path.rename(rotated)  # what logrotate does
    daemon.signal(signal.SIGHUP)
    wait_for(daemon.log_path.exists, 10, "a new log file")
    after = relay_once(topo, peers, seed=21)
    daemon.wait_log(f"{after}: closed")
    old, new = rotated.read_text(), daemon.log_path.read_text()
    assert before in old and after not in old
    assert old.rstrip().endswith("Received SIGHUP, closing this logfile")
    assert "Received SIGHUP, (re)opening this logfile" in new
    assert after in new and before not in new


def test_quiet_logs_start_up_but_no_connections(topo, peers, start_daemon):
    daemon = start_daemon("-q")
    relay_once(topo, peers, seed=30)
    # A peer's reset and a refused connect are per-connection news too.
    with topo.connect(topo.cli, topo.SERVER4, RESET) as sock:
        sock.sendall(b"x" * 100)
        with pytest.raises(ConnectionResetError):
            while sock.recv(4096):
                pass
    with pytest.raises(ConnectionResetError):
        with topo.connect(topo.cli, topo.SERVER4, REFUSED) as sock:
            sock.recv(1)
    daemon.stop()
    assert daemon.lines("starting up") and daemon.lines("Listening on [0.0.0.0]:5000")
    assert not daemon.lines("-->"), daemon.output()


def test_pid_file_held_by_a_running_daemon_fails_with_71(topo, start_daemon):
    first = start_daemon(foreground=False, pid_file=True, log_file=True, name="holder")
    assert first.launcher_status == 0, first.output()
    # Another port, so only the pid file is in the way.
    second = start_daemon("-p", str(first.pid_path), foreground=False, name="second",
                          listen="[0.0.0.0]:[5001]")
    assert second.launcher_status == 71, second.output()
    assert f"held by running process {first.pid}" in second.output()
    assert first.pid_path.read_text().strip() == str(first.pid)


def test_unwritable_log_file_fails_with_71_and_says_why(topo, start_daemon, tmp_path):
    daemon = start_daemon("-l", str(tmp_path / "no-such-dir" / "x.log"), foreground=False)
    assert daemon.launcher_status == 71
    assert "x.log" in daemon.output() and "No such file or directory" in daemon.output()


def test_a_control_socket_another_daemon_answers_on_fails_with_71(topo, start_daemon):
    first = start_daemon(control=True, name="holder")
    # Another port, so only the control socket is in the way.
    second = start_daemon("--control", str(first.control_path), foreground=False,
                          name="second", listen="[0.0.0.0]:[5001]")
    assert second.launcher_status == 71, second.output()
    assert f"Can not create the control socket {first.control_path}: another daemon is " \
        "answering on it" in second.output()
    assert "Pid: " + str(first.pid) in first.ask("show info")  # the first one's, still
