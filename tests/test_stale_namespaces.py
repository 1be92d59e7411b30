"""A run killed before its teardown leaves namespaces and the processes in
them behind; the next run deletes them, and never those of a run still going
(several runs of the suite may share a machine)."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from lab.netns import pid_alive, terminate, wait_for
from lab.topology import Topology, sweep_stale


def namespace_of(pid: int) -> str:
    """A name such as Topology gives one of its namespaces when built by pid."""
    return f"ti{pid}x{secrets.token_hex(3)}-rtr"


@pytest.fixture
def made(as_root):
    names: list[str] = []
    yield names
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


def test_a_killed_runs_namespaces_and_processes_go_a_live_runs_stay(made):
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)
    live = subprocess.Popen(["sleep", "60"])  # stands for another run still going
    stale, kept = namespace_of(gone.pid), namespace_of(live.pid)
    left = None
    try:
        for ns in (stale, kept):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
            made.append(ns)
        # What a killed run leaves running in its router: a daemon, say.
        left = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"],
                                start_new_session=True)
        wait_for(lambda: str(left.pid) in subprocess.run(
            ["ip", "netns", "pids", stale], capture_output=True, text=True,
            timeout=10).stdout.split(), 10, "the leftover process in its namespace")

        deleted = sweep_stale()

        assert stale in deleted and kept not in deleted
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               timeout=10).stdout
        assert stale not in netns and kept in netns
        left.wait(timeout=10)  # stopped by the sweep, not by us
        assert not pid_alive(left.pid)
    finally:
        terminate(live)
        if left is not None:
            terminate(left)


def test_topology_names_its_namespaces_after_the_process_that_built_it(as_root):
    topo = Topology()
    assert all(ns.startswith(f"ti{os.getpid()}x") for ns in topo.namespaces)
