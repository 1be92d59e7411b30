"""argv -> Config, exit codes, main().

Exit codes are the original's (sysexits.h): 64 for a bad command line, 65
for an address that cannot be used, 71 for an operating-system failure.
Everything below this module raises; only here do errors become messages.
"""

from __future__ import annotations

import getopt
import os
import socket
import sys

from . import NAME, __version__, address, privileges, sockopts
from .address import AddressError
from .config import DEFAULT_LISTEN, DEFAULT_OUTGOING, Config, Keepalive

EX_OK, EX_USAGE, EX_DATAERR, EX_OSERR = 0, 64, 65, 71

USAGE = """\
Usage: {prog} [options]
Intercepts TCP connections redirected to it with TPROXY and relays each one
to its original destination over a connection of its own.

Options:
  -h --help                       Displays this help message and exits
  -V --version                    Displays the version and exits
  -k --keepalive                  Enable keepalive on the sockets (first probe
                                  after 60 s idle, every 10 s, 6 probes)
  -n --tcp_nodelay                Disable Nagle's Algorithm on the sockets
  -f --foreground                 Don't fork and detach
  --pid-file -p file              The file to write the PID to, especially
                                  useful when running as a daemon. Must be an
                                  absolute path.
  --bind-listen -b host:port      Bind to the specified address for incoming
                                  connections. Default [0.0.0.0]:[5000]
                                  host and port resolving can be bypassed by
                                  placing [] around them
  --bind-outgoing -B host:port    Bind to the specified address for outgoing
                                  connections. Default [0.0.0.0]:[0], which
                                  lets the kernel choose (any family).
                                  host and port resolving can be bypassed by
                                  placing [] around them
                                  the special string "client" can be used to
                                  reuse the client's source address. Note that
                                  you should take care that the return packets
                                  pass through this process again!
  --log -l file                   Log to file (reopened on SIGHUP)
  -q --quiet                      Log no per-connection lines (nor a peer's
                                  reset or refusal): only start-up, shutdown,
                                  warnings and the daemon's own errors
  --congestion -C algo            Congestion control of the outgoing
                                  (router to server) sockets
  --client-congestion algo        Congestion control of the accepted
                                  (client to router) sockets
  -M --mptcp                      Outgoing connections use Multipath TCP
                                  (plain TCP if the server does not speak it)
  --mptcp-listen                  Accept Multipath TCP as well as TCP from
                                  clients
  --keepalive-idle seconds        Idle time before the first keepalive probe
                                  (implies -k)
  --keepalive-interval seconds    Time between keepalive probes (implies -k)
  --keepalive-count n             Unanswered probes before the connection is
                                  dropped (implies -k)
  --user-timeout seconds          TCP_USER_TIMEOUT on both sockets: drop a
                                  connection whose peer stops acknowledging
                                  data for this long
  -w --workers n                  Worker processes that accept and relay
                                  (default 1); the process in the pid file is
                                  their master
  --drain-timeout seconds         After an upgrade (SIGUSR2), old workers
                                  reset the connections they still hold after
                                  this long (default: wait for them to end)
  --control path                  Control socket (absolute path, mode 0600)
                                  answering one command per connection: show
                                  info, show conns, show metrics, help
  --metrics host:port             Serve GET /metrics (Prometheus) there, e.g.
                                  [127.0.0.1]:[9105]
  --max-connections n             At most n connections at once; the next
                                  clients wait in the kernel's backlog
  --max-per-client n              At most n connections at once from one
                                  client address; more are reset
  --connect-timeout seconds       Reset the client when its server has not
                                  accepted the connection within this long
  --idle-timeout seconds          Reset both sides of a connection that moved
                                  no byte either way for this long
  -u --user user                  Once listening, run as this user, keeping
                                  only the capabilities still needed
                                  (CAP_NET_ADMIN with -B client)
  -g --group group                With -u: run with this group instead of the
                                  user's own
"""

