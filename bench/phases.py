"""The measurements of one path (direct or through the daemon), in one topology.

A World is a built Topology with the echo server running in the server
namespace, and, for the proxied path, tcp-interceptd in the router. Each
phase drives clients in the client namespace (iperf3, bench/loadgen.py) and
returns raw numbers; the daemon's CPU, memory and descriptors are read from
/proc around it. Order within a path (see PHASES): the small and idle things
first, before any bulk transfer has grown the daemon's pipe pool (its idle
pipes are trimmed every 5 s and would blur the descriptor count), the
connection rate last (it leaves tens of thousands of TIME_WAIT sockets).
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lab.netns import terminate
from lab.topology import Daemon, Topology, TopologyError, wait_for

from . import procfs

BENCH = Path(__file__).resolve().parent
LOADGEN, ECHO_SERVER = BENCH / "loadgen.py", BENCH / "echo_server.py"
ECHO_PORT, IPERF_PORT = 7007, 5201
GB = 1e9


@dataclass(frozen=True)
class Profile:
    """How long and how big each phase is."""

    iperf_seconds: int
    iperf_omit: int
    rate_seconds: float
    pings: int
    ping_warmup: int
    idle: int
    concurrent: int
    inflight: int = 32
    loadgen_procs: int = 1


@dataclass
class World:
    topo: Topology
    profile: Profile
    daemon: Daemon | None = None

    @property
    def proxied(self) -> bool:
        return self.daemon is not None

    def loadgen(self, *args: str, timeout: float) -> dict:
        result = self.topo.run(self.topo.cli, sys.executable, str(LOADGEN), *args,
                               "--host", Topology.SERVER4, "--port", str(ECHO_PORT),
                               timeout=timeout)
        return json.loads(result.stdout.splitlines()[-1])

    def daemon_cpu(self) -> float:
        return procfs.cpu_seconds(self.daemon.pid) if self.daemon else 0.0

    def check_daemon(self, phase: str) -> None:
        if self.daemon and not self.daemon.alive():
            raise TopologyError(f"the daemon died during {phase}:\n{self.daemon.output()[-4000:]}")


def pingpong(world: World) -> dict:
    p = world.profile
    return world.loadgen("pingpong", "--count", str(p.pings), "--warmup", str(p.ping_warmup),
                         timeout=60 + p.pings / 1000)


# -- bulk ---------------------------------------------------------------------

def iperf(world: World, streams: int, reverse: bool) -> dict:
    """One iperf3 run against a fresh one-shot server; Gbit/s at the receiver."""
    topo, p = world.topo, world.profile
    server = topo.serve(topo.srv, IPERF_PORT, "iperf3", "-s", "-1", "-p", str(IPERF_PORT),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cmd = ["iperf3", "-c", Topology.SERVER4, "-p", str(IPERF_PORT), "-t", str(p.iperf_seconds),
           "-O", str(p.iperf_omit), "-P", str(streams), "-J", *(["-R"] if reverse else [])]
    cpu, busy = world.daemon_cpu(), procfs.machine_busy_seconds()
    result = topo.run(topo.cli, *cmd, timeout=p.iperf_seconds + p.iperf_omit + 30, check=False)
    cpu, busy = world.daemon_cpu() - cpu, procfs.machine_busy_seconds() - busy
    server.wait(timeout=10)
    report = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "error" in report:
        raise TopologyError(f"{' '.join(cmd)}: {report.get('error', result.stderr)}")
    # Every byte of the run, the omitted seconds too: the CPU window covers them.
    moved = sum(i["sum"]["bytes"] for i in report["intervals"]) or \
        report["end"]["sum_received"]["bytes"]
    return {"streams": streams, "reverse": reverse,
            "gbps": report["end"]["sum_received"]["bits_per_second"] / 1e9,
            "bytes": moved, "daemon_cpu_s": cpu, "machine_busy_s": busy,
            "retransmits": report["end"]["sum_sent"].get("retransmits")}


def bulk(world: World) -> dict:
    runs = {}
    for streams in (1, 8):
        for reverse in (False, True):
            runs[f"{'s2c' if reverse else 'c2s'}_{streams}"] = iperf(world, streams, reverse)
            world.check_daemon("iperf3")
    moved = sum(r["bytes"] for r in runs.values())
    return {"runs": runs, "bytes": moved,
            "daemon_cpu_s_per_gb": sum(r["daemon_cpu_s"] for r in runs.values()) / (moved / GB),
            "machine_cpu_s_per_gb": sum(r["machine_busy_s"] for r in runs.values()) / (moved / GB)}


# -- connections ----------------------------------------------------------------

def rate(world: World) -> dict:
    p = world.profile
    cpu = world.daemon_cpu()
    result = world.loadgen("rate", "--inflight", str(p.inflight), "--duration",
                           str(p.rate_seconds), "--procs", str(p.loadgen_procs),
                           timeout=p.rate_seconds + 60)
    cpu = world.daemon_cpu() - cpu
    total = result["completed"] + result["errors"]
    result["daemon_cpu_us_per_conn"] = cpu / total * 1e6 if world.proxied and total else None
    result["loadgen_cpu_share"] = result["loadgen_cpu_s"] / p.rate_seconds
    return result


class Held:
    """loadgen.py hold in the client namespace, spoken to line by line."""

    def __init__(self, world: World, count: int, timeout: float):
        self.timeout = timeout
        self.proc = world.topo.popen(
            world.topo.cli, sys.executable, str(LOADGEN), "hold", "--count", str(count),
            "--host", Topology.SERVER4, "--port", str(ECHO_PORT),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def answer(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise TopologyError(f"loadgen hold: no answer within {self.timeout} s "
                                f"(exit status {self.proc.poll()})")
        return json.loads(line)

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Never raises: a load generator that died or hangs is stopped by pid."""
        with contextlib.suppress(OSError):
            self.tell("close")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            terminate(self.proc)
        self.proc.stdout.close()


