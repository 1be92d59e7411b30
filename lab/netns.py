"""Namespaces and processes: the primitives under the topology.

Enter a network namespace from one thread, poll with a bound, tell whether a
process lives and listens, borrow its sockets, stop it by its pid (TERM,
then KILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

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


def borrow_sockets(pid: int) -> list[socket.socket]:
    """Duplicates of process pid's sockets (pidfd_getfd), to inspect with
    getsockopt(); closing them leaves the process's own open."""
    pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    found.append(socket.socket(fileno=_syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)))
    finally:
        os.close(pidfd)
    return found
