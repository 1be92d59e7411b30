"""The world the integration tests, the demo and the bench run in.

Three network namespaces joined by veth pairs, the router in the middle
forwarding and intercepting with TPROXY::

    <tag>-cli              <tag>-rtr                        <tag>-srv
    c0 10.91.1.2/24 <-veth-> rc 10.91.1.1/24
       fd91:1::2/64            fd91:1::1/64
                             rs 10.91.2.1/24 <-veth-> s0 10.91.2.2/24
                                fd91:2::1/64             fd91:2::2/64

Client and server both route everything through the router, so the server's
answers to a spoofed (``-B client``) connection come back through the daemon.
The addresses are the same in every topology: each lives in namespaces of
its own (``ti<pid>x<6 random hex digits>-<role>``, pid being the process
that built it), so topologies never meet, and nothing is changed outside
them. A run killed before its teardown leaves its namespaces behind;
sweep_stale() deletes those whose building process is gone, and never a
live run's (other runs of the suite may share the machine).

Every process started here is remembered and stopped by its pid (TERM, then
KILL) when the topology goes down, even after a failure. Every wait is a
bounded poll. No pytest in here: the demo and the bench import it too.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Self

from .intercept import REPO, Daemon
from .netns import TopologyError, inside, listens, pid_alive, terminate, wait_for

# Daemon and the primitives are part of what importers of this module use.
__all__ = ["REPO", "TPROXY_SH", "Daemon", "Topology", "TopologyError", "inside", "pid_alive",
           "sweep_stale", "wait_for"]

TPROXY_SH = REPO / "contrib" / "tproxy.sh"
NAME = re.compile(r"ti(\d+)x[0-9a-f]{6}-\w+")  # what Topology names its namespaces


class Topology:
    """Client, router and server namespaces; a context manager.

    up() builds everything and installs the interception rules in the router
    (port ``port``); down() stops every process started through this object
    and deletes the namespaces. down() is idempotent and never raises.
    """

    CLIENT4, ROUTER4_C, ROUTER4_S, SERVER4 = "10.91.1.2", "10.91.1.1", "10.91.2.1", "10.91.2.2"
    CLIENT6, ROUTER6_C, ROUTER6_S, SERVER6 = "fd91:1::2", "fd91:1::1", "fd91:2::1", "fd91:2::2"

    def __init__(self, port: int = 5000, tproxy: bool = True):
        self.tag = f"ti{os.getpid()}x{secrets.token_hex(3)}"
        self.cli, self.rtr, self.srv = (f"{self.tag}-{role}" for role in ("cli", "rtr", "srv"))
        self.port = port
        self.tproxy = tproxy
        self._procs: list[subprocess.Popen] = []
        self._pids: list[int] = []
        self._made: list[str] = []

    def __enter__(self) -> Self:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.cli, self.rtr, self.srv

    # -- building ----------------------------------------------------------

    def up(self) -> None:
        for ns in self.namespaces:
            _check(["ip", "netns", "add", ns])
            self._made.append(ns)
            self._prepare(ns)
        _check(["ip", "-n", self.cli, "link", "add", "c0", "type", "veth",
                "peer", "name", "rc", "netns", self.rtr])
        _check(["ip", "-n", self.srv, "link", "add", "s0", "type", "veth",
                "peer", "name", "rs", "netns", self.rtr])
        self._address(self.cli, "c0", f"{self.CLIENT4}/24", f"{self.CLIENT6}/64")
        self._address(self.rtr, "rc", f"{self.ROUTER4_C}/24", f"{self.ROUTER6_C}/64")
        self._address(self.rtr, "rs", f"{self.ROUTER4_S}/24", f"{self.ROUTER6_S}/64")
        self._address(self.srv, "s0", f"{self.SERVER4}/24", f"{self.SERVER6}/64")
        for ns, via4, via6 in ((self.cli, self.ROUTER4_C, self.ROUTER6_C),
                               (self.srv, self.ROUTER4_S, self.ROUTER6_S)):
            _check(["ip", "-n", ns, "route", "add", "default", "via", via4])
            _check(["ip", "-n", ns, "-6", "route", "add", "default", "via", via6])
        if self.tproxy:
            self.install_tproxy()

    def _prepare(self, ns: str) -> None:
        """Sysctls first: new interfaces copy the 'default' values when created."""
        _check(["ip", "-n", ns, "link", "set", "lo", "up"])
        values = {
            "net/ipv4/ip_forward": 1,
            "net/ipv4/conf/all/rp_filter": 0,
            "net/ipv4/conf/default/rp_filter": 0,
            "net/ipv6/conf/all/disable_ipv6": 0,
            "net/ipv6/conf/default/disable_ipv6": 0,
            "net/ipv6/conf/all/accept_dad": 0,
            "net/ipv6/conf/default/accept_dad": 0,
            "net/ipv6/conf/all/forwarding": 1,
        }
        with inside(ns):
            for key, value in values.items():
                Path("/proc/sys", key).write_text(f"{value}\n")

    def _address(self, ns: str, dev: str, v4: str, v6: str) -> None:
        _check(["ip", "-n", ns, "addr", "add", v4, "dev", dev])
        _check(["ip", "-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"])
        _check(["ip", "-n", ns, "link", "set", dev, "up"])

    def install_tproxy(self) -> None:
        """The interception rules in the router, as an operator installs them."""
        self.run(self.rtr, str(TPROXY_SH), "--family", "all",
                 "--port", str(self.port), "up")

    def wait_heartbeat(self, family: str = "4", timeout: float = 5) -> None:
        """tproxy.sh's iptables rules (--fail open) apply TPROXY only while
        the daemon's heartbeat is fresh in the recent list: empty it (a dead
        daemon's entry stays listed) and wait for the next beat. Without the
        list (nft, --fail closed) there is nothing to wait for."""
        recent = "/proc/net/xt_recent/tcp_intercept"
        if self.run(self.rtr, "sh", "-c", f"echo / > {recent}", check=False).returncode:
            return
        entry = "src=0.0.0.0 " if family == "4" else "src=0000:0000:0000:0000:0000:0000:0000:0000"
        wait_for(lambda: entry in self.run(self.rtr, "cat", recent, check=False).stdout,
                 timeout, f"the daemon's IPv{family} heartbeat in {recent}", interval=0.05)

    def down(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                terminate(proc)
        for pid in reversed(self._pids):
            with contextlib.suppress(Exception):
                terminate(pid)
        # Anything still in our namespaces was started by us (a grandchild,
        # a daemonized child): stop it by pid before the namespace goes.
        for ns in self._made:
            _empty(ns)
        for ns in reversed(self._made):
            _delete(ns)
        self._procs.clear()
        self._pids.clear()
        self._made.clear()

    # -- processes ---------------------------------------------------------

    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = 30,
            **kw) -> subprocess.CompletedProcess:
        """cmd inside ns, to completion; output captured as text."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        result = subprocess.run(["ip", "netns", "exec", ns, *cmd], check=False,
                                timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise TopologyError(f"{' '.join(cmd)} in {ns} exited {result.returncode}:\n"
                                f"{result.stdout or ''}{result.stderr or ''}")
        return result

    def serve(self, ns: str, port: int, *cmd: str, timeout: float = 10,
              **kw) -> subprocess.Popen:
        """popen() a server and wait until it listens on port."""
        proc = self.popen(ns, *cmd, **kw)
        def up() -> bool:
            if proc.poll() is not None:
                raise TopologyError(f"{cmd[0]} exited {proc.returncode} before listening")
            return listens(proc.pid, port)
        wait_for(up, timeout, f"{cmd[0]} to listen on port {port} in {ns}")
        return proc

    def popen(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        """cmd inside ns, in the background; stopped by pid in down().

        `ip netns exec` execs the command, so the Popen's pid is the command's.
        """
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)
        self._procs.append(proc)
        return proc

    def adopt(self, pid: int) -> None:
        """A process that is not our child (a daemon that detached): stop it in down()."""
        self._pids.append(pid)

    # -- sockets from this process ----------------------------------------

    def socket(self, ns: str, family: int = socket.AF_INET,
               kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        with inside(ns):
            return socket.socket(family, kind, proto)

    def connect(self, ns: str, host: str, port: int, timeout: float = 10) -> socket.socket:
        """A TCP connection from ns to host:port (blocking socket with a timeout)."""
        sock = self.socket(ns, socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock


def sweep_stale() -> list[str]:
    """Delete the namespaces a Topology built in a process that is gone (a
    killed run), stopping what still runs in them first; the names deleted.

    Only names of Topology's own pattern whose pid no longer lives: a live
    run's namespaces (its pid alive) are never touched, nor anyone else's. A
    pid reused since by another process keeps its namespaces for now, the
    safe side. Never raises.
    """
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    stale = [ns for ns in names
             if (found := NAME.fullmatch(ns)) and not pid_alive(int(found[1]))]
    for ns in stale:
        _empty(ns)
        _delete(ns)
    return stale


def _empty(ns: str) -> None:
    """Stop by pid whatever still runs in ns (a grandchild, a detached daemon)."""
    with contextlib.suppress(Exception):
        out = subprocess.run(["ip", "netns", "pids", ns], check=False,
                             capture_output=True, text=True, timeout=10).stdout
        for pid in map(int, out.split()):
            terminate(pid)


def _delete(ns: str) -> None:
    with contextlib.suppress(Exception):
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


def _check(cmd: list[str]) -> None:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise TopologyError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
