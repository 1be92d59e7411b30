#!/usr/bin/env python3
"""tcp-intercept against the direct path, on this machine: one command.

    bench/run.sh [--quick | --smoke] [--rounds N] [--concurrent N] [--out DIR]
                 [--daemon-args "-f -q -B client"]

Each round measures both paths, each in a topology of its own
(lab/topology.py: client, router and server namespaces, random names):

    direct   Topology(tproxy=False): the router only forwards.
    proxied  the same topology with the interception rules (contrib/tproxy.sh
             when present) and tcp-interceptd running in the router.

A fresh topology per path and round, rather than taking the rules down and
up in one, gives both paths the same start: no TIME_WAIT sockets or pipes
left over from the other path's connection-rate test, and no dependence on
how the rules are removed. Rounds alternate which path goes first; the
summary is the median of each metric over the rounds.

Prints a table (direct, proxied, ratio, the target of issue 3 and whether it
is met) and writes every raw number to DIR/<UTC timestamp>.json. Needs root.
Touches nothing outside its own namespaces; every process it starts is
stopped by pid, and the whole run is bounded in time (SIGALRM).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import procfs, report  # noqa: E402
from bench.phases import ECHO_PORT, ECHO_SERVER, IPERF_PORT, PHASES, Profile, World  # noqa: E402
from lab.topology import Daemon, Topology, TopologyError, inside  # noqa: E402

PROFILES = {
    # iperf3 s, omit s, rate s, pings, warm-up, idle conns, concurrent conns
    "full": Profile(10, 1, 5, 20000, 1000, 2000, 8000),
    "quick": Profile(5, 1, 3, 5000, 500, 1000, 8000),
    "smoke": Profile(1, 0, 1, 200, 20, 200, 100),
}
ROUNDS = {"full": 3, "quick": 1, "smoke": 1}
ROUND_LIMIT = {"full": 420, "quick": 240, "smoke": 90}  # seconds per round, both paths
DESCRIPTORS = 65536  # wanted; the daemon needs 2 per connection
# As ../shared/bench's topo.sh sets them in all three namespaces: without
# them in the router, a proxy that binds the client's address with port 0
# (HAProxy's usesrc clientip) searches a crowded default port range and pays
# several times its usual system time per connection.
SYSCTLS = {"net/ipv4/tcp_tw_reuse": "1", "net/ipv4/ip_local_port_range": "1024 65535",
           "net/core/somaxconn": "4096"}
PROBLEMS = ("WARNING", "ERROR", "CRITICAL", "Traceback")


def say(text: str = "") -> None:
    print(text, file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure tcp-interceptd against the direct path (needs root).")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="short runs, about 2 minutes")
    length.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (CI)")
    parser.add_argument("--rounds", type=int, help="rounds; the median is reported "
                        "(default 3, 1 with --quick or --smoke)")
    parser.add_argument("--concurrent", type=int,
                        help="connections held at once (default 8000, 100 with --smoke)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                        help="where the JSON goes (default bench/results/)")
    parser.add_argument("--daemon-args", default="-f -q -B client",
                        help="tcp-interceptd options (default: %(default)s)")
    args = parser.parse_args(argv)
    args.profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.rounds = args.rounds or ROUNDS[args.profile]
    if args.rounds < 1 or (args.concurrent is not None and args.concurrent < 1):
        parser.error("--rounds and --concurrent must be at least 1")
    return args


def profile_of(args: argparse.Namespace) -> Profile:
    profile = PROFILES[args.profile]
    if args.concurrent is not None:
        profile = dataclasses.replace(profile, concurrent=args.concurrent)
    return profile


def daemon_options(args: argparse.Namespace) -> list[str]:
    """The options as given, less -f: Daemon runs it in the foreground itself."""
    return [opt for opt in shlex.split(args.daemon_args) if opt not in ("-f", "--foreground")]


def raise_descriptor_limit(concurrent: int) -> None:
    """Ours, inherited by the daemon (which takes its hard limit), client and server."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: as far as the hard limit goes
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < 2 * concurrent + 100:
            say(f"warning: the open-file limit is {hard}: too low for {concurrent} "
                "connections through the daemon (2 descriptors each)")


def tune(*namespaces: str) -> None:
    """Quick reuse of local ports, and many of them, in each namespace (the
    client, the routers, the server): the shared rig's settings."""
    for ns in namespaces:
        with inside(ns):
            for key, value in SYSCTLS.items():
                Path("/proc/sys", key).write_text(value + "\n")


