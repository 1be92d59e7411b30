"""Running out of descriptors: the daemon pauses accepting, says so once,
does not spin, and takes the waiting connections once descriptors free up."""

from __future__ import annotations

import time
from pathlib import Path

from .peers import PORTS
from .topology import Daemon, Topology

# The daemon's own descriptors (stdio, listener, epoll, eventfd) and room
# for 9 connections of two descriptors each.
NOFILE = 24
HELD = 9


class LimitedDaemon(Daemon):
    """The daemon under a hard RLIMIT_NOFILE it cannot raise."""

    @property
    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *super().command]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in ticks


def test_out_of_descriptors_backs_off_and_recovers(topo: Topology, peers, tmp_path):
    daemon = LimitedDaemon(topo, workdir=tmp_path, name="limited").start()
    try:
        daemon.wait_log(f"The open-file limit is {NOFILE} (hard)")
        port = PORTS["echo"]
        # 9 get in, 7 wait in the listen backlog.
        clients = [topo.connect(topo.cli, topo.SERVER4, port) for _ in range(HELD + 7)]
        try:
            daemon.wait_log("not accepting new connections")
            # Paused, not spinning on a listener that stays readable.
            before = cpu_seconds(daemon.pid)
            time.sleep(1.0)  # an interval to measure CPU over, not a wait
            assert cpu_seconds(daemon.pid) - before < 0.3
            for sock in clients[:3]:
                sock.sendall(b"still relayed while full\n")
                assert sock.recv(100) == b"still relayed while full\n"
            # Free descriptors: the connections waiting in the backlog get in
            # (three of them closed by their clients meanwhile).
            for sock in clients[:12]:
                sock.close()
            daemon.wait_log("Accepting connections again")
            for sock in clients[12:]:
                sock.sendall(b"late but whole\n")
                assert sock.recv(100) == b"late but whole\n"
        finally:
            for sock in clients:
                sock.close()
        assert len(daemon.lines("not accepting new connections")) == 1
    finally:
        daemon.stop()
