"""Running out of descriptors: the daemon pauses accepting, says so once,
does not spin, closes the pipes nobody is using, and takes the waiting
connections once descriptors free up."""

from __future__ import annotations

import time
from pathlib import Path

from lab.peers import PORTS, echo_burst, exchange, payload, sha256
from lab.topology import Daemon, Topology

# A worker's own descriptors (stdio, listener, channel to the master,
# epoll, eventfd, the reserve: descriptors.py) and room for 8 connections
# of two descriptors each.
NOFILE = 24
HELD = 8


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
        # 8 get in, 7 wait in the listen backlog.
        clients = [topo.connect(topo.cli, topo.SERVER4, port) for _ in range(HELD + 7)]
        try:
            daemon.wait_log("not accepting new connections")
            # Paused, not spinning on a listener that stays readable.
            before = cpu_seconds(daemon.worker)
            time.sleep(1.0)  # an interval to measure CPU over, not a wait
            assert cpu_seconds(daemon.worker) - before < 0.3
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


def test_out_of_descriptors_closes_the_pipes_an_idle_stream_holds(topo: Topology, peers, tmp_path):
    """A stream keeps its pipes for a second or two after a burst (so the
    next burst splices at once); when descriptors run out they go at once."""
    daemon = LimitedDaemon(topo, workdir=tmp_path, name="shedding").start()
    try:
        daemon.wait_log(f"The open-file limit is {NOFILE} (hard)")
        burst, tail = payload(4 << 20, seed=40), payload(1000, seed=41)
        with topo.connect(topo.cli, topo.SERVER4, PORTS["echo"]) as bulk:
            bulk.settimeout(10)
            assert echo_burst(bulk, burst) == sha256(burst)
            assert daemon.pipes(), "the burst went through without pipes"
            # 2 sockets and 4 pipe ends in use: room for 5 more connections, not 8.
            clients = [topo.connect(topo.cli, topo.SERVER4, PORTS["echo"]) for _ in range(HELD)]
            try:
                daemon.wait_log("not accepting new connections")
                assert not daemon.pipes(), "pipes kept while out of descriptors"
                assert exchange(bulk, tail) == (len(tail), sha256(tail), "eof")
            finally:
                for sock in clients:
                    sock.close()
    finally:
        daemon.stop()
