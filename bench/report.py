"""From the raw numbers of every round to one table and one JSON file.

Each path's round flattens to a dict of metrics (flatten); the summary is
the median of each metric over the rounds; the table puts direct and
proxied side by side with their ratio and, where issue 3 ("Speed") sets one,
the target and whether it is met. The HAProxy anchors of the targets were
measured by the shared rig on this machine kind (2 vCPUs), with the direct
path beside them; a target is HAProxy's share of that day's direct path,
times the issue's factor, times the direct path of this run, so a slower or
busier machine moves the target with it. ../shared/bench holds HAProxy
itself to the daemon in one run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The rig on this machine kind (issue 3): HAProxy splice-auto bulk and usesrc
# clientip conn/s, as shares of the direct path measured beside them.
HAPROXY_SPLICE = {"c2s_1": 10.1 / 14.8, "s2c_1": 10.7 / 16.0,
                  "c2s_8": 12.3 / 29.7, "s2c_8": 12.5 / 27.3}
HAPROXY_USESRC_CONN = 9634 / 20456


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str
    # (proxied, direct, summary of the proxied path) -> met?; None: no target
    target: Callable[[float, float | None, dict], bool] | None = None
    target_text: str = ""


def _bulk(key: str, factor: float, of_direct: float | None) -> Metric:
    share = max(factor * HAPROXY_SPLICE[key], of_direct or 0)
    text = f">= {share:.2f}x direct ({factor}x HAProxy"
    text += f", {of_direct}x direct)" if of_direct else ")"

    def met(proxied, direct, _):
        return proxied >= share * direct

    streams = key.split("_")[1]
    label = f"iperf3 {streams} stream{'s' if streams != '1' else ''} {key[:3].replace('2', '>')}"
    return Metric(f"{key}_gbps", label + " Gbit/s", "{:.2f}", met, text)


METRICS = [
    _bulk("c2s_1", 1.2, 0.8), _bulk("s2c_1", 1.2, 0.8),
    _bulk("c2s_8", 1.1, None), _bulk("s2c_8", 1.1, None),
    Metric("conn_per_s", "connections/s (32 in flight)", "{:.0f}",
           lambda p, d, s: p >= 0.9 * HAPROXY_USESRC_CONN * d and s["rate_errors"] == 0,
           f">= {0.9 * HAPROXY_USESRC_CONN:.2f}x direct (0.9x HAProxy usesrc), 0 errors"),
    Metric("rate_errors", "connection errors", "{:.0f}", lambda p, d, s: p == 0, "0"),
    Metric("rate_p50_ms", "connection time p50 ms", "{:.2f}"),
    Metric("rate_p99_ms", "connection time p99 ms", "{:.2f}"),
    Metric("daemon_cpu_us_per_conn", "daemon CPU us per connection", "{:.0f}"),
    Metric("loadgen_cpu_share", "load generator CPU, share of a core", "{:.2f}"),
    Metric("rtt_p50_us", "64 B round trip p50 us", "{:.0f}",
           lambda p, d, s: p <= d + 45, "<= direct + 45"),
    Metric("rtt_p99_us", "64 B round trip p99 us", "{:.0f}"),
    Metric("cpu_s_per_gb", "daemon CPU-s per GB (iperf3)", "{:.3f}",
           lambda p, d, s: p <= 0.4, "<= 0.4"),
    Metric("machine_cpu_s_per_gb", "machine CPU-s per GB (iperf3)", "{:.3f}"),
    Metric("idle_kib_per_conn", "RSS KiB per idle connection", "{:.2f}",
           lambda p, d, s: p <= 3.5, "<= 3.5"),
    Metric("idle_fds_per_conn", "fds per idle connection", "{:.2f}",
           lambda p, d, s: p <= 2.2, "<= 2.2"),
    Metric("idle_relaying", "idle connections still relaying", "{:.0f}",
           lambda p, d, s: p == s["idle_count"], "all"),
    Metric("concurrent_relaying", "concurrent connections relaying", "{:.0f}",
           lambda p, d, s: p == s["concurrent_count"] and s["concurrent_errors"] == 0,
           "all, 0 errors"),
    Metric("concurrent_errors", "concurrent connection errors", "{:.0f}"),
    Metric("concurrent_kib_per_conn", "RSS KiB per connection (concurrent)", "{:.2f}"),
    Metric("concurrent_fds_per_conn", "fds per connection (concurrent)", "{:.2f}"),
    Metric("fds_left_after_close", "daemon fds left after closing all", "{:.0f}"),
]


def flatten(raw: dict) -> dict:
    """One path's round: the raw phase results -> {metric key: number or None}."""
    flat = {}
    if bulk := raw.get("bulk"):
        for key, run in bulk["runs"].items():
            flat[f"{key}_gbps"] = run["gbps"]
        flat["cpu_s_per_gb"] = bulk["daemon_cpu_s_per_gb"] if raw["proxied"] else None
        flat["machine_cpu_s_per_gb"] = bulk["machine_cpu_s_per_gb"]
    if rate := raw.get("rate"):
        flat.update(conn_per_s=rate["conn_per_s"], rate_errors=rate["errors"],
                    rate_p50_ms=rate["p50_ms"], rate_p99_ms=rate["p99_ms"],
                    daemon_cpu_us_per_conn=rate["daemon_cpu_us_per_conn"],
                    loadgen_cpu_share=rate["loadgen_cpu_share"])
    if ping := raw.get("pingpong"):
        flat.update(rtt_p50_us=ping["p50_us"], rtt_p99_us=ping["p99_us"])
    for phase in ("idle", "concurrent"):
        if held := raw.get(phase):
            flat.update(_held(phase, held))
    return flat


