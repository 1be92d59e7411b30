"""Least privilege (-u / -g): the daemon binds as root, then runs as the
user with only the capability it still needs, in the master and every
worker; what it must still do as that user (relay, spoof, reopen its log,
remove its pid file) works."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lab.intercept import REPO
from lab.peers import ECHO, exchange, payload, sha256
from lab.topology import pid_alive, wait_for
from tcp_intercept import policy_file
from tcp_intercept.config import Config

NOBODY = pwd.getpwnam("nobody")
CAP_NET_ADMIN = 1 << 12


@pytest.fixture
def nobodys_dir():
    """A directory the user nobody may write (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ti-priv-", dir="/tmp"))
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def check_process(pid: int, caps: int) -> None:
    found = status(pid)
    assert found["Uid"].split() == [str(NOBODY.pw_uid)] * 4, found["Uid"]
    assert found["Gid"].split() == [str(NOBODY.pw_gid)] * 4, found["Gid"]
    for key in ("CapEff", "CapPrm", "CapAmb"):
        assert int(found[key], 16) == caps, (pid, key, found[key])
    assert int(found["CapBnd"], 16) == caps
    assert found["NoNewPrivs"].strip() == "1"


def test_as_nobody_with_net_admin_alone_it_spoofs_and_reopens_its_log(topo, peers,
                                                                      start_daemon,
                                                                      nobodys_dir):
    daemon = start_daemon("-u", "nobody", "-B", "client", "-w", "2",
                          log_file=nobodys_dir / "d.log", pid_file=nobodys_dir / "d.pid")
    workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "workers")
    for pid in (daemon.pid, *workers):
        check_process(pid, CAP_NET_ADMIN)
    daemon.wait_log("Running as user nobody (uid 65534), group nogroup (gid 65534); "
                    "capabilities kept: CAP_NET_ADMIN")
    data = payload(100_000, seed=1)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        client = sock.getsockname()
        assert exchange(sock, data) == (len(data), sha256(data), "eof")
    [record] = peers.wait_records(sha256=sha256(data))
    assert record.peer == client, "the server did not see the client's address"
    # SIGHUP as nobody: logrotate moved the file; the new one is created.
    daemon.log_path.rename(nobodys_dir / "d.log.1")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("Received SIGHUP, (re)opening this logfile", count=3)  # master + 2
    assert daemon.log_path.stat().st_uid == NOBODY.pw_uid
    # At exit, nobody removes its pid file.
    daemon.stop()
    assert not daemon.pid_path.exists()


def test_group_is_applied_to_the_master_and_its_workers(topo, peers, start_daemon,
                                                        nobodys_dir):
    """-g users: every gid of master and workers is users', and the
    supplementary groups are those of nobody in users (none other)."""
    users = grp.getgrnam("users")
    daemon = start_daemon("-u", "nobody", "-g", "users", "-w", "2",
                          log_file=nobodys_dir / "d.log")
    workers = wait_for(lambda: len(daemon.workers()) == 2 and daemon.workers(), 10, "workers")
    expected = sorted(set(os.getgrouplist("nobody", users.gr_gid)) | {users.gr_gid})
    for pid in (daemon.pid, *workers):
        found = status(pid)
        assert found["Gid"].split() == [str(users.gr_gid)] * 4, (pid, found["Gid"])
        assert sorted(map(int, found["Groups"].split())) == expected, (pid, found["Groups"])
        assert found["Uid"].split() == [str(NOBODY.pw_uid)] * 4
    daemon.wait_log(f"Running as user nobody (uid {NOBODY.pw_uid}), group users "
                    f"(gid {users.gr_gid})")
    assert (nobodys_dir / "d.log").exists()
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        sock.sendall(b"grouped")
        assert sock.recv(7, socket.MSG_WAITALL) == b"grouped"


def test_without_spoofing_it_keeps_no_capability(topo, peers, start_daemon, nobodys_dir):
    daemon = start_daemon("-u", "nobody", log_file=nobodys_dir / "d.log")
    for pid in (daemon.pid, daemon.worker):
        check_process(pid, 0)
    daemon.wait_log("capabilities kept: none")
    data = payload(10_000, seed=2)
    with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
        assert exchange(sock, data) == (len(data), sha256(data), "eof")


def congestion_controls() -> tuple[list[str], list[str]]:
    """(allowed to unprivileged sockets, available but not allowed): the
    kernel's global lists (not a namespace's own: they cannot be changed in one)."""
    base = Path("/proc/sys/net/ipv4")
    allowed = (base / "tcp_allowed_congestion_control").read_text().split()
    available = (base / "tcp_available_congestion_control").read_text().split()
    return allowed, [algo for algo in available if algo not in allowed]


def load_bbr(topo) -> None:
    """Make tcp_bbr available, as root setting it on a socket does (the kernel
    loads the module). Stock Debian 12 allows reno and cubic to every socket
    and loads nothing else: bbr, once loaded, is available but not allowed."""
    with topo.socket(topo.rtr) as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"bbr")
        except OSError:
            subprocess.run(["modprobe", "tcp_bbr"], check=False, timeout=30)