SHORT = "hVknfqp:b:B:l:C:Mw:u:g:"
LONG = ["help", "version", "keepalive", "tcp_nodelay", "foreground", "quiet",
        "pid-file=", "bind-listen=", "bind-outgoing=", "log=", "congestion=",
        "client-congestion=", "mptcp", "mptcp-listen", "keepalive-idle=",
        "keepalive-interval=", "keepalive-count=", "user-timeout=", "workers=",
        "drain-timeout=", "control=", "metrics=", "max-connections=", "max-per-client=",
        "connect-timeout=", "idle-timeout=", "user=", "group="]
MAX_WORKERS = 64


class UsageError(ValueError):
    """A command line that cannot be used (exit status 64)."""

    def __init__(self, message: str, show_usage: bool = False):
        super().__init__(message)
        self.show_usage = show_usage


class Exit(Exception):
    """Leave main() at once with this status (after --help or --version)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def version_text() -> str:
    return (f"{NAME} version {__version__}\n"
            f" Python {sys.version.split()[0]}, libev through gevent\n"
            " Options:\n"
            "   IPv6: yes\n"
            "   MPTCP: " + ("yes" if sockopts.mptcp_available() else "no") + "\n")


def _count(option: str, value: str, limit: int = 2**31 - 1) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{option}: {value!r} is not a whole number") from None
    if not 0 < number <= limit:
        raise UsageError(f"{option}: {value!r} must be between 1 and {limit}")
    return number


def _seconds(option: str, value: str, *, integer: bool) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        raise UsageError(f"{option}: {value!r} is not a number") from None
    if not 0 < number < 2**31 / 1000:  # also refuses nan and inf
        raise UsageError(f"{option}: {value!r} must be greater than zero "
                         "and less than 2147483")
    return number


def _text(option: str, value: str) -> str:
    return value


def _congestion(option: str, value: str) -> str:
    return sockopts.check_congestion(value)


def _fraction(option: str, value: str) -> float:
    return _seconds(option, value, integer=False)


def _workers(option: str, value: str) -> int:
    return _count(option, value, MAX_WORKERS)


def _metrics(option: str, value: str) -> address.Address:
    addr = address.parse(value)
    if addr.port == 0:
        raise UsageError(f"{option}: {value!r} needs a port")
    return addr


# Options that set one Config field: option -> (field, value from
# (option, argument)); None for a flag without argument.
_FIELDS = {
    "-n": ("nodelay", None), "--tcp_nodelay": ("nodelay", None),
    "-f": ("foreground", None), "--foreground": ("foreground", None),
    "-q": ("quiet", None), "--quiet": ("quiet", None),
    "-p": ("pid_file", _text), "--pid-file": ("pid_file", _text),
    "-b": ("listen", _text), "--bind-listen": ("listen", _text),
    "-B": ("outgoing", _text), "--bind-outgoing": ("outgoing", _text),
    "-l": ("log_file", _text), "--log": ("log_file", _text),
    "-C": ("congestion", _congestion), "--congestion": ("congestion", _congestion),
    "--client-congestion": ("client_congestion", _congestion),
    "-M": ("mptcp", None), "--mptcp": ("mptcp", None),
    "--mptcp-listen": ("mptcp_listen", None),
    "--user-timeout": ("user_timeout", _fraction),
    "-w": ("workers", _workers), "--workers": ("workers", _workers),
    "--drain-timeout": ("drain_timeout", _fraction),
    "--control": ("control", _text),
    "--metrics": ("metrics", _metrics),
    "--max-connections": ("max_connections", _count),
    "--max-per-client": ("max_per_client", _count),
    "--connect-timeout": ("connect_timeout", _fraction),
    "--idle-timeout": ("idle_timeout", _fraction),
    "-u": ("user", _text), "--user": ("user", _text),
    "-g": ("group", _text), "--group": ("group", _text),
}


def parse_args(argv: list[str], prog: str = NAME) -> Config:
    """The command line as a Config; raises UsageError, AddressError or Exit."""
    try:
        opts, rest = getopt.gnu_getopt(argv, SHORT, LONG)
    except getopt.GetoptError as err:
        raise UsageError(str(err), show_usage=True) from None
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    flags: dict = {"listen": DEFAULT_LISTEN, "outgoing": DEFAULT_OUTGOING}
    keepalive: dict | None = None
    for opt, value in opts:
        if opt in ("-h", "--help"):
            sys.stderr.write(USAGE.format(prog=prog))
            raise Exit(EX_OK)
        if opt in ("-V", "--version"):
            sys.stdout.write(version_text())
            raise Exit(EX_OK)
        if opt in _FIELDS:
            name, convert = _FIELDS[opt]
            flags[name] = True if convert is None else convert(opt, value)
        elif opt in ("-k", "--keepalive"):
            keepalive = keepalive or {}
        else:  # --keepalive-idle, --keepalive-interval, --keepalive-count
            keepalive = keepalive or {}
            keepalive[opt.removeprefix("--keepalive-")] = _seconds(opt, value, integer=True)
    _check(flags)
    outgoing = flags.pop("outgoing")
    return Config(listen=address.parse(flags.pop("listen")),
                  outgoing=None if outgoing == "client" else address.parse(outgoing),
                  keepalive=None if keepalive is None else Keepalive(**keepalive),
                  **flags)


def _check(flags: dict) -> None:
    for name in ("pid_file", "control"):
        path = flags.get(name)
        if path is not None and not os.path.isabs(path):
            raise UsageError(f"--{name.replace('_', '-')}: {path!r} is not an absolute path")
    if flags.get("group") and not flags.get("user"):
        raise UsageError("--group: give --user too (the group is the user's own otherwise)")
    if flags.get("user"):
        try:
            privileges.identity(flags["user"], flags.get("group"))
        except KeyError as err:
            raise UsageError(f"--user/--group: {err.args[0]}") from None
    if flags.get("max_connections", 1 << 31) < flags.get("workers", 1):
        raise UsageError("--max-connections: every worker needs a share of at least one "
                         "connection; give at least as many as --workers")
    mptcp = flags.get("mptcp") or flags.get("mptcp_listen")
    if mptcp and not sockopts.mptcp_available():
        raise UsageError("Multipath TCP is not available: the kernel lacks it "
                         "or net.mptcp.enabled is 0")
    if (mptcp and flags.get("user_timeout")
            and sockopts.mptcp_refuses(socket.IPPROTO_TCP, sockopts.TCP_USER_TIMEOUT, 1000)):
        raise UsageError("--user-timeout: this kernel's Multipath TCP sockets "
                         "refuse TCP_USER_TIMEOUT; use one option or the other")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prog = os.path.basename(sys.argv[0])
    if prog in ("", "__main__.py"):
        prog = NAME
    try:
        config = parse_args(argv, prog)
    except Exit as done:
        return done.status
    except UsageError as err:
        hint = (USAGE.format(prog=prog) if err.show_usage
                else f"Try '{prog} --help' for the options.\n")
        sys.stderr.write(f"{prog}: {err}\n{hint}")
        return EX_USAGE
    except AddressError as err:
        sys.stderr.write(f"{err}\n")
        return EX_DATAERR
    from . import handover, server  # the event loop and its C extension only past parsing
    if os.environ.get(handover.CHECK_ENV):
        return _check_upgrade(config)
    return server.run(config, handover.program())


def _check_upgrade(config: Config) -> int:
    """An upgrade asks whether this installed program would start
    (handover.py): the options parsed, and everything it runs imported."""
    from . import master, worker  # noqa: F401
    if config.metrics or config.control:
        from . import metrics  # noqa: F401
    sys.stdout.write(version_text())
    return EX_OK


def run() -> None:
    sys.exit(main())
