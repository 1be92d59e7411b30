#!/usr/bin/env python3
"""Daemon variants against each other and the direct path, in one run.

    bench/variants.sh logging | counting | workers | policy | legs | summary | all
                      [--rounds N] [--quick]
                      [--together]

Each round builds a fresh topology per path (lab/topology.py), the
direct path and every variant of the preset, in an order that is reversed
every other round, and measures the connection-rate phase (32 in flight,
connect, 100 B each way, close, `-B client`) and one iperf3 stream client
to server. Reported: medians over the rounds of conn/s, the daemon's CPU
per connection (user and system, master and workers together), Gbit/s and
CPU-s per GB, each also as a share of the direct path of the same rounds;
and for variants that log, the cost of one line: their CPU per connection
less the quiet variant's, divided by the lines written per connection.
Against the first variant of the preset, the median of the ratios of each
round (the two measured a minute apart at most) with their spread: the
machine drifts by tens of percent over a run, so ratios of medians lie.

Presets (what each issue asks to be shown):
  logging   -q, against the package's default logging (-l FILE), and against
            logging to stderr (-f; here a file, as under systemd's journal)
  counting  the same commit with its counting stubbed out (bench/nocount.py)
            against it as it is; quiet, so that only counting differs
  workers   -w 1 against -w 2 (this machine has 2 cores for everything)
  policy    no policy against --policy with 10,000 prefixes and with 1 rule,
            each matching the bench's server (bench/policy.py)
  legs      the default options (the six lines to a file) as main has them,
            against this tree: per-leg telemetry costs nothing by default
  summary   the six lines, --log-format summary (one line and two TCP_INFO
            reads at close) and the six lines with --leg-stats

--together runs the first two variants of each preset at the same time,
each in a topology of its own with its own load generator, and reports the
median of each round's ratio: the drift of the machine (tens of percent
from one minute to the next) touches both alike, so a few percent show.

Prints a table; writes the raw numbers to bench/results/variants-*.json.
Needs root. Touches nothing outside its namespaces; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import procfs  # noqa: E402
from bench.nocount import stubbed_copy  # noqa: E402
from bench.policy import MANY_PREFIXES, ONE_RULE, write_policies  # noqa: E402
from bench.phases import ECHO_PORT, ECHO_SERVER, GB, Profile, World, iperf  # noqa: E402
from bench.run import raise_descriptor_limit, tune  # noqa: E402
from lab.topology import Daemon, Topology  # noqa: E402

BASE = ["-B", "client"]


@dataclass
class Variant:
    name: str
    args: list[str] = field(default_factory=list)
    log_file: bool = False
    stubbed: bool = False   # counting stubbed out
    rev: str | None = None  # the package as it is at this git revision (e.g. main)

    @property
    def logs(self) -> bool:
        return "-q" not in self.args


PRESETS = {
    "logging": [Variant("-q", [*BASE, "-q"]), Variant("log to a file", BASE, log_file=True),
                Variant("log to stderr", BASE)],
    "counting": [Variant("counting stubbed", [*BASE, "-q"], stubbed=True),
                 Variant("counting", [*BASE, "-q"])],
    "workers": [Variant("-w 1", [*BASE, "-q", "-w", "1"]),
                Variant("-w 2", [*BASE, "-q", "-w", "2"])],
    # bench/policy.py writes the files (write_policies()); their rules match
    # the bench's server, so every connection pays a lookup and a recipe.
    "policy": [Variant("no policy", [*BASE, "-q"]),
               Variant("10,000 prefixes", [*BASE, "-q", "--policy", str(MANY_PREFIXES)]),
               Variant("1 rule", [*BASE, "-q", "--policy", str(ONE_RULE)])],
    # Issue 18: the default options cost what they cost before per-leg
    # telemetry (222226c, the commit before it came: ad784d3), and the close
    # summary against the six lines it replaces.
    "legs": [Variant("before legs, default", BASE, log_file=True, rev="222226c"),
             Variant("default", BASE, log_file=True)],
    "summary": [Variant("six lines", BASE, log_file=True),
                Variant("--log-format summary", [*BASE, "--log-format", "summary"],
                        log_file=True),
                Variant("six lines + --leg-stats", [*BASE, "--leg-stats"], log_file=True)],
}
PROFILES = {"full": Profile(8, 1, 5, 0, 0, 0, 0), "quick": Profile(3, 1, 3, 0, 0, 0, 0)}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def world_for(proxied: bool):
    """A fresh topology with the echo server (a context manager)."""
    topo = Topology(tproxy=proxied)
    topo.__enter__()
    try:
        tune(topo.cli, topo.rtr, topo.srv)
        topo.serve(topo.srv, ECHO_PORT, sys.executable, str(ECHO_SERVER), "--port",
                   str(ECHO_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BaseException:
        topo.down()
        raise
    return topo


def measure(topo: Topology, variant: Variant | None, profile: Profile, workdir: Path,
            tag: str) -> dict:
    """One path: rate, then one stream c>s, the variant's daemon (if any)
    started for it and stopped after."""
    daemon = None
    if variant is not None:
        repo = None
        if variant.stubbed:
            repo, _ = stubbed_copy(Path(tempfile.mkdtemp(dir=workdir)))
        elif variant.rev:
            repo = revision_copy(variant.rev, Path(tempfile.mkdtemp(dir=workdir)))
        daemon = Daemon(topo, *variant.args, workdir=workdir, name=tag,
                        log_file=variant.log_file, repo=repo).start()
    world = World(topo, profile, daemon)
    found = {"rate": rate(world), "bulk": iperf(world, 1, False)}
    if daemon is not None:
        found["bulk"]["daemon_cpu_s_per_gb"] = found["bulk"]["daemon_cpu_s"] / (
            found["bulk"]["bytes"] / GB)
        found["lines"] = len(daemon.lines(" INFO: ")) + len(daemon.lines(" WARNING: ")) + \
            len(daemon.lines(" ERROR: "))
        found["exit_status"] = daemon.stop()
    return found


def revision_copy(rev: str, into: Path) -> Path:
    """The package as at git revision rev, in into (to put on PYTHONPATH)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "tcp_intercept"],
                             check=True, capture_output=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    return into


