"""The control socket (--control PATH), served by the master: HAProxy's stats
socket for tcp-intercept. One command per connection, answered, then closed:

    show info      version, pid, uptime, options, counters, descriptors, memory
    show conns     every connection of every worker, oldest first, after a
                   header line
    show conns full  the same, with an id and both legs' TCP_INFO
    show conn ID|ADDR  one connection: everything known, both legs' TCP_INFO,
                   throughput each way from two readings 1 s apart
    show metrics   the Prometheus text exposition (as GET /metrics)
    show policy    the policy in force: its file, load time, rules and what
                   each matched
    reload         re-read the policy file (as SIGHUP does); a bad file
                   changes nothing and the answer is "ERROR: " and why
    help           these commands

An unknown command, or one longer than 1 KiB, gets one line starting with
"ERROR: ". The socket is a Unix stream socket of mode 0600 owned by the
daemon's user: root and that user may use it, nobody else. What a client
may cost is bounded by request_server.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable

from .errors import StartupError
from .request_server import RequestServer
from .status import Status

MAX_COMMAND = 1024
HELP = """\
show info      version, pid, uptime, options, counters, descriptors, memory
show conns     every connection, oldest first, after a header line
show conns full  the same with both legs' TCP state (TCP_INFO) and an id
show conn ID|ADDR  one connection (id from show conns full, or the client's
               [ip]:port): both legs' TCP_INFO, throughput over 1 s
show metrics   the Prometheus text exposition
show policy    the policy in force, where it came from, what each rule matched
reload         re-read the policy file (--policy); ERROR and why if it is bad
help           this list
"""


def open_control_socket(path: str, owner: tuple[int, int] | None = None) -> socket.socket:
    """Bound and listening at path, mode 0600, owned by owner (uid, gid) when
    given. A socket file left by a daemon that died is replaced; one that
    answers belongs to a running daemon: StartupError."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the file is born 0600: no moment of wider access
    try:
        sock.bind(path)
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        raise StartupError(f"Can not create the control socket {path}: {err.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise StartupError(f"Can not create the control socket {path}: {err.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"Can not create the control socket {path}: "
                           "something that is not a socket is there")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: left by a daemon that is gone
            return
    raise StartupError(f"Can not create the control socket {path}: "
                       "another daemon is answering on it")


def socket_file_id(path: str) -> tuple[int, int]:
    """What identifies the file of a socket just bound (the socket itself
    cannot tell: fstat() on it describes the socket, not the file)."""
    found = os.stat(path)
    return found.st_dev, found.st_ino


def remove_control_socket(path: str, file_id: tuple[int, int]) -> None:
    """At exit: the file goes if it is still the one we bound."""
    with contextlib.suppress(OSError):
        if socket_file_id(path) == file_id:
            os.unlink(path)


class Control:
    def __init__(self, loop, sock: socket.socket, status: Status,
                 reload: Callable[[Callable[[bool, str], None]], None] | None = None):
        self.status = status
        # reload(done): policy_keeper.PolicyKeeper.reload; done(in force, message)
        self.reload = reload
        self.server = RequestServer(loop, sock, self._handle, end=b"\n",
                                    max_request=MAX_COMMAND)

    def _handle(self, request: bytes | None, respond: Callable[[bytes], None]) -> None:
        if request is None:
            respond(f"ERROR: command too long (at most {MAX_COMMAND} bytes)\n".encode())
            return
        command = " ".join(request.decode(errors="replace").split())
        if command == "show info":
            respond(_text(self.status.info_lines()))
        elif command in ("show conns", "show conns full"):
            self.status.conns(lambda lines: respond(_text(lines)), full=command.endswith("full"))
        elif command == "show conn" or command.startswith("show conn "):
            self.status.conn(command[len("show conn "):], lambda lines: respond(_text(lines)))
        elif command == "show metrics":
            from .metrics import exposition  # imported at start-up (startup.py)
            respond(exposition(self.status))
        elif command == "show policy":
            respond(_text(self.status.policy_lines()))
        elif command == "reload" and self.reload is not None:
            self.reload(lambda done, message:
                        respond(f"{'' if done else 'ERROR: '}{message}\n".encode()))
        elif command == "help":
            respond(HELP.encode())
        else:
            shown = command if len(command) <= 80 else command[:80] + "..."
            respond(f"ERROR: unknown command {shown!r}; try 'help'\n".encode())

    def close(self) -> None:
        self.server.close()


def _text(lines: list[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()
