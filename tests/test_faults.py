"""Faults of the daemon's own making or of its host, with the real daemon:
a bug in one connection's callback, and no capability for IP_TRANSPARENT."""

from __future__ import annotations

import socket
import sys

import pytest

from lab.intercept import REPO, Daemon
from lab.peers import ECHO

NO_CAPABILITY = {
    "bounding set without CAP_NET_ADMIN and CAP_NET_RAW":
        ["setpriv", "--bounding-set", "-net_admin,-net_raw", "--"],
    "user nobody": ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                    "--"],
}


class PlantedBugDaemon(Daemon):
    @property
    def command(self) -> list[str]:
        return [sys.executable, str(REPO / "tests" / "planted_bug.py"), *self.args]


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(len(data), socket.MSG_WAITALL)


def test_a_bug_in_one_connection_closes_that_connection_only(topo, peers, tmp_path):
    daemon = PlantedBugDaemon(topo, workdir=tmp_path).start()
    try:
        baseline = len(daemon.fds())
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as good:
            assert echo(good, b"before") == b"before"
            with topo.connect(topo.cli, topo.SERVER4, ECHO) as bad:
                bad.sendall(b"BOOM and the rest")
                with pytest.raises(ConnectionResetError):  # reset, not a clean end
                    while bad.recv(4096):
                        pass
            [line] = daemon.wait_log("internal error, closing")
            assert f"-->[{topo.SERVER4}]:{ECHO} C>S: internal error" in line
            assert daemon.lines("RuntimeError: planted bug")  # the traceback is logged
            assert echo(good, b"after" * 1000) == b"after" * 1000
            assert daemon.alive()
        daemon.wait_log(": closed", count=2)
        # Small reads never take a pipe: nothing of either connection is left.
        assert len(daemon.fds()) == baseline, daemon.fds()
    finally:
        status = daemon.stop()
    assert status == 0, daemon.output()


@pytest.mark.parametrize("drop", NO_CAPABILITY.values(), ids=NO_CAPABILITY.keys())
def test_without_the_capability_it_says_which_and_exits_71(topo, drop):
    result = topo.run(topo.rtr, *drop, sys.executable, "-m", "tcp_intercept", "-f",
                      "-b", "[0.0.0.0]:[5000]", check=False, cwd=str(REPO),
                      env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert result.returncode == 71, result.stdout + result.stderr
    [error] = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "IP_TRANSPARENT" in error and "CAP_NET_ADMIN" in error


@pytest.mark.parametrize("option", ["-M", "--mptcp-listen"])
def test_mptcp_switched_off_in_the_kernel_is_refused_with_64(topo, option):
    """net.mptcp.enabled is per namespace: 0 in the router makes the kernel refuse
    IPPROTO_MPTCP sockets there, as a kernel without MPTCP does."""
    topo.run(topo.rtr, "sysctl", "-qw", "net.mptcp.enabled=0")
    try:
        result = topo.run(topo.rtr, sys.executable, "-m", "tcp_intercept", "-f", option,
                          check=False, cwd=str(REPO), env={"PYTHONPATH": str(REPO)})
    finally:
        topo.run(topo.rtr, "sysctl", "-qw", "net.mptcp.enabled=1")
    assert result.returncode == 64, result.stdout + result.stderr
    assert "Multipath TCP is not available" in result.stderr.splitlines()[0]