def rate(world: World) -> dict:
    """The bench's rate phase, with the daemon's CPU split into user and system."""
    pid = world.daemon.pid if world.daemon else None
    before = procfs.cpu_times(pid) if pid else (0.0, 0.0)
    p = world.profile
    result = world.loadgen("rate", "--inflight", str(p.inflight), "--duration",
                           str(p.rate_seconds), timeout=p.rate_seconds + 60)
    after = procfs.cpu_times(pid) if pid else (0.0, 0.0)
    total = result["completed"] + result["errors"]
    result["conn_per_s"] = result["completed"] / p.rate_seconds
    if pid and total:
        result["user_us_per_conn"] = (after[0] - before[0]) / total * 1e6
        result["sys_us_per_conn"] = (after[1] - before[1]) / total * 1e6
        result["cpu_us_per_conn"] = result["user_us_per_conn"] + result["sys_us_per_conn"]
        result["connections"] = total
    return result


def run(preset: str, rounds: int, profile: Profile, workdir: Path) -> dict:
    """Each round: every path (direct, then each variant) in a topology of
    its own, in an order reversed every other round. (One topology for all
    the variants of a round was tried: whichever ran second inherited the
    first's tens of thousands of TIME_WAIT sockets and came out up to 20 %
    slower.)"""
    variants = PRESETS[preset]
    paths: list[Variant | None] = [None, *variants]
    raw: dict[str, list] = {"direct": [], **{v.name: [] for v in variants}}
    for rnd in range(rounds):
        for variant in (paths if rnd % 2 == 0 else paths[::-1]):
            name = variant.name if variant else "direct"
            say(f"  {preset} round {rnd + 1}/{rounds}: {name}")
            topo = world_for(variant is not None)
            try:
                raw[name].append(measure(topo, variant, profile, workdir,
                                         f"{preset}-{rnd}-{name.replace(' ', '_')}"))
            finally:
                topo.down()
    return {"variants": [v.__dict__ for v in variants], "raw": raw,
            "summary": summarize(variants, raw)}


