"""Several proxy routers between an edge and a core router: the world of
contrib/multi-router, built from its files (sysctl.conf, handoff.nft, the
BIRD configurations) the way an operator installs them::

    <tag>-cli        <tag>-edge              <tag>-r1 ... -rN          <tag>-core        <tag>-srv
    c0 10.93.1.2 --- ec 10.93.1.1            edge 10.93.10.1i          cs 10.93.2.1 --- s0 10.93.2.2
                     lan 10.93.10.1 (bridge) core 10.93.20.1i          lan 10.93.20.1 (bridge)
                       r1..rN ports          peer 10.93.30.1i            r1..rN ports
                     peers (bridge, no address: the proxy routers' peer link)

(IPv6 likewise: fd93:<net>::<host>.) The edge and the core each hold a
bridge with a port per proxy router: a router that dies leaves their link
up, as behind a switch, so only the failover mechanism can notice.

The edge routes everything over the proxy routers, the core routes the
clients' network over them: ECMP, hash policy 3 with the same seed. With
``bird=True`` BIRD runs on all of them and BFD keeps the next hops to live
routers (contrib/multi-router's configurations, two proxy routers); without,
the same routes are installed once with `ip route`. Each proxy router runs
tproxy.sh (--pass-mark 0x2/0x2) and the hand-off (handoff.nft, table 6);
its daemon is started with ``start_daemon(i, ...)``.

Every process started here is stopped by its pid when the world goes down.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

from .intercept import REPO, Daemon
from .netns import TopologyError, inside, pid_alive, wait_for
from .topology import TPROXY_SH, Topology, _check

RECIPE = REPO / "contrib" / "multi-router"
HANDOFF_TABLE, HANDOFF_MARK = 6, "0x2/0x2"


def v4(net: int, host: int) -> str:
    return f"10.93.{net}.{host}"


def v6(net: int, host: int) -> str:
    return f"fd93:{net}::{host}"


CLIENTS, SERVERS, OUTSIDE, INSIDE, PEERS = 1, 2, 10, 20, 30


class Routers(Topology):
    """cli, edge, r1..rN, core, srv; a context manager like Topology."""

    CLIENT4, SERVER4 = v4(CLIENTS, 2), v4(SERVERS, 2)
    CLIENT6, SERVER6 = v6(CLIENTS, 2), v6(SERVERS, 2)

    def __init__(self, routers: int = 2, port: int = 5000, bird: bool = True,
                 workdir: Path | None = None):
        super().__init__(port=port, tproxy=False)
        self.tag = f"ti{os.getpid()}x{secrets.token_hex(3)}"  # as Topology: swept if we die
        self.count = routers
        self.bird = bird
        self.workdir = Path(workdir) if workdir else None
        self.cli, self.edge, self.core, self.srv = (
            f"{self.tag}-{role}" for role in ("cli", "edge", "core", "srv"))
        self.routers = [f"{self.tag}-r{i}" for i in range(1, routers + 1)]
        self.rtr = self.routers[0]
        self.birds: dict[str, subprocess.Popen] = {}

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.cli, self.edge, *self.routers, self.core, self.srv)

    # -- building ----------------------------------------------------------

    def up(self) -> None:
        if self.bird and not shutil.which("bird"):
            raise TopologyError("bird is not installed (Debian package bird2; scripts/setup.sh "
                                "installs it)")
        for ns in self.namespaces:
            _check(["ip", "netns", "add", ns])
            self._made.append(ns)
            self._prepare(ns)
            if ns not in (self.cli, self.srv):
                self._sysctls(ns)
        self._pair(self.cli, "c0", self.edge, "ec", CLIENTS, 2, 1)
        self._pair(self.srv, "s0", self.core, "cs", SERVERS, 2, 1)
        for ns, net in ((self.edge, OUTSIDE), (self.core, INSIDE)):
            self._bridge(ns, "lan", net, 1)
        self._bridge(self.edge, "peers", None, None)
        for i, ns in enumerate(self.routers, 1):
            self._port(ns, "edge", self.edge, "lan", OUTSIDE, 10 + i)
            self._port(ns, "core", self.core, "lan", INSIDE, 10 + i)
            self._port(ns, "peer", self.edge, "peers", PEERS, 10 + i)
            self._route(ns, "default", v4(INSIDE, 1), v6(INSIDE, 1))
            self._route(ns, f"{v4(CLIENTS, 0)}/24", v4(OUTSIDE, 1), f"{v6(CLIENTS, 0)}/64",
                        v6(OUTSIDE, 1))
            self.run(ns, str(TPROXY_SH), "--port", str(self.port), "--pass-mark", HANDOFF_MARK,
                     "up")
            self.run(ns, "nft", "-f", str(RECIPE / "handoff.nft"))
            for fam in ("-4", "-6"):
                self.run(ns, "ip", fam, "rule", "add", "fwmark", HANDOFF_MARK,
                         "lookup", str(HANDOFF_TABLE), "pref", "100")
        self._route(self.cli, "default", v4(CLIENTS, 1), v6(CLIENTS, 1))
        self._route(self.srv, "default", v4(SERVERS, 1), v6(SERVERS, 1))
        if self.bird:
            for ns in (self.edge, self.core, *self.routers):
                self.start_bird(ns)
            self.wait_routes()
        else:
            self._static_routes()

    def _sysctls(self, ns: str) -> None:
        """contrib/multi-router/sysctl.conf, as `sysctl -p` applies it."""
        with inside(ns):
            for line in (RECIPE / "sysctl.conf").read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, value = (part.strip() for part in line.split("=", 1))
                    Path("/proc/sys", key.replace(".", "/")).write_text(f"{int(value, 0)}\n")

    def _pair(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str, net: int, host_a: int,
              host_b: int) -> None:
        _check(["ip", "-n", ns_a, "link", "add", dev_a, "type", "veth",
                "peer", "name", dev_b, "netns", ns_b])
        self._address(ns_a, dev_a, f"{v4(net, host_a)}/24", f"{v6(net, host_a)}/64")
        self._address(ns_b, dev_b, f"{v4(net, host_b)}/24", f"{v6(net, host_b)}/64")

    def _bridge(self, ns: str, dev: str, net: int | None, host: int | None) -> None:
        _check(["ip", "-n", ns, "link", "add", dev, "type", "bridge"])
        if net is None:
            _check(["ip", "-n", ns, "link", "set", dev, "up"])
        else:
            self._address(ns, dev, f"{v4(net, host)}/24", f"{v6(net, host)}/64")

    def _port(self, ns: str, dev: str, switch_ns: str, bridge: str, net: int, host: int) -> None:
        """A link from router ns (dev, addressed) to a port of bridge in switch_ns."""
        port = f"{dev[0]}{ns.rsplit('-', 1)[1]}"  # e.g. "er1": r1's port on the edge's side
        _check(["ip", "-n", switch_ns, "link", "add", port, "type", "veth",
                "peer", "name", dev, "netns", ns])
        _check(["ip", "-n", switch_ns, "link", "set", port, "master", bridge, "up"])
        self._address(ns, dev, f"{v4(net, host)}/24", f"{v6(net, host)}/64")

    def _route(self, ns: str, *spec: str) -> None:
        """default VIA4 VIA6, or NET4 VIA4 NET6 VIA6."""
        if len(spec) == 3:
            spec = (spec[0], spec[1], spec[0], spec[2])
        net4, via4, net6, via6 = spec
        _check(["ip", "-n", ns, "route", "add", net4, "via", via4])
        _check(["ip", "-n", ns, "-6", "route", "add", net6, "via", via6])

    def _static_routes(self) -> None:
        """The routes BIRD would install, once, as nexthop groups (the
        recipe's other form): the proxy routers in address order."""
        hosts = range(11, 11 + self.count)
        for ns, net4, net6, side in ((self.edge, "default", "default", OUTSIDE),
                                     (self.core, f"{v4(CLIENTS, 0)}/24",
                                      f"{v6(CLIENTS, 0)}/64", INSIDE)):
            for base, fam, net, addr in ((100, "-4", net4, v4), (200, "-6", net6, v6)):
                for h in hosts:
                    _check(["ip", "-n", ns, fam, "nexthop", "add", "id", str(base + h), "via",
                            addr(side, h), "dev", "lan"])
                _check(["ip", "-n", ns, "nexthop", "add", "id", str(base), "group",
                        "/".join(str(base + h) for h in hosts)])
                _check(["ip", "-n", ns, fam, "route", "add", net, "nhid", str(base)])
        for i, ns in enumerate(self.routers, 1):
            others = [h for h in hosts if h != 10 + i]
            for fam, addr in (("-4", v4), ("-6", v6)):
                if others:
                    hops = [word for h in others for word in ("nexthop", "via", addr(PEERS, h))]
                    _check(["ip", "-n", ns, fam, "route", "add", "default", "table",
                            str(HANDOFF_TABLE), *hops])

    def route_through(self, routers: list[int]) -> None:
        """Without BIRD: the edge's and the core's groups become routers
        (1..N), in order, as BIRD would make them when BFD says so."""
        for ns in (self.edge, self.core):
            for base in (100, 200):
                self.run(ns, "ip", "nexthop", "replace", "id", str(base), "group",
                         "/".join(str(base + 10 + i) for i in routers))

    # -- BIRD --------------------------------------------------------------

    def bird_conf(self, ns: str) -> Path:
        if ns in self.routers:
            return RECIPE / f"bird-proxy{self.routers.index(ns) + 1}.conf"
        return RECIPE / ("bird-edge.conf" if ns == self.edge else "bird-core.conf")

    def start_bird(self, ns: str) -> subprocess.Popen:
        """BIRD in ns with the recipe's configuration, in the foreground."""
        assert self.workdir, "BIRD needs a workdir for its control socket"
        role = ns.rsplit("-", 1)[1]
        out = open(self.workdir / f"bird-{role}.out", "ab")  # noqa: SIM115 (the child's)
        with out:
            self.birds[ns] = self.popen(ns, "bird", "-f", "-c", str(self.bird_conf(ns)),
                                        "-s", str(self.workdir / f"bird-{role}.ctl"),
                                        "-P", str(self.workdir / f"bird-{role}.pid"),
                                        stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT)
        return self.birds[ns]

    def birdc(self, ns: str, *command: str) -> str:
        role = ns.rsplit("-", 1)[1]
        return self.run(ns, "birdc", "-s", str(self.workdir / f"bird-{role}.ctl"),
                        *command).stdout

    def next_hops(self, ns: str, family: str) -> list[str]:
        """The proxy routers' addresses in ns's ECMP route, in the kernel's order."""
        net = "default" if ns == self.edge else (
            f"{v4(CLIENTS, 0)}/24" if family == "-4" else f"{v6(CLIENTS, 0)}/64")
        out = self.run(ns, "ip", family, "route", "show", net).stdout
        return re.findall(r"via (?:inet6 )?(\S+)", out)

    def live(self, ns: str) -> list[int]:
        """Which proxy routers (1..N) ns's routes go through, both families."""
        found = []
        for family, addr in (("-4", v4), ("-6", v6)):
            side = OUTSIDE if ns == self.edge else INSIDE
            found.append([h - 10 for h in range(11, 11 + self.count)
                          if addr(side, h) in self.next_hops(ns, family)])
        return found[0] if found[0] == found[1] else []

    def wait_routes(self, routers: list[int] | None = None, timeout: float = 15) -> None:
        """Until the edge's and the core's routes (both families) go through
        exactly routers (default: all)."""
        want = routers or list(range(1, self.count + 1))

        def settled() -> bool:
            return all(self.live(ns) == want for ns in (self.edge, self.core))
        wait_for(settled, timeout, f"the ECMP routes through routers {want}")

    # -- failures ----------------------------------------------------------

    def _switch_ports(self, i: int, state: str) -> None:
        """Router i's ports on the bridges (the edge's and the core's own
        links stay up, as behind a switch)."""
        for dev in ("e", "c", "p"):
            _check(["ip", "-n", self.edge if dev != "c" else self.core, "link", "set",
                    f"{dev}r{i}", state])

    def kill(self, i: int) -> None:
        """Router i dies: its links go dark and every process in it (its
        daemon's master and workers, BIRD) is killed."""
        ns = self.routers[i - 1]
        self._switch_ports(i, "down")
        out = subprocess.run(["ip", "netns", "pids", ns], check=True, capture_output=True,
                             text=True, timeout=10).stdout
        for pid in map(int, out.split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in map(int, out.split()):
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"pid {pid} to die")
        self.birds.pop(ns, None)

    def revive(self, i: int) -> None:
        """Router i's links come back (its daemon and BIRD are started by the caller)."""
        self._switch_ports(i, "up")

    def start_daemon(self, i: int, *args: str, name: str | None = None, **kw) -> Daemon:
        """tcp-intercept in proxy router i (1..N)."""
        assert self.workdir, "the daemons need a workdir"
        return Daemon(self, *args, workdir=self.workdir, name=name or f"r{i}",
                      ns=self.routers[i - 1], **kw).start()

    def handed_off(self, i: int) -> int:
        """Packets proxy router i has handed to its peers (handoff.nft's counter)."""
        out = self.run(self.routers[i - 1], "nft", "list", "table", "inet",
                       "tcp_intercept_handoff").stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))
