"""tcp-intercept itself, run in the router namespace of a Topology."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tcp_intercept.ctl import ask
from tcp_intercept.logs import FLUSH_DELAY

from .netns import TopologyError, borrow_sockets, listens, pid_alive, terminate, wait_for

if TYPE_CHECKING:
    from .topology import Topology

REPO = Path(__file__).resolve().parent.parent


def installed_copy(where: Path) -> Path:
    """A copy of the package in where/install, for a test to change as the
    installed program (Daemon(repo=...) runs it): the copy's root."""
    install = where / "install"
    shutil.copytree(REPO / "tcp_intercept", install / "tcp_intercept",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return install


class Daemon:
    """tcp-intercept in the router namespace (or namespace ``ns`` of the
    topology), started the way an operator does.

    Foreground (-f) by default, its stderr and stdout in ``<name>.out`` under
    workdir. With foreground=False it detaches: start() keeps the launcher's
    exit status (``launcher_status``) and takes the daemon's pid from the pid
    file. start() returns once the daemon's own listening socket exists and
    it has logged that its event loop runs.
    """

    READY = "Setup done, starting event loop"

    def __init__(self, topo: Topology, *args: str, workdir: Path, name: str = "daemon",
                 listen: str | None = None, log_file: bool | Path = False,
                 foreground: bool = True, pid_file: bool | Path = False, control: bool = False,
                 repo: Path | None = None, ns: str | None = None):
        self.topo = topo
        self.ns = ns or topo.rtr
        self.repo = repo or REPO  # where tcp_intercept is imported from
        self.workdir = Path(workdir)
        self.listen = listen or f"[0.0.0.0]:[{topo.port}]"
        self.port = int(self.listen.rsplit(":", 1)[1].strip("[]"))
        self.out_path = self.workdir / f"{name}.out"
        if isinstance(log_file, Path):
            self.log_path: Path | None = log_file
        else:
            self.log_path = self.workdir / f"{name}.log" if log_file else None
        if isinstance(pid_file, Path):
            self.pid_path: Path | None = pid_file
        else:
            self.pid_path = self.workdir / f"{name}.pid" if pid_file else None
        self.foreground = foreground
        self.args = ["-b", self.listen, *args]
        if self.log_path:
            self.args += ["-l", str(self.log_path)]
        if self.pid_path:
            self.args += ["-p", str(self.pid_path)]
        self.control_path = self.workdir / f"{name}.sock" if control else None
        if self.control_path:
            self.args += ["--control", str(self.control_path)]
        if foreground:
            self.args.append("-f")
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.launcher_status: int | None = None
        # Detached: whether the daemon listened the moment its launcher
        # exited, and (with control) its show info then.
        self.listening_at_launch: bool | None = None
        self.info_at_launch: str | None = None
        self.stopped = False

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "tcp_intercept", *self.args]

    def start(self, timeout: float = 20) -> Daemon:
        # cwd too: `python -m` imports from the working directory first.
        env, cwd = {**os.environ, "PYTHONPATH": str(self.repo)}, str(self.repo)
        with open(self.out_path, "ab") as out:
            if self.foreground:
                self.proc = self.topo.popen(self.ns, *self.command, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
                self.pid = self.proc.pid
            else:
                # Output to a file, not a pipe: a daemon that kept the pipe
                # open would make us wait for its death, not its launcher's.
                self.launcher_status = self.topo.run(
                    self.ns, *self.command, check=False, timeout=timeout + 5,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, cwd=cwd).returncode
                if self.launcher_status != 0:
                    return self
                self.pid = int(self.pid_path.read_text().strip())
                self.topo.adopt(self.pid)
                self.listening_at_launch = listens(self.pid, self.port)
                if self.control_path:
                    self.info_at_launch = self.ask("show info")
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

    def workers(self) -> list[int]:
        """The pids of the daemon's workers (the master's children)."""
        try:
            return [int(pid) for pid in
                    Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except OSError:
            return []

    @property
    def worker(self) -> int:
        """The pid of the one worker (-w 1, the default)."""
        [pid] = wait_for(self.workers, 10, "the daemon's worker")
        return pid

    def fds(self) -> list[str]:
        """Where each open descriptor of the workers points (``socket:[...]``,
        ``pipe:[...]``, paths): the connections live there."""
        return [fd for pid in self.workers() for fd in _fds(pid)]

    def master_fds(self) -> list[str]:
        return _fds(self.pid)

    def pipes(self) -> list[str]:
        return [fd for fd in self.fds() if fd.startswith("pipe:")]

    def borrow_sockets(self) -> list[socket.socket]:
        """Duplicates of the worker's sockets, to inspect with getsockopt()."""
        return borrow_sockets(self.worker)

    def ask(self, command: str) -> str:
        """The control socket's answer to command."""
        return ask(str(self.control_path), command).decode()

    def info(self) -> dict[str, str]:
        """`show info` as {key: value}."""
        return dict(line.split(": ", 1) for line in self.ask("show info").splitlines())

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

    def lines_by_now(self, text: str) -> list[str]:
        """lines(text) once any connection line of what just happened is
        written: for checking that something was NOT logged. The daemon
        writes its connection lines within FLUSH_DELAY. (A check after a
        fixed wait: prefer proving the negative from the other side.)"""
        time.sleep(3 * FLUSH_DELAY)
        return self.lines(text)

    def wait_log(self, text: str, timeout: float = 10, count: int = 1) -> list[str]:
        """The log lines containing text, once there are at least count of them."""
        return wait_for(lambda: len(self.lines(text)) >= count and self.lines(text),
                        timeout, f"{count} log line(s) with {text!r}\n{self.output()}")


def _fds(pid: int) -> list[str]:
    found = []
    base = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(base):
            with contextlib.suppress(OSError):
                found.append(os.readlink(f"{base}/{fd}"))
    return found
