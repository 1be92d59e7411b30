"""The seamless upgrade (SIGUSR2): the master execs the installed program in
place, handing it what it holds, and the new code goes on from there.

The promise, in order:
  1. Check      the installed program is run once with the same command line
                and CHECK_ENV set: it imports everything and parses the
                options, binds nothing, exits 0. If it fails (a broken
                install, an import error, an option it no longer takes, or
                no answer within CHECK_TIMEOUT), the old master and workers
                carry on and the log says why. The master's loop runs on
                meanwhile.
  2. exec_new() the descriptors below are made inheritable and named in
                HANDOVER_ENV (JSON); signals are blocked across the exec (a
                HUP or TERM waits for the new master's handlers instead of
                killing it with the default action); the same pid execs the
                program with the same arguments. If exec itself fails, it
                returns and the old master carries on.
  3. take()     the new program finds HANDOVER_ENV: instead of binding,
                detaching and writing the pid file, it adopts the listening
                sockets, the control and metrics sockets, the counters and
                the old workers (their pids and channels), starts new
                workers on the same listening sockets and, once they all
                serve, tells the old ones to drain (master.py).

Handed over: every listening socket (one per worker, one SO_REUSEPORT
group: kept open the whole time, so no connection waiting in a queue is
dropped), the control socket and its file's identity, the metrics socket,
the counters' and the histograms' memfds, each old worker's pid, number
and channel, the
daemon's start time and the old version. Everything else is closed by the
exec (every other descriptor is close-on-exec).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

HANDOVER_ENV = "TCP_INTERCEPT_HANDOVER"
CHECK_ENV = "TCP_INTERCEPT_UPGRADE_CHECK"
CHECK_TIMEOUT = 30.0
# Blocked across the exec, delivered once the new master handles them.
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGCHLD}


@dataclass
class OldWorker:
    pid: int
    number: int
    slot: int
    channel: int  # descriptor


@dataclass
class Handover:
    version: str
    started: float
    listeners: list[int]
    board: int
    histograms: int | None = None  # none from a program older than them
    control: int | None = None
    control_path: str | None = None
    control_file: list[int] | None = None
    metrics: int | None = None
    workers: list[OldWorker] = field(default_factory=list)

    def descriptors(self) -> list[int]:
        fds = [*self.listeners, self.board, *(w.channel for w in self.workers)]
        return fds + [fd for fd in (self.histograms, self.control, self.metrics)
                      if fd is not None]


def program(argv: list[str] | None = None) -> list[str]:
    """The command that started this process, to run again after an
    upgrade: the installed script itself when there is one (its #! line
    names the interpreter the package wants), else `python -m ...`.
    Called at start-up, before detaching changes the working directory."""
    argv = list(sys.orig_argv if argv is None else argv)
    if len(argv) > 1 and not argv[1].startswith("-") and os.access(argv[1], os.X_OK):
        return [os.path.abspath(argv[1]), *argv[2:]]
    return [sys.executable, *argv[1:]]


class Check:
    """Step 1, beside the master's loop (which goes on answering operators
    and replacing workers): the installed program is started at once;
    done() says when it has finished, why_not what went wrong (None: it
    would start). A check that outlives CHECK_TIMEOUT is killed."""

    def __init__(self, command: list[str]):
        self.why_not: str | None = None
        self._deadline = time.monotonic() + CHECK_TIMEOUT
        self._process: subprocess.Popen | None = None
        self._output = None
        try:
            # What it says, in memory: no file system needs to be writable.
            self._output = open(os.memfd_create("upgrade-check"), "w+b")
            self._process = subprocess.Popen(
                command, env={**os.environ, CHECK_ENV: "1"}, stdin=subprocess.DEVNULL,
                stdout=self._output, stderr=self._output)
        except OSError as err:
            self.why_not = str(err)
            if self._output is not None:
                self._output.close()

    def done(self) -> bool:
        if self._process is None:
            return True
        status = self._process.poll()
        if status is None:
            if time.monotonic() < self._deadline:
                return False
            self.cancel()
            self.why_not = f"it did not finish within {CHECK_TIMEOUT:.0f} s"
            return True
        if status != 0:
            self._output.seek(0)
            lines = self._output.read().decode(errors="replace").strip().splitlines() or [""]
            # A traceback ends with what went wrong; a usage error starts with it.
            said = lines[-1] if lines[0].startswith("Traceback") else lines[0]
            self.why_not = f"exit status {status}: {said}"
        self._process = None
        self._output.close()
        return True

    def cancel(self) -> None:
        """Kill the check if it still runs (the master is stopping)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
            self._output.close()


def exec_new(command: list[str], handover: Handover) -> OSError:
    """Step 2: does not return, unless exec fails (the error is returned)."""
    fds = handover.descriptors()
    for fd in fds:
        os.set_inheritable(fd, True)
    env = {**os.environ, HANDOVER_ENV: json.dumps(asdict(handover))}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        os.execve(command[0], command, env)
    except OSError as err:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for fd in fds:
            os.set_inheritable(fd, False)
        return err


def take() -> Handover | None:
    """Step 3, in the new program: what the old master handed over, or None
    for an ordinary start. The descriptors go back to close-on-exec."""
    text = os.environ.pop(HANDOVER_ENV, None)
    if text is None:
        return None
    data = json.loads(text)
    data["workers"] = [OldWorker(**w) for w in data["workers"]]
    handover = Handover(**data)
    for fd in handover.descriptors():
        os.set_inheritable(fd, False)
    return handover


def unblock_signals() -> None:
    """The new master handles its signals now: let the blocked ones in."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def adopt(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)
