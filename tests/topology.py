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
its own (``ti`` + 6 random hex digits + role), so topologies never meet, and
nothing is changed outside them.

Every process started here is remembered and stopped by its pid (TERM, then
KILL) when the topology goes down, even after a failure. Every wait is a
bounded poll. No pytest in here: the demo and the bench import it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
TPROXY_SH = REPO / "contrib" / "tproxy.sh"
CLONE_NEWNET = 0x40000000
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # the same number on every architecture
_libc = ctypes.CDLL(None, use_errno=True)


class TopologyError(RuntimeError):
    """The world could not be built, or something in it did not happen in time."""


def wait_for(check, timeout: float, what: str, interval: float = 0.01):
    """Poll check() until it returns something true; TopologyError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


@contextlib.contextmanager
def inside(ns: str):
    """Run this thread (only) in network namespace ns for the duration.

    A socket created here stays in ns for life, so tests can drive clients
    and servers from their own process, with every socket call at hand.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                # A thread stuck in a test namespace would poison everything after it.
                os.abort()
    finally:
        os.close(target)
        os.close(home)


def _syscall(number: int, *args: int) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listens(pid: int, port: int) -> bool:
    """Whether one of process pid's own descriptors is a socket listening on port."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    return False


def terminate(proc_or_pid, timeout: float = 5.0) -> int | None:
    """TERM, wait up to timeout, then KILL; the exit status if it was our child."""
    proc = proc_or_pid if isinstance(proc_or_pid, subprocess.Popen) else None
    pid = proc.pid if proc else proc_or_pid
    gone = (lambda: proc.poll() is not None) if proc else (lambda: not pid_alive(pid))
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if gone():
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        with contextlib.suppress(TopologyError):
            wait_for(gone, wait, f"pid {pid} to exit")
    return proc.wait(timeout=1) if proc and gone() else None


class Topology:
    """Client, router and server namespaces; a context manager.

    up() builds everything and installs the interception rules in the router
    (port ``port``); down() stops every process started through this object
    and deletes the namespaces. down() is idempotent and never raises.
    """

    CLIENT4, ROUTER4_C, ROUTER4_S, SERVER4 = "10.91.1.2", "10.91.1.1", "10.91.2.1", "10.91.2.2"
    CLIENT6, ROUTER6_C, ROUTER6_S, SERVER6 = "fd91:1::2", "fd91:1::1", "fd91:2::1", "fd91:2::2"

    def __init__(self, port: int = 5000, tproxy: bool = True):
        self.tag = "ti" + secrets.token_hex(3)
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
        if TPROXY_SH.exists():
            self.run(self.rtr, str(TPROXY_SH), "--family", "all",
                     "--port", str(self.port), "up")
            return
        # contrib/tproxy.sh has not landed yet: the recipe of the original's
        # README, for both families.
        for ip, tables, anywhere in (("-4", "iptables", "0.0.0.0/0"), ("-6", "ip6tables", "::/0")):
            mangle = [tables, "-w", "-t", "mangle"]
            self.run(self.rtr, "ip", ip, "rule", "add", "fwmark", "0x1/0x1", "table", "5")
            self.run(self.rtr, "ip", ip, "route", "add", "local", anywhere, "dev", "lo",
                     "table", "5")
            self.run(self.rtr, *mangle, "-N", "tproxy")
            for rule in (["-m", "socket", "-j", "MARK", "--set-mark", "0x1/0x1"],
                         ["-m", "socket", "-j", "RETURN"],
                         ["-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"],
                         ["-j", "TPROXY", "--on-port", str(self.port), "--tproxy-mark", "0x1/0x1"]):
                self.run(self.rtr, *mangle, "-A", "tproxy", "-p", "tcp", *rule)
            self.run(self.rtr, *mangle, "-A", "PREROUTING", "-j", "tproxy")

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
            with contextlib.suppress(Exception):
                out = subprocess.run(["ip", "netns", "pids", ns], check=False,
                                     capture_output=True, text=True, timeout=10).stdout
                for pid in map(int, out.split()):
                    terminate(pid)
        for ns in reversed(self._made):
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "netns", "del", ns], check=False,
                               capture_output=True, timeout=10)
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
               kind: int = socket.SOCK_STREAM) -> socket.socket:
        with inside(ns):
            return socket.socket(family, kind)

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


def _check(cmd: list[str]) -> None:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise TopologyError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")


class Daemon:
    """tcp-intercept in the router namespace, started the way an operator does.

    Foreground (-f) by default, its stderr and stdout in ``<name>.out`` under
    workdir. With foreground=False it detaches: start() keeps the launcher's
    exit status (``launcher_status``) and takes the daemon's pid from the pid
    file. start() returns once the daemon's own listening socket exists and
    it has logged that its event loop runs.
    """

    READY = "Setup done, starting event loop"

    def __init__(self, topo: Topology, *args: str, workdir: Path, name: str = "daemon",
                 listen: str | None = None, log_file: bool = False,
                 foreground: bool = True, pid_file: bool = False):
        self.topo = topo
        self.workdir = Path(workdir)
        self.listen = listen or f"[0.0.0.0]:[{topo.port}]"
        self.port = int(self.listen.rsplit(":", 1)[1].strip("[]"))
        self.out_path = self.workdir / f"{name}.out"
        self.log_path = self.workdir / f"{name}.log" if log_file else None
        self.pid_path = self.workdir / f"{name}.pid" if pid_file else None
        self.foreground = foreground
        self.args = ["-b", self.listen, *args]
        if self.log_path:
            self.args += ["-l", str(self.log_path)]
        if self.pid_path:
            self.args += ["-p", str(self.pid_path)]
        if foreground:
            self.args.append("-f")
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.launcher_status: int | None = None
        # Detached: whether the daemon listened the moment its launcher exited.
        self.listening_at_launch: bool | None = None
        self.stopped = False

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "tcp_intercept", *self.args]

    def start(self, timeout: float = 20) -> Daemon:
        # cwd too: `python -m` imports from the working directory first.
        env, cwd = {**os.environ, "PYTHONPATH": str(REPO)}, str(REPO)
        with open(self.out_path, "ab") as out:
            if self.foreground:
                self.proc = self.topo.popen(self.topo.rtr, *self.command, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
                self.pid = self.proc.pid
            else:
                # Output to a file, not a pipe: a daemon that kept the pipe
                # open would make us wait for its death, not its launcher's.
                self.launcher_status = self.topo.run(
                    self.topo.rtr, *self.command, check=False, timeout=timeout + 5,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, cwd=cwd).returncode
                if self.launcher_status != 0:
                    return self
                self.pid = int(self.pid_path.read_text().strip())
                self.topo.adopt(self.pid)
                self.listening_at_launch = listens(self.pid, self.port)
        wait_for(self._ready, timeout, f"the daemon to listen on port {self.port}\n{self.output()}")
        return self

    def _ready(self) -> bool:
        if not self.alive():
            raise TopologyError(f"the daemon exited before it was ready:\n{self.output()}")
        return self.READY in self.output() and listens(self.pid, self.port)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    def fds(self) -> list[str]:
        """Where each open descriptor points (``socket:[...]``, ``pipe:[...]``, paths)."""
        base = f"/proc/{self.pid}/fd"
        found = []
        for fd in os.listdir(base):
            with contextlib.suppress(OSError):
                found.append(os.readlink(f"{base}/{fd}"))
        return found

    def borrow_sockets(self) -> list[socket.socket]:
        """Duplicates of the daemon's sockets (pidfd_getfd), to inspect with
        getsockopt(); closing them leaves the daemon's own open."""
        pidfd = _syscall(SYS_PIDFD_OPEN, self.pid, 0)
        found = []
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:"):
                        found.append(socket.socket(fileno=_syscall(SYS_PIDFD_GETFD,
                                                                   pidfd, int(fd), 0)))
        finally:
            os.close(pidfd)
        return found

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 10) -> int | None:
        """TERM then KILL; the exit status when it was started in the foreground."""
        self.stopped = True
        if self.pid is None:
            return None
        return terminate(self.proc or self.pid, timeout)

    def output(self) -> str:
        """Everything it wrote: the -f output, then the log file if any."""
        text = ""
        for path in (self.out_path, self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace") if path else ""
        return text

    def lines(self, text: str) -> list[str]:
        return [line for line in self.output().splitlines() if text in line]

    def wait_log(self, text: str, timeout: float = 10, count: int = 1) -> list[str]:
        """The log lines containing text, once there are at least count of them."""
        return wait_for(lambda: len(self.lines(text)) >= count and self.lines(text),
                        timeout, f"{count} log line(s) with {text!r}\n{self.output()}")