def together(preset: str, rounds: int, profile: Profile, workdir: Path) -> dict:
    """The preset's first two variants at the same time, each in a topology
    of its own with its own load: in the same seconds the machine's drift
    touches both alike, and the one that costs less per connection makes
    more of them. Each round: the rate phase in both at once, then one
    iperf3 stream in both at once; which topology is built first alternates.
    Reported: the medians of each round's ratio, second to first."""
    first, second = PRESETS[preset][:2]
    raw: dict[str, list] = {first.name: [], second.name: []}
    for rnd in range(rounds):
        pair = (first, second) if rnd % 2 == 0 else (second, first)
        say(f"  {preset} together, round {rnd + 1}/{rounds}")
        topos = []
        try:
            worlds = []
            for variant in pair:
                topos.append(world_for(True))
                repo = stubbed_copy(Path(tempfile.mkdtemp(dir=workdir)))[0] \
                    if variant.stubbed else None
                daemon = Daemon(topos[-1], *variant.args, workdir=workdir, repo=repo,
                                name=f"{preset}-t{rnd}-{variant.name.replace(' ', '_')}",
                                log_file=variant.log_file).start()
                worlds.append(World(topos[-1], profile, daemon))
            rates = _at_once([lambda w=w: rate(w) for w in worlds])
            bulks = _at_once([lambda w=w: iperf(w, 1, False) for w in worlds])
            for variant, world, found, bulk in zip(pair, worlds, rates, bulks, strict=True):
                raw[variant.name].append({"rate": found, "bulk": bulk})
                world.daemon.stop()
        finally:
            for topo in topos:
                topo.down()
    summary = {}
    for key, phase, name in (("rate", "rate", "conn_per_s"), ("gbps", "bulk", "gbps"),
                             ("cpu", "rate", "cpu_us_per_conn")):
        ratios = [b[phase][name] / a[phase][name]
                  for a, b in zip(raw[first.name], raw[second.name], strict=True)]
        summary[key] = {"median": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}
    return {"variants": [first.name, second.name], "raw": raw, "together": summary}


def _at_once(jobs: list) -> list:
    """Run the jobs in threads at the same time; their results, in order."""
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = jobs[index]()
        except BaseException as err:  # raised below, in the caller
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _median(rows: list[dict], *keys: str) -> float | None:
    values = []
    for row in rows:
        for key in keys:
            row = row.get(key) if isinstance(row, dict) else None
        if row is not None:
            values.append(row)
    return statistics.median(values) if values else None


def summarize(variants: list[Variant], raw: dict) -> dict:
    direct_rate = _median(raw["direct"], "rate", "conn_per_s")
    direct_gbps = _median(raw["direct"], "bulk", "gbps")
    summary = {"direct": {"conn_per_s": direct_rate, "gbps": direct_gbps}}
    quiet = None
    for variant in variants:
        rows = raw[variant.name]
        row = {"conn_per_s": _median(rows, "rate", "conn_per_s"),
               "errors": sum(r["rate"]["errors"] for r in rows),
               "cpu_us_per_conn": _median(rows, "rate", "cpu_us_per_conn"),
               "user_us_per_conn": _median(rows, "rate", "user_us_per_conn"),
               "sys_us_per_conn": _median(rows, "rate", "sys_us_per_conn"),
               "gbps": _median(rows, "bulk", "gbps"),
               "cpu_s_per_gb": _median(rows, "bulk", "daemon_cpu_s_per_gb")}
        row["rate_vs_direct"] = row["conn_per_s"] / direct_rate
        row["gbps_vs_direct"] = row["gbps"] / direct_gbps
        if not variant.logs:
            quiet = quiet or row
        else:
            per_conn = [r["lines"] / r["rate"]["connections"] for r in rows]
            row["lines_per_conn"] = statistics.median(per_conn)
            if quiet:
                row["us_per_line"] = (row["cpu_us_per_conn"] - quiet["cpu_us_per_conn"]) / \
                    row["lines_per_conn"]
        summary[variant.name] = row
    # Against the first variant: the median of the ratios of each round,
    # where the two ran minutes apart at most, rather than the ratio of the
    # medians (the machine drifts by tens of percent over a run).
    first = raw[variants[0].name]
    for variant in variants[1:]:
        rows = raw[variant.name]
        row = summary[variant.name]
        for key, phase, name in (("rate", "rate", "conn_per_s"), ("gbps", "bulk", "gbps"),
                                  ("cpu", "rate", "cpu_us_per_conn")):
            ratios = [b[phase][name] / a[phase][name] for a, b in zip(first, rows, strict=True)]
            row[f"{key}_vs_{variants[0].name}"] = statistics.median(ratios)
            row[f"{key}_vs_{variants[0].name}_spread"] = [min(ratios), max(ratios)]
    return summary


