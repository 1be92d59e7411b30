"""Seeing inside the running daemon: after connections that carried known
bytes, `show info`, `show conns`, /metrics (read with prometheus_client's
own parser) and the SIGUSR1 dump agree with what the test sent and holds
open, summed over two workers; tcp-intercept-ctl prints them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.intercept import REPO
from lab.peers import ECHO, REFUSED, RESET, exchange, payload, sha256
from lab.topology import inside, wait_for

METRICS = "[127.0.0.1]:[9105]"
CLEAN, HELD = 6, 4


@pytest.fixture(scope="module")
def world(topo, peers, start_module_daemon):
    """Two workers; CLEAN echoed connections closed, one refused, one reset by
    its server, HELD still open: every byte known."""
    daemon = start_module_daemon("-w", "2", "--metrics", METRICS, control=True, log_file=True)
    sent = 0
    for n in range(CLEAN):
        data = payload(10_000 * (n + 1), seed=n)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            assert exchange(sock, data) == (len(data), sha256(data), "eof")
        sent += len(data)
    with pytest.raises(ConnectionResetError):
        with topo.connect(topo.cli, topo.SERVER4, REFUSED) as sock:
            sock.recv(1)
    with topo.connect(topo.cli, topo.SERVER4, RESET) as sock:
        sock.sendall(b"r" * 1000)
        peers.wait_records(mode="reset")
        with pytest.raises(ConnectionResetError):
            while sock.recv(4096):
                pass
    held = []
    for n in range(HELD):
        sock = topo.connect(topo.cli, topo.SERVER4, ECHO)
        data = payload(1000 + n, seed=100 + n)
        sock.sendall(data)
        assert sock.recv(len(data), socket.MSG_WAITALL) == data
        held.append((sock, len(data)))
        time.sleep(0.05)  # a distinct age for each: the table is oldest first
    wait_for(lambda: daemon.info()["Closed_reset"] == "2", 10, "the two resets counted")
    yield daemon, held, sent + 1000 + sum(size for _, size in held), sent + sum(
        size for _, size in held)
    for sock, _ in held:
        sock.close()


def test_show_info_counts_what_happened(world):
    daemon, held, c2s, s2c = world
    info = daemon.info()
    assert info["Workers"] == "2"
    assert info["Version"] and int(info["Pid"]) == daemon.pid
    assert "-w 2" in info["Options"] and f"--metrics {METRICS.replace('[9105]', '9105')}" \
        in info["Options"]
    expected = {"Connections_open": HELD, "Connections_accepted": CLEAN + 2 + HELD,
                "Closed_clean": CLEAN, "Closed_reset": 2, "Closed_idle_timeout": 0,
                "Connect_failed_refused": 1, "Connect_failed_timeout": 0,
                "Limited_max_connections": 0, "Limited_max_per_client": 0,
                "Bytes_c2s": c2s, "Bytes_s2c": s2c, "Worker_restarts": 0}
    assert {key: int(info[key]) for key in expected} == expected
    assert int(info["Fds"]) > 0 and int(info["Rss_kib"]) > 10_000
    workers = [line for line in daemon.ask("show info").splitlines()
               if line.startswith("Process: worker")]
    assert len(workers) == 2 and all("state=serving" in w for w in workers)
    assert sum(int(w.split("connections=")[1].split()[0]) for w in workers) == HELD


def test_show_conns_lists_the_held_connections_oldest_first(world, topo):
    daemon, held, _, _ = world
    header, *rows = daemon.ask("show conns").splitlines()
    assert header.split() == ["#", "worker", "client", "destination", "source", "state",
                              "age_s", "idle_s", "bytes_c2s", "bytes_s2c", "pipe"]
    assert len(rows) == HELD
    for row, (sock, size) in zip(rows, held, strict=True):
        worker, client, dst, src, state, age, idle, c2s, s2c, pipe = row.split()
        assert client == "[{}]:{}".format(*sock.getsockname())
        assert dst == f"[{topo.SERVER4}]:{ECHO}"
        assert src.startswith(f"[{topo.ROUTER4_S}]:")
        assert int(worker) in daemon.workers()
        assert (state, int(c2s), int(s2c), pipe) == ("relaying", size, size, "-")
        assert float(age) >= float(idle) >= 0
    ages = [float(row.split()[6]) for row in rows]
    assert ages == sorted(ages, reverse=True)


# http_proxy in the environment must not send the scrape anywhere else.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape(topo, path: str = "/metrics") -> str:
    with inside(topo.rtr):
        with DIRECT.open(f"http://127.0.0.1:9105{path}", timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return answer.read().decode()


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_agree_with_show_info(world, topo):
    daemon, held, c2s, s2c = world
    found = samples(scrape(topo))
    assert found[("tcp_intercept_connections", ())] == HELD
    assert found[("tcp_intercept_connections_accepted_total", ())] == CLEAN + 2 + HELD
    closed = {how: found[("tcp_intercept_connections_closed_total", (("how", how),))]
              for how in ("clean", "reset", "idle_timeout")}
    assert closed == {"clean": CLEAN, "reset": 2, "idle_timeout": 0}
    failures = {r: found[("tcp_intercept_connect_failures_total", (("reason", r),))]
                for r in ("refused", "unreachable", "timeout", "other")}
    assert failures == {"refused": 1, "unreachable": 0, "timeout": 0, "other": 0}
    for reason in ("max_connections", "max_per_client"):
        assert found[("tcp_intercept_connections_limited_total", (("reason", reason),))] == 0
    assert found[("tcp_intercept_bytes_total", (("direction", "c2s"),))] == c2s
    assert found[("tcp_intercept_bytes_total", (("direction", "s2c"),))] == s2c
    assert ("tcp_intercept_pipes", (("state", "lent"),)) in found
    assert ("tcp_intercept_pipes", (("state", "free"),)) in found
    assert found[("tcp_intercept_workers", ())] == 2
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert found[(name, ())] > 0, name
    # The same text through the control socket.
    assert samples(daemon.ask("show metrics"))[("tcp_intercept_connections", ())] == HELD


def test_metrics_endpoint_answers_only_get_metrics(world, topo):
    with inside(topo.rtr):
        for path, status in (("/", 404), ("/metrics?x=1", 200)):
            try:
                with DIRECT.open(f"http://127.0.0.1:9105{path}", timeout=10) as r:
                    assert r.status == status
            except urllib.error.HTTPError as err:
                assert err.code == status
        with socket.create_connection(("127.0.0.1", 9105), timeout=10) as sock:
            sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 405 ")


def test_help_lists_every_command(world):
    daemon, _, _, _ = world
    answer = daemon.ask("help")
    commands = [re.split(r"\s{2,}", line)[0] for line in answer.splitlines() if line]
    assert {"show info", "show conns", "show metrics", "help"} <= set(commands), answer
    for command in commands:
        # Each "show" it lists answers (those taking an argument, e.g. show
        # conn ID|ADDR, are tested where their connections are).
        if command.startswith("show ") and command == command.lower():
            assert not daemon.ask(command).startswith("ERROR"), command


def test_pipes_lent_to_a_stuck_stream_show_in_info_and_metrics(world, topo):
    """A client that sends and never reads its echo: the daemon's pipes of
    that connection stay full, lent; both views count them alike."""
    daemon, _, _, _ = world
    sock = topo.connect(topo.cli, topo.SERVER4, ECHO)
    with sock:
        sock.setblocking(False)
        chunk, sent = b"p" * 65536, 0
        while sent < 64 << 20:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                break

        def agreed() -> bool:
            """Both views alike, read between two equal show infos (the
            stream may still be filling its second pipe at the first look)."""
            before = daemon.info()
            found = samples(scrape(topo))
            after = daemon.info()
            views = [(int(info["Pipes_lent"]), int(info["Pipes_free"]))
                     for info in (before, after)]
            views.append((found[("tcp_intercept_pipes", (("state", "lent"),))],
                          found[("tcp_intercept_pipes", (("state", "free"),))]))
            return views[0][0] >= 1 and views[0] == views[1] == views[2]
        wait_for(agreed, 10, "pipes lent, alike in show info and /metrics")
    # Closed: the pipes go back to the pool (or are closed by it).
    wait_for(lambda: daemon.info()["Pipes_lent"] == "0", 10, "the pipes given back")
    wait_for(lambda: daemon.info()["Connections_open"] == str(HELD), 10, "the stuck one closed")


def test_sigusr1_dumps_info_and_conns_into_the_log(world):
    daemon, held, _, _ = world
    daemon.signal(signal.SIGUSR1)
    lines = daemon.wait_log("show conns: ", count=HELD + 1)
    assert daemon.lines(f"show info: Connections_open: {HELD}")
    clients = ["[{}]:{}".format(*sock.getsockname()) for sock, _ in held]
    assert [line.split("show conns: ")[1].split()[1] for line in lines[1:]] == clients


def test_ctl_prints_the_answer_and_says_when_the_daemon_is_not_there(world, tmp_path):
    daemon, _, _, _ = world
    ctl = [sys.executable, "-m", "tcp_intercept.ctl"]
    done = subprocess.run([*ctl, "-s", str(daemon.control_path), "show", "info"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and f"Pid: {daemon.pid}" in done.stdout
    done = subprocess.run([*ctl, "-s", str(daemon.control_path), "show", "nonsense"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout.startswith("ERROR: unknown command")
    done = subprocess.run([*ctl, "-s", str(tmp_path / "none.sock"), "show", "info"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "no such socket: is tcp-interceptd running" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_a_non_root_user_cannot_open_the_control_socket(world):
    daemon, _, _, _ = world
    assert daemon.control_path.stat().st_mode & 0o777 == 0o600
    done = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                           "--clear-groups", "--", sys.executable, "-m", "tcp_intercept.ctl",
                           "-s", str(daemon.control_path), "show", "info"],
                          capture_output=True, text=True, timeout=30,
                          cwd=str(daemon.workdir.parent), env=_env())
    assert done.returncode == 1 and "permission denied" in done.stderr, done


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}
