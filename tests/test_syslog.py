"""Detached without -l, the daemon logs to syslog (/dev/log), as the
original did: here /dev/log is a socket of the test's own, bound over
/dev/log in a mount namespace of the daemon's (the host's /dev is not
touched), and every line arrives as one datagram."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from lab.intercept import REPO
from lab.peers import ECHO, exchange, payload, sha256
from lab.topology import listens, pid_alive, terminate, wait_for

# In a private mount namespace: a tmpfs over /dev holding the nodes the
# daemon needs (bound from the real /dev) and our socket as /dev/log.
DEV = """
set -e
mkdir -p "$1/dev"
mount --rbind /dev "$1/dev"
mount -t tmpfs -o mode=0755 none /dev
for node in null zero random urandom; do
    touch "/dev/$node"
    mount --bind "$1/dev/$node" "/dev/$node"
done
touch /dev/log
mount --bind "$1/log.sock" /dev/log
shift
exec "$@"
"""


def test_detached_without_a_log_file_every_line_goes_to_syslog(topo, peers, tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "log.sock"))
    receiver.settimeout(10)
    pid_file = tmp_path / "d.pid"
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", DEV, "dev",
               str(tmp_path), "ip", "netns", "exec", topo.rtr, sys.executable, "-m",
               "tcp_intercept", "-p", str(pid_file)]
    done = subprocess.run(command, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done
    pid = int(pid_file.read_text())
    try:
        wait_for(lambda: listens(pid, 5000), 10, "the daemon to listen")
        data = payload(5000, seed=1)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            conn_id = f"[{topo.CLIENT4}]:{sock.getsockname()[1]}-->[{topo.SERVER4}]:{ECHO}"
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
        received = []
        while not any(f"{conn_id}: closed" in line for line in received):
            try:
                received.append(receiver.recv(65536).decode())
            except TimeoutError:
                raise AssertionError(f"syslog got only {received}") from None
    finally:
        terminate(pid)
        receiver.close()
    assert not pid_alive(pid)
    # (What comes before detaching goes to the launcher's stderr.)
    assert received[0] == "<30>tcp-intercept: Setup done, starting event loop"
    mine = [line for line in received if conn_id in line]
    assert [line.split(": ", 1)[1].split(conn_id, 1)[1] for line in mine] == [
        ": Connection intercepted", f": Connecting {mine[1].split('Connecting ')[1]}",
        ": server accepted connection, splicing", " C>S: EOF", " S>C: EOF", ": closed"]
    assert all(line.startswith("<30>tcp-intercept: ") for line in mine)
