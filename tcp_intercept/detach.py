"""Detaching, the pid file, and telling the launcher how start-up went.

Init scripts rely on the launching process's exit status: 0 once the daemon
listens and its pid file is written, or the daemon's own failure status. The
launcher therefore forks, and waits on a pipe for the detached daemon's
report; python-daemon does the detaching itself (second fork, setsid, chdir,
closing inherited descriptors, /dev/null for stdio) in the child.
"""

from __future__ import annotations

import os
import select
import socket
import time

import daemon
from daemon.pidfile import TimeoutPIDLockFile

from .errors import EX_OSERR, StartupError

REPORT_TIMEOUT = 20.0  # seconds the launcher waits, as the original did


class Launch:
    """The detached daemon's side of the report pipe (a no-op in the foreground)."""

    def __init__(self, fd: int | None = None, context=None):
        self._fd = fd
        self.context = context

    def report(self, status: int, message: str = "") -> None:
        if self._fd is None:
            return
        os.write(self._fd, f"{status} {message}".encode()[:4000])
        os.close(self._fd)
        self._fd = None


def detach(keep_fds: list[int]) -> Launch | int:
    """In the daemon: a Launch to report through. In the launcher: never
    returns a Launch, but the exit status the daemon reported (after printing
    its message on stderr)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        status = _await_report(read_end)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        return status
    os.close(read_end)
    context = daemon.DaemonContext(
        detach_process=True, files_preserve=[*keep_fds, write_end],
        signal_map={}, umask=0o022, working_directory="/")
    context.open()
    return Launch(write_end, context)


def _await_report(fd: int) -> int:
    deadline = time.monotonic() + REPORT_TIMEOUT
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.write(2, b"The daemon did not report its start-up within 20 s\n")
            return EX_OSERR
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    if not data:
        os.write(2, b"The daemon exited during start-up\n")
        return EX_OSERR
    status, _, message = data.decode(errors="replace").partition(" ")
    if message:
        os.write(2, message.encode() + b"\n")
    return int(status)


def write_pid_file(path: str) -> TimeoutPIDLockFile:
    """Take the pid file, replacing a stale one; StartupError if it is held."""
    pidfile = TimeoutPIDLockFile(path, acquire_timeout=0)
    holder = pidfile.read_pid()
    if holder is not None and not _alive(holder):
        pidfile.break_lock()
    try:
        pidfile.acquire()
    except Exception as err:
        holder = pidfile.read_pid()
        reason = f"held by running process {holder}" if holder else str(err)
        raise StartupError(f"Can not write pid file {path}: {reason}") from None
    return pidfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def notify(state: str) -> None:
    """Tell systemd (Type=notify units: READY=1, RELOADING=1) if it listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        pass
