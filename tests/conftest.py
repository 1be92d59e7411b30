"""Fixtures that build the world: namespaces, the far-end servers, daemons.

A topology costs a tenth of a second, a daemon about as much, so each test
module gets its own (module scope) and tests that change the daemon's life
(signals, detaching) start daemons of their own (function scope). Every
daemon started here is stopped in a finalizer, TERM then KILL, and the
output of each daemon still running when a test fails is attached to the
report.

Markers, set here from what a test asks for: a test that needs root (the
``as_root`` fixture, which every namespace fixture depends on) is ``netns``;
every other test is ``unit`` and runs without root in seconds
(``pytest -m unit``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from lab import delayline
from lab.intercept import REPO
from lab.peers import PeerServer
from lab.topology import Daemon, Topology, sweep_stale

# Daemons started through the fixtures and not yet stopped, for the report.
_RUNNING: list[Daemon] = []
REPORT_LINES = 200


@pytest.fixture(scope="session")
def as_root() -> None:
    """Fail (not skip) a test that needs namespaces when not root; a test that
    builds its namespaces some other way (the bench smoke test) asks for it too.
    Once per run, the namespaces of a killed run (never a live one's) go."""
    if os.geteuid() != 0:
        pytest.fail("the integration tests build network namespaces and run the "
                    "daemon with IP_TRANSPARENT: run them as root (or only the "
                    "unit tests: pytest -m unit)", pytrace=False)
    stale = sweep_stale()
    if stale:
        warnings.warn(f"deleted {len(stale)} namespaces left by a killed run: {' '.join(stale)}",
                      stacklevel=1)


@pytest.hookimpl(tryfirst=True)  # before -m selects by them
def pytest_collection_modifyitems(items) -> None:
    for item in items:
        needs_root = "as_root" in item.fixturenames
        if needs_root and item.get_closest_marker("unit"):
            raise pytest.UsageError(f"{item.nodeid} is marked unit but needs root: "
                                    "conftest.py marks every test, leave it the marking")
        item.add_marker("netns" if needs_root else "unit")


@pytest.fixture(scope="module")
def topo(request, as_root):
    """Client, router (TPROXY to port 5000) and server namespaces; a module
    that needs another world names its factory in a module-level WORLD."""
    with getattr(request.module, "WORLD", Topology)() as world:
        yield world


@pytest.fixture(scope="module")
def slow_server_leg(topo):
    """Connections to delayline.SLOW4 have a slow server leg (SLOW_MS); the
    namespaces, and the delay line with them, go with the topology."""
    delayline.setup(topo)
    line = topo.popen(topo.srv, sys.executable, "-m", "lab.delayline",
                      str(delayline.SLOW_MS / 1000), cwd=REPO, stdout=subprocess.PIPE,
                      text=True)
    assert line.stdout.readline().strip() == "ready"


@pytest.fixture(scope="module")
def peers(topo):
    """Echo, digest, first and reset servers in the server namespace."""
    with PeerServer(topo) as server:
        yield server


def _starter(topo: Topology, workdir):
    """start(*args, **kw) -> a started Daemon; and the list of those started."""
    started: list[Daemon] = []

    def start(*args: str, name: str | None = None, **kw) -> Daemon:
        daemon = Daemon(topo, *args, workdir=workdir, name=name or f"daemon{len(started)}", **kw)
        started.append(daemon)
        _RUNNING.append(daemon)
        return daemon.start()

    return start, started


def _stop_all(started: list[Daemon]) -> None:
    """TERM then KILL each; a foreground daemon that did not exit 0 is an error."""
    bad = []
    for daemon in started:
        try:
            status = daemon.stop()
            if daemon.foreground and status not in (0, None):
                bad.append(f"{daemon.out_path.stem} exited {status}:\n"
                           + "\n".join(daemon.output().splitlines()[-REPORT_LINES:]))
        finally:
            if daemon in _RUNNING:
                _RUNNING.remove(daemon)
    assert not bad, "\n".join(bad)


@pytest.fixture
def start_daemon(topo, tmp_path):
    """A factory: start_daemon('-B', 'client', log_file=True) starts one in the router."""
    start, started = _starter(topo, tmp_path)
    yield start
    _stop_all(started)


@pytest.fixture(scope="module")
def start_module_daemon(topo, tmp_path_factory):
    """The same factory for daemons that serve a whole module."""
    start, started = _starter(topo, tmp_path_factory.mktemp("daemon"))
    yield start
    _stop_all(started)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for daemon in (d for d in _RUNNING if not d.stopped):
            tail = "\n".join(daemon.output().splitlines()[-REPORT_LINES:])
            report.sections.append((f"tcp-intercept {daemon.out_path.stem} (pid {daemon.pid}), "
                                    f"last {REPORT_LINES} lines", tail))
