#!/usr/bin/env python3
"""Two proxy routers against one, in the same run: contrib/multi-router.

    bench/multirouter.sh [--rounds N] [--quick | --smoke] [--out DIR]

Each round builds the multi-router world of lab/routers.py twice, with
one proxy router and with two (ECMP at the edge and the core, hash policy 3,
one seed; static routes, no BIRD: nothing fails here), in an order reversed
every other round, and runs tcp-interceptd -q -B client on every proxy
router. In each: the connection-rate phase (bench/loadgen.py rate: 32 in
flight, connect, 100 B each way, close) and bulk (iperf3 -P 8, client to
server). Reported: medians of conn/s and Gbit/s with one router and with
two, the median of each round's ratio (two to one), and how the second
world spread the work: each router's share of the connections (its daemon's
Connections_accepted) and of the bulk bytes (Bytes_c2s).

On this machine (2 cores shared by every namespace, the load generator and
the servers) a second router cannot add speed: there is no second machine.
What the figure shows is that ECMP through two routers costs nothing in
correctness (every connection completes, none resets) and spreads the work
evenly; a speed-up needs routers with cores of their own.

Writes the raw numbers to bench/results/multirouter-*.json. Needs root.
Touches nothing outside its namespaces; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.phases import ECHO_PORT, ECHO_SERVER, IPERF_PORT, LOADGEN  # noqa: E402
from bench.run import raise_descriptor_limit, tune  # noqa: E402
from lab.routers import Routers  # noqa: E402

PROFILES = {"full": {"rate_s": 5, "iperf_s": 5, "rounds": 3},
            "quick": {"rate_s": 3, "iperf_s": 3, "rounds": 1},
            "smoke": {"rate_s": 1, "iperf_s": 1, "rounds": 1}}  # tests/test_bench_smoke.py
STREAMS = 8


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(count: int, profile: dict, workdir: Path, tag: str) -> dict:
    """One world of `count` proxy routers: rate, then bulk."""
    with Routers(routers=count, bird=False, workdir=workdir) as world:
        tune(world.cli, *world.routers, world.srv)
        world.serve(world.srv, ECHO_PORT, sys.executable, str(ECHO_SERVER), "--port",
                    str(ECHO_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemons = [world.start_daemon(i, "-q", "-B", "client", control=True,
                                      name=f"{tag}-r{i}") for i in range(1, count + 1)]
        seconds = profile["rate_s"]
        result = world.run(world.cli, sys.executable, str(LOADGEN), "rate", "--inflight", "32",
                           "--duration", str(seconds), "--host", world.SERVER4, "--port",
                           str(ECHO_PORT), timeout=seconds + 60)
        rate = json.loads(result.stdout.splitlines()[-1])
        rate["conn_per_s"] = rate["completed"] / seconds
        rate["per_router"] = [int(d.info()["Connections_accepted"]) for d in daemons]
        bulk = iperf(world, profile["iperf_s"])
        bulk["per_router_c2s"] = [int(d.info()["Bytes_c2s"]) for d in daemons]
        alive = all(d.alive() for d in daemons)
        status = [daemon.stop() for daemon in daemons]
        return {"routers": count, "rate": rate, "bulk": bulk, "daemons_alive_at_end": alive,
                "daemon_exit_status": status}


def iperf(world: Routers, seconds: int) -> dict:
    server = world.serve(world.srv, IPERF_PORT, "iperf3", "-s", "-1", "-p", str(IPERF_PORT),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cmd = ["iperf3", "-c", world.SERVER4, "-p", str(IPERF_PORT), "-t", str(seconds), "-O", "1",
           "-P", str(STREAMS), "-J"]
    result = world.run(world.cli, *cmd, timeout=seconds + 40, check=False)
    server.wait(timeout=10)
    report = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "error" in report:
        raise RuntimeError(f"{' '.join(cmd)}: {report.get('error', result.stderr)}")
    return {"gbps": report["end"]["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": report["end"]["sum_sent"].get("retransmits")}


def shares(values: list[int]) -> list[float]:
    total = sum(values) or 1
    return [round(v / total, 3) for v in values]


def summarize(raw: list[dict]) -> dict:
    ones = [r for r in raw if r["routers"] == 1]
    twos = [r for r in raw if r["routers"] == 2]
    out = {}
    for key, phase, name in (("conn_per_s", "rate", "conn_per_s"), ("gbps", "bulk", "gbps")):
        one = [r[phase][name] for r in ones]
        two = [r[phase][name] for r in twos]
        ratios = [b / a for a, b in zip(one, two, strict=True)]
        out[key] = {"one": statistics.median(one), "two": statistics.median(two),
                    "ratio": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}
    out["errors"] = {"one": sum(r["rate"]["errors"] for r in ones),
                     "two": sum(r["rate"]["errors"] for r in twos)}
    out["connection_shares"] = [shares(r["rate"]["per_router"]) for r in twos]
    out["bulk_shares"] = [shares(r["bulk"]["per_router_c2s"]) for r in twos]
    return out


def table(summary: dict, rounds: int) -> str:
    rate, gbps = summary["conn_per_s"], summary["gbps"]
    return "\n".join([
        f"two proxy routers against one, {rounds} round(s), medians "
        "(2 shared cores: correctness and spread, not speed-up)",
        f"  conn/s   one {rate['one']:8.0f}   two {rate['two']:8.0f}   "
        f"two/one {rate['ratio']:.2f} ({rate['spread'][0]:.2f}-{rate['spread'][1]:.2f})",
        f"  Gbit/s   one {gbps['one']:8.2f}   two {gbps['two']:8.2f}   "
        f"two/one {gbps['ratio']:.2f} ({gbps['spread'][0]:.2f}-{gbps['spread'][1]:.2f})",
        f"  failed connections: one {summary['errors']['one']}, two {summary['errors']['two']}",
        f"  two routers' shares, connections: {summary['connection_shares']}",
        f"  two routers' shares, bulk bytes:  {summary['bulk_shares']}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "smoke" if args.smoke else "full"]
    rounds = args.rounds or profile["rounds"]
    raise_descriptor_limit(1000)
    signal.alarm(int(rounds * 2 * (profile["rate_s"] + profile["iperf_s"] + 60)))
    workdir = Path(tempfile.mkdtemp(prefix="multirouter-"))
    say(f"daemons' output: {workdir}")
    raw = []
    for rnd in range(rounds):
        for count in ((1, 2) if rnd % 2 == 0 else (2, 1)):
            say(f"  round {rnd + 1}/{rounds}: {count} proxy router(s)")
            raw.append(measure(count, profile, workdir, f"m{rnd}-{count}"))
    shutil.rmtree(workdir)  # the daemons' output; kept when a round failed
    summary = summarize(raw)
    print(table(summary, rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"multirouter-{stamp}.json"
    path.write_text(json.dumps({"date": stamp, "machine": platform.uname()._asdict(),
                                "argv": sys.argv, "raw": raw, "summary": summary}, indent=1))
    say(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
