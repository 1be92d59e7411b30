"""tcp-intercept-ctl: send one command to the daemon's control socket and
print the answer, so nobody needs socat.

    tcp-intercept-ctl [-s PATH] show info | show conns [full] | show conn ID|ADDR
                                | show metrics | show policy | reload | help
    tcp-intercept-ctl [-s PATH] top     a full-screen live view (top.py)

Exit status: 0 with the answer on stdout; 1 with a message on stderr when
the daemon is not there, refuses us, does not answer, or says ERROR; 64 for
a bad command line.
"""

from __future__ import annotations

import getopt
import os
import socket
import sys
import time

from .errors import EX_FAILED, EX_OK, EX_USAGE

DEFAULT_SOCKET = "/run/tcp-intercept/tcp-intercept.sock"
TIMEOUT = 10.0
USAGE = f"""\
Usage: tcp-intercept-ctl [-s path] command...
Sends the command to tcp-interceptd's control socket and prints the answer.

Options:
  -h --help           Displays this help message and exits
  -s --socket path    The control socket (default {DEFAULT_SOCKET})

Commands: show info, show conns, show conns full, show conn ID|ADDR,
show metrics, show policy, reload, help; and top: a full-screen view
refreshed every second (keys: b a r t sort by throughput, age, RTT,
retransmits; p pause; q quit)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, words = getopt.getopt(argv, "hs:", ["help", "socket="])
    except getopt.GetoptError as err:
        sys.stderr.write(f"tcp-intercept-ctl: {err}\n{USAGE}")
        return EX_USAGE
    path = DEFAULT_SOCKET
    for opt, value in opts:
        if opt in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return EX_OK
        path = value
    if not words:
        sys.stderr.write(f"tcp-intercept-ctl: no command\n{USAGE}")
        return EX_USAGE
    if words == ["top"]:
        from . import top  # curses only for the live view
        if not sys.stdout.isatty():
            sys.stderr.write("tcp-intercept-ctl: top needs a terminal\n")
            return EX_FAILED
        top.main(path, ask, _why)
        return EX_OK
    try:
        answer = ask(path, " ".join(words))
    except OSError as err:
        sys.stderr.write(f"tcp-intercept-ctl: {path}: {_why(err)}\n")
        return EX_FAILED
    sys.stdout.buffer.write(answer)
    sys.stdout.flush()
    return EX_FAILED if answer.startswith(b"ERROR: ") else EX_OK


def ask(path: str, command: str, timeout: float = TIMEOUT) -> bytes:
    """The daemon's whole answer to command (OSError if there is none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:  # its backlog is full: the daemon is busy
                if time.monotonic() > deadline:
                    raise TimeoutError from None
                time.sleep(0.05)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _why(err: OSError) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such socket: is tcp-interceptd running with --control here?"
    if isinstance(err, ConnectionRefusedError):
        return "nobody answers: tcp-interceptd is not running (a socket file was left behind)"
    if isinstance(err, PermissionError):
        return (f"permission denied: the control socket is for root and the daemon's user "
                f"(you are uid {os.getuid()})")
    if isinstance(err, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    return err.strerror or str(err)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