def table(preset: str, summary: dict) -> str:
    names = list(summary)
    cols = [("conn/s", "conn_per_s", "{:.0f}"), ("x direct", "rate_vs_direct", "{:.2f}"),
            ("errors", "errors", "{}"), ("CPU us/conn", "cpu_us_per_conn", "{:.1f}"),
            ("user / sys us", None, None), ("1 stream Gbit/s", "gbps", "{:.2f}"),
            ("x direct", "gbps_vs_direct", "{:.2f}"), ("CPU-s/GB", "cpu_s_per_gb", "{:.3f}"),
            ("lines/conn", "lines_per_conn", "{:.1f}"), ("us/line", "us_per_line", "{:.2f}")]
    first = names[1]
    cols += [(f"conn/s x {first}, per round", f"rate_vs_{first}", "{:.3f}"),
             (f"Gbit/s x {first}, per round", f"gbps_vs_{first}", "{:.3f}"),
             (f"CPU/conn x {first}, per round", f"cpu_vs_{first}", "{:.3f}")]
    lines = [f"| {preset} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for title, key, fmt in cols:
        cells = []
        for name in names:
            row = summary[name]
            if key is None:
                user, system = row.get("user_us_per_conn"), row.get("sys_us_per_conn")
                cells.append(f"{user:.1f} / {system:.1f}" if user is not None else "")
            else:
                value = row.get(key)
                cells.append(fmt.format(value) if value is not None else "")
        if any(cells):
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Daemon variants in one run (needs root).")
    parser.add_argument("preset", choices=[*PRESETS, "all"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="short phases")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--together", action="store_true",
                        help="the first two variants of each preset at the same time, "
                        "each with its own topology and load: ratios per round")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("bench/variants.py: run as root")
        return 1
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    if "policy" in presets:
        write_policies()
    profile = PROFILES["quick" if args.quick else "full"]

    def out_of_time(*_):
        raise TimeoutError("the bench ran out of its time limit")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(len(presets) * args.rounds * 4 * (profile.iperf_seconds + 30) + 120))
    raise_descriptor_limit(100)
    started = datetime.now(UTC)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ti-variants-") as tmp:
        for preset in presets:
            measure_preset = together if args.together else run
            results[preset] = measure_preset(preset, args.rounds, profile, Path(tmp))
    signal.alarm(0)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"variants-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    path.write_text(json.dumps({"date": started.isoformat(timespec="seconds"),
                                "commit": commit, "machine": procfs.machine(),
                                "rounds": args.rounds, "profile": profile.__dict__,
                                "seconds": round(time.time() - started.timestamp(), 1),
                                "results": results}, indent=1))
    for preset, result in results.items():
        if args.together:
            first, second = result["variants"]
            print(f"{preset}, together: {second} / {first}, per round, median [spread]")
            for key, title in (("rate", "conn/s"), ("gbps", "1 stream Gbit/s"),
                               ("cpu", "CPU per connection")):
                found = result["together"][key]
                print(f"  {title:20s} {found['median']:.3f}  "
                      f"[{found['spread'][0]:.3f} - {found['spread'][1]:.3f}]")
        else:
            print(table(preset, result["summary"]))
        print()
    print(f"{args.rounds} rounds, medians; raw numbers in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
