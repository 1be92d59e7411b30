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

from . import NAME, __version__, privileges, sockopts
from .config import FIELDS, Config, Option
from .errors import EX_OK, EX_USAGE, AddressError, Exit, PolicyError, UsageError

USAGE_HEAD = """\
Usage: {prog} [options]
Intercepts TCP connections redirected to it with TPROXY and relays each one
to its original destination over a connection of its own.

Options:
"""
HELP = Option(("-h", "--help"), "Displays this help message and exits")
VERSION = Option(("-V", "--version"), "Displays the version and exits")
# option -> (the Config field it sets, or None for -h/-V; its Option)
OPTIONS: dict[str, tuple[str | None, Option]] = {
    flag: (name, option)
    for name, options in [(None, (HELP, VERSION)), *((n, o) for n, o, _ in FIELDS)]
    for option in options for flag in option.flags}
SHORT = "".join(flag[1] + (":" if option.arg else "")
                for flag, (_, option) in OPTIONS.items() if len(flag) == 2)
LONG = [flag[2:] + ("=" if option.arg else "")
        for flag, (_, option) in OPTIONS.items() if flag.startswith("--")]


def usage(prog: str) -> str:
    return USAGE_HEAD.format(prog=prog) + "".join(
        option.usage() for option in {id(o): o for _, o in OPTIONS.values()}.values())


def version_text() -> str:
    return (f"{NAME} version {__version__}\n"
            f" Python {sys.version.split()[0]}, libev through gevent\n"
            " Options:\n"
            "   IPv6: yes\n"
            "   MPTCP: " + ("yes" if sockopts.mptcp_available() else "no") + "\n")


def parse_args(argv: list[str], prog: str = NAME) -> Config:
    """The command line as a Config; raises UsageError, AddressError or Exit."""
    try:
        opts, rest = getopt.gnu_getopt(argv, SHORT, LONG)
    except getopt.GetoptError as err:
        raise UsageError(str(err), show_usage=True) from None
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    values: dict = {}
    for opt, text in opts:
        name, option = OPTIONS[opt]
        if option is HELP:
            sys.stderr.write(usage(prog))
            raise Exit(EX_OK)
        if option is VERSION:
            sys.stdout.write(version_text())
            raise Exit(EX_OK)
        values[name] = True if option.apply is None else option.apply(opt, text, values.get(name))
    _check(values)
    return Config(**values)


def _check(flags: dict) -> None:
    for name in ("pid_file", "control", "policy"):
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
    if flags.get("when_full") == "bypass" and flags.get("max_per_client") \
            and flags.get("workers", 1) > 1:
        # A socket that stops listening leaves the SO_REUSEPORT group and
        # comes back last: the program steering clients to workers by
        # address would then send a client's connections elsewhere.
        raise UsageError("--when-full bypass with --max-per-client needs one worker (-w 1): "
                         "a worker that stops listening would move clients between workers")
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
        hint = (usage(prog) if err.show_usage
                else f"Try '{prog} --help' for the options.\n")
        sys.stderr.write(f"{prog}: {err}\n{hint}")
        return EX_USAGE
    except AddressError as err:
        sys.stderr.write(f"{err}\n")
        return err.status
    try:
        policy = _load_policy(config) if config.policy else None
    except PolicyError as err:
        sys.stderr.write(f"{prog}: {err}\n")
        return err.status
    from . import handover, startup  # the event loop and its C extension only past parsing
    if os.environ.get(handover.CHECK_ENV):
        return _check_upgrade(config)
    return startup.run(config, handover.program(), policy)


def _load_policy(config: Config):
    """The policy of --policy, checked against the options; PolicyError."""
    from . import policy_file
    policy = policy_file.load(config.policy, config)
    if policy.limits_clients and config.when_full == "bypass" and config.workers > 1:
        raise PolicyError(f"{config.policy}: max_per_client with --when-full bypass needs one "
                          "worker (-w 1): a worker that stops listening would move clients "
                          "between workers")
    return policy


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
