#!/usr/bin/env python3
"""What one short connection costs the proxy: system calls and CPU.

    bench/percall.sh [--rounds N] [--seconds S] [--no-haproxy] [--against DIR]

Each round, for each proxy in turn (the order reversed every other round),
a fresh topology (lab/topology.py) with the echo server, the proxy in
the router, and two rate loads (bench/loadgen.py: 32 in flight, connect,
100 B each way, close):

  cpu       S seconds; the proxy's user and system CPU (master and workers,
            from /proc) divided by the connections made: µs per connection,
            and the connection rate
  syscalls  S seconds with `strace -c -f` attached to every process of the
            proxy; the calls it counted divided by the connections made
            (strace slows the proxy: only the counts are read from it)

Proxies: tcp-interceptd as the package runs it (-B client, logging to a
file), with -q, and, when haproxy is installed, HAProxy with `source 0.0.0.0
usesrc clientip` (the same spoofing). Reported: medians over the rounds,
and each proxy's rate and CPU as a share of HAProxy's of the same rounds.
Needs root and strace. Touches nothing outside its namespaces; bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import procfs  # noqa: E402
from bench.phases import Profile, World  # noqa: E402
from bench.run import raise_descriptor_limit  # noqa: E402
from bench.variants import rate, world_for  # noqa: E402
from lab.netns import listens, terminate, wait_for  # noqa: E402
from lab.topology import Daemon  # noqa: E402

HAPROXY_CFG = """\
global
    maxconn 6000
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend intercept
    bind 0.0.0.0:5000 transparent
    default_backend original
backend original
    source 0.0.0.0 usesrc clientip
    server dst 0.0.0.0
"""
DAEMON = ("-B", "client")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Proxy:
    """One proxy under test, started in a topology's router."""

    def __init__(self, name: str, workdir: Path, repo: Path | None = None):
        self.name = name
        self.workdir = workdir
        self.repo = repo  # another checkout's daemon (--against)
        self.daemon: Daemon | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, topo) -> int:
        """Start it; its (master's) pid."""
        if self.name == "haproxy-usesrc":
            cfg = self.workdir / "haproxy.cfg"
            cfg.write_text(HAPROXY_CFG)
            self.proc = topo.popen(topo.rtr, "haproxy", "-f", str(cfg), "-db",
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: listens(self.proc.pid, 5000), 10, "haproxy to listen")
            return self.proc.pid
        args = [*DAEMON, "-q"] if self.name.startswith("tcp-interceptd -q") else list(DAEMON)
        self.daemon = Daemon(topo, *args, workdir=self.workdir, name="percall",
                             log_file="-q" not in self.name, repo=self.repo).start()
        return self.daemon.pid

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.proc is not None:
            terminate(self.proc)


def strace_counts(pids: list[int], seconds: float, world: World) -> tuple[Counter, int]:
    """({system call: count}, connections) over a rate load of `seconds`
    with strace attached to pids."""
    report = Path(tempfile.mktemp(prefix="ti-percall-", suffix=".strace"))
    attach = [arg for pid in pids for arg in ("-p", str(pid))]
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(report), *attach],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # strace attaches to every thread
        result = world.loadgen("rate", "--inflight", str(world.profile.inflight),
                               "--duration", str(seconds), timeout=seconds + 60)
    finally:
        tracer.send_signal(signal.SIGINT)  # detach, and write the summary
        tracer.wait(30)
    counts: Counter = Counter()
    for line in report.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
            # % time, seconds, usecs/call, calls, [errors,] syscall
            counts[fields[-1]] += int(fields[3])
    report.unlink()
    return counts, result["completed"] + result["errors"]


def measure(name: str, seconds: float, workdir: Path, against: Path | None) -> dict:
    topo = world_for(True)
    proxy = Proxy(name, workdir, against if name.endswith(" (against)") else None)
    try:
        pid = proxy.start(topo)
        profile = Profile(iperf_seconds=0, iperf_omit=0, rate_seconds=seconds, pings=0,
                          ping_warmup=0, idle=0, concurrent=0)
        world = World(topo, profile, proxy.daemon)
        if proxy.daemon is None:  # variants.rate reads the daemon's pid
            world.daemon = _Pid(pid)
        found = rate(world)
        pids = [pid, *procfs.children(pid)]
        counts, connections = strace_counts(pids, seconds, world)
        for skipped in ("wait4", "restart_syscall"):  # a master waiting, not working
            counts.pop(skipped, None)
        found["syscalls_per_conn"] = sum(counts.values()) / connections
        found["syscalls"] = {call: round(n / connections, 2)
                             for call, n in counts.most_common() if n / connections >= 0.05}
        return found
    finally:
        proxy.stop()
        topo.down()


class _Pid:
    """What variants.rate reads of a daemon: its pid."""

    def __init__(self, pid: int):
        self.pid = pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-haproxy", action="store_true")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="also another checkout's daemon with -q (e.g. a git worktree "
                        "of an older commit), in the same rounds")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("strace"):
        say("bench/percall.py: run as root, with strace installed")
        return 1
    names = ["tcp-interceptd", "tcp-interceptd -q"]
    if args.against:
        names.append("tcp-interceptd -q (against)")
    if not args.no_haproxy and shutil.which("haproxy"):
        names.append("haproxy-usesrc")
    signal.alarm(int(args.rounds * len(names) * (2 * args.seconds + 40) + 60))
    raise_descriptor_limit(100)
    started = datetime.now(UTC)
    raw: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="ti-percall-") as tmp:
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                say(f"round {rnd + 1}/{args.rounds}: {name}")
                raw[name].append(measure(name, args.seconds, Path(tmp), args.against))
    signal.alarm(0)
    summary = {name: {key: statistics.median(r[key] for r in rows)
                      for key in ("conn_per_s", "user_us_per_conn", "sys_us_per_conn",
                                  "cpu_us_per_conn", "syscalls_per_conn")}
               for name, rows in raw.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"percall-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"date": started.isoformat(timespec="seconds"),
                                "machine": procfs.machine(), "rounds": args.rounds,
                                "seconds": args.seconds, "summary": summary, "raw": raw},
                               indent=1))
    anchor = summary.get("haproxy-usesrc")
    print(f"{'proxy':28s} {'conn/s':>8s} {'user us':>8s} {'sys us':>8s} {'cpu us':>8s} "
          f"{'syscalls':>9s}" + ("   rate and CPU / HAProxy's" if anchor else ""))
    for name, found in summary.items():
        line = (f"{name:28s} {found['conn_per_s']:8.0f} {found['user_us_per_conn']:8.1f} "
                f"{found['sys_us_per_conn']:8.1f} {found['cpu_us_per_conn']:8.1f} "
                f"{found['syscalls_per_conn']:9.1f}")
        if anchor:
            line += (f"   {found['conn_per_s'] / anchor['conn_per_s']:.2f} "
                     f"{found['cpu_us_per_conn'] / anchor['cpu_us_per_conn']:.2f}")
        print(line)
        calls = raw[name][-1]["syscalls"]
        print("    " + ", ".join(f"{call} {n:g}" for call, n in calls.items()))
    print(f"{args.rounds} rounds of {args.seconds:g} s, medians; per connection; raw: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
