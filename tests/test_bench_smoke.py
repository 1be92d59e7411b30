"""The bench (bench/run.py --smoke) runs end to end and reports every metric.

A smoke run only: seconds per phase and tiny sizes, so nothing here says
anything about speed, and nothing asserts it. What must hold on any machine:
both paths measured, every number there and positive (the memory per
connection there, at least), no connection lost, every held connection
still relaying, the daemon alive to the end and gone after it, and the
JSON written where --out says.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab.topology import REPO

# Seconds for the whole smoke run, teardown included: a bound for a hang, not
# a speed check (about 20 s on a quiet machine).
BOUND = 300
pytestmark = pytest.mark.timeout(BOUND + 60)
BOTH = ("c2s_1_gbps", "s2c_1_gbps", "c2s_8_gbps", "s2c_8_gbps", "conn_per_s",
        "rate_p50_ms", "rate_p99_ms", "rtt_p50_us", "rtt_p99_us", "machine_cpu_s_per_gb")
PROXIED_ONLY = ("cpu_s_per_gb", "daemon_cpu_us_per_conn", "idle_fds_per_conn",
                "concurrent_fds_per_conn")
# Measured, but not necessarily positive at smoke sizes: 200 held connections
# may fit in the memory the worker kept from the rate phase before (seen: 0.0).
MEMORY = ("idle_kib_per_conn", "concurrent_kib_per_conn")
ERRORS = ("rate_errors", "idle_errors", "concurrent_errors")


@pytest.fixture(scope="module")
def record(as_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke",
                             "--concurrent", "200", "--out", str(out)],
                            capture_output=True, text=True, timeout=BOUND, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    [path] = out.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("path", ["direct", "proxied"])
def test_every_metric_is_measured_and_positive(record, path):
    summary = record["summary"][path]
    wanted = BOTH + (PROXIED_ONLY if path == "proxied" else ())
    missing = [key for key in wanted if not (summary.get(key) or 0) > 0]
    assert not missing, f"{path}: no positive value for {missing}: {summary}"
    if path == "proxied":
        unmeasured = [key for key in MEMORY if not isinstance(summary.get(key), (int, float))]
        assert not unmeasured, f"no value for {unmeasured}: {summary}"


@pytest.mark.parametrize("path", ["direct", "proxied"])
def test_no_errors_and_every_held_connection_relays(record, path):
    summary = record["summary"][path]
    assert {key: summary[key] for key in ERRORS} == dict.fromkeys(ERRORS, 0)
    assert summary["concurrent_count"] == 200
    assert summary["concurrent_relaying"] == 200
    assert summary["idle_relaying"] == summary["idle_count"] > 0


def test_the_daemon_lived_through_it_and_gave_back_its_descriptors(record):
    daemon = record["rounds"][0]["proxied"]["daemon"]
    assert daemon["alive_at_end"] and daemon["exit_status"] == 0, daemon["output_tail"]
    assert record["summary"]["proxied"]["fds_left_after_close"] == 0
    assert not record["failed"]


def test_the_record_says_where_and_how_it_was_measured(record):
    assert record["machine"]["nproc"] >= 1 and record["machine"]["kernel"]
    assert record["daemon_args"] == "-f -q -B client"
    assert record["profile"] == "smoke" and "--smoke" in record["command"]
    assert [t["metric"] for t in record["targets"]], "no target was evaluated"


def test_the_multi_router_bench_runs_end_to_end(as_root, tmp_path):
    """bench/multirouter.py --smoke: one and two proxy routers, no failure,
    the second world's connections on both routers."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "multirouter.py"), "--smoke",
                             "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=BOUND, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    [path] = tmp_path.glob("multirouter-*.json")
    record = json.loads(path.read_text())
    assert [r["routers"] for r in record["raw"]] == [1, 2]
    for world in record["raw"]:
        assert world["rate"]["completed"] > 0 and world["rate"]["errors"] == 0, world
        assert world["bulk"]["gbps"] > 0
        assert world["daemons_alive_at_end"] and set(world["daemon_exit_status"]) == {0}
    [shares] = record["summary"]["connection_shares"]
    assert min(shares) > 0, shares