def _held(phase: str, held: dict) -> dict:
    kib = "idle_kib_per_conn" if phase == "idle" else "concurrent_kib_per_conn"
    flat = {f"{phase}_count": held["count"], f"{phase}_relaying": held["relaying"],
            f"{phase}_errors": held["open_errors"] + held["relay_errors"],
            kib: held.get("rss_kib_per_conn"), f"{phase}_fds_per_conn": held.get("fds_per_conn"),
            f"{phase}_pss_kib_per_conn": held.get("pss_kib_per_conn")}
    if phase == "concurrent":
        flat["fds_left_after_close"] = held.get("fds_left_after_close")
    return flat


def median(rounds: list[dict]) -> dict:
    keys = {key for flat in rounds for key in flat}
    summary = {}
    for key in sorted(keys):
        values = [flat[key] for flat in rounds if flat.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
    return summary


def verdicts(direct: dict, proxied: dict) -> list[dict]:
    found = []
    for metric in METRICS:
        value = proxied.get(metric.key)
        if metric.target is None or value is None:
            continue
        found.append({"metric": metric.key, "target": metric.target_text, "value": value,
                      "met": bool(metric.target(value, direct.get(metric.key), proxied))})
    return found


def table(direct: dict, proxied: dict) -> str:
    met = {v["metric"]: v["met"] for v in verdicts(direct, proxied)}
    rows = [("metric", "direct", "proxied", "ratio", "target", "")]
    for metric in METRICS:
        d, p = direct.get(metric.key), proxied.get(metric.key)
        if d is None and p is None:
            continue
        ratio = f"{p / d:.2f}" if p is not None and d else "-"
        verdict = {True: "pass", False: "FAIL"}.get(met.get(metric.key), "")
        rows.append((metric.label, _fmt(metric, d), _fmt(metric, p), ratio,
                     metric.target_text if verdict else "", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 or i >= 4 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _fmt(metric: Metric, value: float | None) -> str:
    return "-" if value is None else metric.fmt.format(value)


def write(out_dir: Path, stamp: str, record: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stamp}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path