def hold(world: World, count: int) -> dict:
    """count connections open at once: the daemon's memory and descriptors per
    connection while they are idle, whether each still relays, and whether the
    daemon gives everything back once they close."""
    pid = world.daemon.pid if world.daemon else None
    before = procfs.memory(pid) if pid else None
    held = Held(world, count, timeout=60 + count / 200)
    try:
        opened = held.answer()
        time.sleep(1.0)  # let the last connections settle (the rig holds 1 s too)
        during = procfs.memory(pid) if pid else None
        checked = (held.tell("check"), held.answer())[1]
    finally:
        held.close()
    result = {"count": count, "opened": opened["opened"], "open_errors": opened["errors"],
              "open_error_kinds": opened["error_kinds"], "open_s": opened["open_s"],
              "relaying": checked["relaying"], "relay_errors": checked["failed"],
              "relay_error_kinds": checked["error_kinds"]}
    if pid:
        result.update(per_connection(before, during, opened["opened"]))
        result["fds_left_after_close"] = settle_fds(pid, before["fds"]) - before["fds"]
    world.check_daemon("the held connections")
    return result


def per_connection(before: dict, during: dict, opened: int) -> dict:
    n = max(opened, 1)
    return {"before": before, "during": during,
            "rss_kib_per_conn": (during["rss_kib"] - before["rss_kib"]) / n,
            "pss_kib_per_conn": (during["pss_kib"] - before["pss_kib"]) / n,
            "fds_per_conn": (during["fds"] - before["fds"]) / n}


def settle_fds(pid: int, baseline: int, timeout: float = 20) -> int:
    """The daemon's descriptor count once it is back to baseline (or after timeout)."""
    try:
        wait_for(lambda: procfs.memory(pid)["fds"] <= baseline, timeout, "the daemon to close")
    except TopologyError:
        pass
    return procfs.memory(pid)["fds"]


def idle(world: World) -> dict:
    return hold(world, world.profile.idle)


def concurrent(world: World) -> dict:
    return hold(world, world.profile.concurrent)


PHASES = {"pingpong": pingpong, "idle": idle, "concurrent": concurrent, "bulk": bulk,
          "rate": rate}