def test_congestion_control_needs_net_admin_only_when_the_kernel_does_not_allow_it(
        topo, peers, start_daemon):
    load_bbr(topo)
    allowed, privileged = congestion_controls()
    assert privileged, f"every congestion control is allowed ({allowed}): no case needs " \
        "CAP_NET_ADMIN to check (net.ipv4.tcp_allowed_congestion_control)"
    cases = [(allowed[0], 0), (privileged[0], CAP_NET_ADMIN)]
    for algo, caps in cases:
        daemon = start_daemon("-u", "nobody", "-C", algo, name=f"cc-{algo}")
        check_process(daemon.worker, caps)
        with topo.connect(topo.cli, topo.SERVER4, ECHO) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            out = topo.run(topo.rtr, "ss", "-Htin", "dst", f"{topo.SERVER4}:{ECHO}").stdout
        assert algo in out.split(), out
        daemon.stop()


LOAD_POLICY = """import sys
from tcp_intercept import policy_file
from tcp_intercept.config import Config
from tcp_intercept.errors import PolicyError
try:
    policy_file.load(sys.argv[1], Config())
except PolicyError as err:
    sys.exit(str(err))
"""


def test_a_policy_congestion_control_the_user_may_not_set_is_refused(topo, nobodys_dir):
    """Available but not allowed: without CAP_NET_ADMIN every connection of
    the rule would fail (EPERM), so loading with the kernel's checks (start-up,
    reload) refuses the file; root's load takes it, and tproxy.sh's (no
    checks) does not ask."""
    load_bbr(topo)
    allowed, privileged = congestion_controls()
    assert privileged, f"every congestion control is allowed ({allowed}): no case needs " \
        "CAP_NET_ADMIN to check (net.ipv4.tcp_allowed_congestion_control)"
    path = nobodys_dir / "policy.toml"
    as_nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--",
                 sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for algo, leg in ((allowed[0], "server_leg"), (privileged[0], "server_leg"),
                      (privileged[0], "client_leg")):
        path.write_text(f"[[rule]]\nname = 'sat'\n[rule.{leg}]\ncongestion = '{algo}'\n")
        done = subprocess.run([*as_nobody, "-c", LOAD_POLICY, str(path)], capture_output=True,
                              text=True, timeout=60, env=env)
        if algo in allowed:
            assert done.returncode == 0, done
            continue
        assert done.returncode == 1 and done.stderr == (
            f"{path}:1: rule 1 (sat): {leg}.congestion: {algo!r} is not allowed for this "
            "process: add it to net.ipv4.tcp_allowed_congestion_control, or give the daemon "
            "CAP_NET_ADMIN (run as root, or restart it with this policy so that it is "
            "kept)\n"), done
        assert policy_file.load(str(path), Config()).congestions() == {algo}   # root
        done = subprocess.run([*as_nobody, "-m", "tcp_intercept.policy_file", str(path)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done


@pytest.mark.parametrize("options, message", [
    (["-u", "no-such-user"], "no such user 'no-such-user'"),
    (["-u", "nobody", "-g", "no-such-group"], "no such group 'no-such-group'"),
    (["-g", "nogroup"], "--group: give --user too"),
])
def test_a_bad_user_or_group_exits_64_before_anything_is_bound(topo, options, message):
    done = topo.run(topo.rtr, sys.executable, "-m", "tcp_intercept", "-f", *options,
                    check=False, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 64, done
    assert message in done.stderr and len(done.stderr.splitlines()) == 2
    assert "Listening" not in done.stderr + done.stdout
    assert "5000" not in topo.run(topo.rtr, "ss", "-Htln").stdout


def test_the_control_socket_belongs_to_the_user(topo, start_daemon, nobodys_dir):
    daemon = start_daemon("-u", "nobody", control=True, log_file=nobodys_dir / "d.log")
    found = daemon.control_path.stat()
    assert (found.st_uid, found.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)
    assert daemon.info()["Pid"] == str(daemon.pid)
    pid = daemon.pid
    daemon.stop()
    assert not pid_alive(pid)


@pytest.mark.parametrize("options, caps", [
    ([], []),
    (["-B", "client"], ["CAP_NET_ADMIN"]),
    (["-C", "reno"], []),
    (["-C", "cubic"], ["CAP_NET_ADMIN"]),
    (["--client-congestion", "cubic"], []),  # set on the listener, before dropping
    (["-B", "[0.0.0.0]:[80]"], ["CAP_NET_BIND_SERVICE"]),
    (["-B", "[0.0.0.0]:[0]", "-k", "-M"], []),
])
def test_what_each_option_still_needs(monkeypatch, tmp_path, options, caps):
    from tcp_intercept import cli, privileges, sockopts
    allowed = tmp_path / "allowed"
    allowed.write_text("reno bbr\n")
    monkeypatch.setattr(privileges, "ALLOWED_CONGESTION", str(allowed))
    monkeypatch.setattr(sockopts, "available_congestion", lambda: ["reno", "bbr", "cubic"])
    monkeypatch.setattr(sockopts, "mptcp_available", lambda: True)
    assert privileges.needed(cli.parse_args(options)) == caps