def measure_path(proxied: bool, args: argparse.Namespace, workdir: Path, rnd: int) -> dict:
    name = "proxied" if proxied else "direct"
    raw: dict = {"path": name, "proxied": proxied, "seconds": {}, "failed": {}}
    with Topology(tproxy=proxied) as topo:
        tune(topo.cli, topo.rtr, topo.srv)
        topo.serve(topo.srv, ECHO_PORT, sys.executable, str(ECHO_SERVER), "--port",
                   str(ECHO_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemon = None
        if proxied:
            daemon = Daemon(topo, *daemon_options(args), workdir=workdir, name=f"daemon-{rnd}")
            daemon.start()
            raw["daemon_command"] = daemon.command
        world = World(topo, profile_of(args), daemon)
        run_phases(world, raw, f"round {rnd} {name}")
        if daemon:
            raw["daemon"] = daemon_report(daemon)
    return raw


def run_phases(world: World, raw: dict, title: str) -> None:
    for phase, measure in PHASES.items():
        say(f"  {title}: {phase}")
        started = time.monotonic()
        try:
            raw[phase] = measure(world)
        except (TopologyError, subprocess.SubprocessError, OSError, ValueError, KeyError) as err:
            say(f"  {title}: {phase} FAILED: {err}")
            raw["failed"][phase] = "".join(traceback.format_exception_only(err)).strip()
            if world.daemon and not world.daemon.alive():
                return
        raw["seconds"][phase] = round(time.monotonic() - started, 2)


def daemon_report(daemon: Daemon) -> dict:
    found = {"pid": daemon.pid, "alive_at_end": daemon.alive()}
    if found["alive_at_end"]:
        pids = [daemon.pid, *procfs.children(daemon.pid)]  # the master and its workers
        found["rss_kib_at_end"] = sum(procfs.status_kib(pid, "VmRSS") for pid in pids)
        found["peak_rss_kib"] = sum(procfs.status_kib(pid, "VmHWM") for pid in pids)
    found["exit_status"] = daemon.stop()
    lines = daemon.output().splitlines()
    problems = [line for line in lines if any(word in line for word in PROBLEMS)]
    # iperf3 resets its data connections when a test ends; without -q the
    # daemon logs each of those resets.
    found["problem_lines"] = len(problems)
    iperf3 = f"-->[{Topology.SERVER4}]:{IPERF_PORT}"
    found["problem_lines_not_iperf3"] = sum(iperf3 not in line for line in problems)
    found["problems"] = problems[:50]
    found["output_tail"] = lines[-20:]
    return found


def measure(args: argparse.Namespace, workdir: Path) -> list[dict]:
    rounds = []
    for rnd in range(1, args.rounds + 1):
        order = (False, True) if rnd % 2 else (True, False)
        done = {}
        for proxied in order:
            done["proxied" if proxied else "direct"] = measure_path(proxied, args, workdir, rnd)
        rounds.append({"round": rnd, "order": [p["path"] for p in done.values()], **done})
    return rounds


def software() -> dict:
    """What was measured: the commit of this tree, iperf3's and the daemon's versions."""
    def output(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                                  cwd=REPO).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": output("git", "rev-parse", "HEAD"),
            "changed_files": output("git", "status", "--porcelain", "--untracked-files=no"),
            "daemon": output(sys.executable, "-m", "tcp_intercept", "--version").split("\n")[0],
            "iperf3": output("iperf3", "--version").split("\n")[0]}


def summarize(args: argparse.Namespace, rounds: list[dict], started: datetime) -> dict:
    summary = {path: report.median([report.flatten(r[path]) for r in rounds])
               for path in ("direct", "proxied")}
    return {
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
        "machine": procfs.machine(),
        "software": software(),
        "command": [sys.executable, *sys.argv],
        "daemon_args": args.daemon_args,
        "profile": args.profile, "settings": profile_of(args).__dict__, "rounds_asked": args.rounds,
        "summary": summary,
        "targets": report.verdicts(summary["direct"], summary["proxied"]),
        "failed": {f"round {r['round']} {path}": r[path]["failed"]
                   for r in rounds for path in ("direct", "proxied") if r[path]["failed"]},
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        say("bench/run.py: run as root: it builds network namespaces and TPROXY rules")
        return 1

    def out_of_time(*_):
        raise TimeoutError("the bench ran out of its time limit")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(ROUND_LIMIT[args.profile] * args.rounds + 60)
    raise_descriptor_limit(profile_of(args).concurrent)
    started = datetime.now(UTC)
    say(f"bench: {args.profile}, {args.rounds} round(s), daemon: {args.daemon_args}")
    with tempfile.TemporaryDirectory(prefix="ti-bench-") as tmp:
        rounds = measure(args, Path(tmp))
    signal.alarm(0)
    record = summarize(args, rounds, started)
    path = report.write(args.out, started.strftime("%Y%m%dT%H%M%SZ"), record)
    show(record, path)
    return 1 if record["failed"] else 0


def show(record: dict, path: Path) -> None:
    print(report.table(record["summary"]["direct"], record["summary"]["proxied"]))
    print()
    for where, failures in record["failed"].items():
        print(f"FAILED in {where}: {failures}")
    for rnd in record["rounds"]:
        daemon = rnd["proxied"].get("daemon", {})
        if daemon.get("problem_lines") or daemon.get("exit_status") != 0:
            print(f"round {rnd['round']}: the daemon exited {daemon.get('exit_status')}, logged "
                  f"{daemon.get('problem_lines')} warning/error lines "
                  f"({daemon.get('problem_lines_not_iperf3')} not on iperf3 connections)")
    machine = record["machine"]
    print(f"{machine['nproc']} CPUs ({machine['cpu_model']}), kernel {machine['kernel']}, "
          f"load average at start {' '.join(machine['loadavg_at_start'])}; "
          f"{record['seconds']} s; raw numbers in {path}")


if __name__ == "__main__":
    sys.exit(main())
