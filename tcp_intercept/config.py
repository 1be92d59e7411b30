"""The frozen Config every part of the daemon reads, and its options.

Each field declares the command-line options that set it (flags, argument
name, help text, conversion) beside its default: the parser, --help and
describe() are all made from these declarations (gunicorn's settings are
the model), so an option is added in one place. cli.py checks what needs
several options at once and turns errors into exit codes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace

from . import address, sockopts
from .address import Address
from .errors import UsageError

DEFAULT_LISTEN = "[0.0.0.0]:[5000]"
DEFAULT_OUTGOING = "[0.0.0.0]:[0]"
MAX_WORKERS = 64

# -k alone: the kernel's own default is two hours of silence before the first
# probe (upstream issue #15). These find a vanished peer in about two minutes.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6


@dataclass(frozen=True)
class Keepalive:
    idle: int = KEEPALIVE_IDLE
    interval: int = KEEPALIVE_INTERVAL
    count: int = KEEPALIVE_COUNT


@dataclass(frozen=True)
class Option:
    """One command-line option: its spellings in --help's order (e.g.
    ("--pid-file", "-p"), as the original listed it), the argument's name
    (None for a flag), and how (option, text, value so far) becomes the field's
    value; a flag sets True."""
    flags: tuple[str, ...]
    help: str
    arg: str | None = None
    apply: Callable[[str, str, object], object] | None = None

    def usage(self) -> str:
        left = " ".join([*self.flags, self.arg] if self.arg else self.flags)
        lines = textwrap.wrap(self.help, 46) or [""]
        if len(left) >= 32:  # the text starts on the next line
            lines.insert(0, "")
        return f"  {left:<32}" + "".join(f"{' ' * 34 * bool(i)}{line}\n"
                                         for i, line in enumerate(lines))


def _opt(default, *options: Option):
    return field(default=default, metadata={"options": options})


def _value(convert: Callable[[str, str], object]):
    return lambda option, text, _: convert(option, text)


def _count(option: str, text: str, limit: int = 2**31 - 1) -> int:
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a whole number") from None
    if not 0 < number <= limit:
        raise UsageError(f"{option}: {text!r} must be between 1 and {limit}")
    return number


def _seconds(option: str, text: str, *, integer: bool = False) -> float:
    try:
        number = int(text) if integer else float(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a number") from None
    if not 0 < number < 2**31 / 1000:  # also refuses nan and inf
        raise UsageError(f"{option}: {text!r} must be greater than zero "
                         "and less than 2147483")
    return number


def _keepalive(part: str | None):
    """-k (part None), or one part of the keepalive timing (which implies -k)."""
    def apply(option: str, text: str, value: object) -> Keepalive:
        value = value or Keepalive()
        if part is None:
            return value
        return replace(value, **{part: _seconds(option, text, integer=True)})
    return apply


def _metrics(option: str, text: str) -> Address:
    addr = address.parse(text)
    if addr.port == 0:
        raise UsageError(f"{option}: {text!r} needs a port")
    return addr


# --when-full: what a worker at its share of --max-connections does (limits.py).
QUEUE, RESET, BYPASS = "queue", "reset", "bypass"


def _when_full(option: str, text: str) -> str:
    if text not in (QUEUE, RESET, BYPASS):
        raise UsageError(f"{option}: {text!r} is not queue, reset or bypass")
    return text


TEXT = _value(lambda option, text: text)
SECONDS = _value(_seconds)
COUNT = _value(_count)
CONGESTION = _value(lambda option, text: sockopts.check_congestion(text))
LOG_FORMATS = ("original", "summary", "json")


def _log_format(option: str, text: str) -> str:
    if text not in LOG_FORMATS:
        raise UsageError(f"{option}: {text!r} is not one of {', '.join(LOG_FORMATS)}")
    return text


@dataclass(frozen=True)
class Config:
    keepalive: Keepalive | None = _opt(
        None,
        Option(("-k", "--keepalive"), "Enable keepalive on the sockets (first probe after "
               f"{KEEPALIVE_IDLE} s idle, every {KEEPALIVE_INTERVAL} s, {KEEPALIVE_COUNT} "
               "probes)", apply=_keepalive(None)),
        Option(("--keepalive-idle",), "Idle time before the first keepalive probe "
               "(implies -k)", "seconds", _keepalive("idle")),
        Option(("--keepalive-interval",), "Time between keepalive probes (implies -k)",
               "seconds", _keepalive("interval")),
        Option(("--keepalive-count",), "Unanswered probes before the connection is dropped "
               "(implies -k)", "n", _keepalive("count")))
    nodelay: bool = _opt(False, Option(("-n", "--tcp_nodelay"),
                                       "Disable Nagle's Algorithm on the sockets"))
    foreground: bool = _opt(False, Option(("-f", "--foreground"), "Don't fork and detach"))
    pid_file: str | None = _opt(None, Option(
        ("--pid-file", "-p"), "The file to write the PID to, especially useful when "
        "running as a daemon. Must be an absolute path.", "file", TEXT))
    listen: Address = _opt(address.parse(DEFAULT_LISTEN), Option(
        ("--bind-listen", "-b"), "Bind to the specified address for incoming connections. "
        f"Default {DEFAULT_LISTEN}. Host and port resolving can be bypassed by placing "
        "[] around them.", "host:port", _value(lambda option, text: address.parse(text))))
    # None means "-B client": bind to the client's own address and port.
    outgoing: Address | None = _opt(address.parse(DEFAULT_OUTGOING), Option(
        ("--bind-outgoing", "-B"), "Bind to the specified address for outgoing connections. "
        f"Default {DEFAULT_OUTGOING}, which lets the kernel choose (any family). Host and "
        "port resolving can be bypassed by placing [] around them. The special string "
        "\"client\" can be used to reuse the client's source address. Note that you should "
        "take care that the return packets pass through this process again!", "host:port",
        _value(lambda option, text: None if text == "client" else address.parse(text))))
    log_file: str | None = _opt(None, Option(("--log", "-l"), "Log to file (reopened on "
                                             "SIGHUP)", "file", TEXT))
    quiet: bool = _opt(False, Option(
        ("-q", "--quiet"), "Log no per-connection lines (nor a peer's reset or refusal): "
        "only start-up, shutdown, warnings and the daemon's own errors"))
    log_format: str = _opt("original", Option(
        ("--log-format",), "Per-connection lines: original (the six lines of the original, "
        "the default), summary (one line per connection at close: addresses, duration, "
        "connect time, bytes, termination code, each leg's RTT and retransmits) or json (the "
        "same, a JSON object per line); summary and json read both legs' TCP_INFO at "
        "close", "format", _value(_log_format)))
    leg_stats: bool = _opt(False, Option(
        ("--leg-stats",), "Read both legs' TCP_INFO when a connection closes, for the "
        "metrics' histograms (duration, connect time, each leg's RTT) and retransmit "
        "counters; off by default: it costs two system calls per connection"))
    congestion: str | None = _opt(None, Option(
        ("--congestion", "-C"), "Congestion control of the outgoing (router to server) "
        "sockets", "algo", CONGESTION))
    client_congestion: str | None = _opt(None, Option(
        ("--client-congestion",), "Congestion control of the accepted (client to router) "
        "sockets", "algo", CONGESTION))
    mptcp: bool = _opt(False, Option(("-M", "--mptcp"), "Outgoing connections use Multipath "
                                     "TCP (plain TCP if the server does not speak it)"))
    mptcp_listen: bool = _opt(False, Option(("--mptcp-listen",), "Accept Multipath TCP as "
                                            "well as TCP from clients"))
    user_timeout: float | None = _opt(None, Option(
        ("--user-timeout",), "TCP_USER_TIMEOUT on both sockets: drop a connection whose peer "
        "stops acknowledging data for this long", "seconds", SECONDS))
    workers: int = _opt(1, Option(
        ("-w", "--workers"), "Worker processes that accept and relay (default 1); the "
        "process in the pid file is their master", "n",
        _value(lambda option, text: _count(option, text, MAX_WORKERS))))
    # Old workers close what they still relay this long after an upgrade.
    drain_timeout: float | None = _opt(None, Option(
        ("--drain-timeout",), "After an upgrade (SIGUSR2), old workers reset the connections "
        "they still hold after this long (default: wait for them to end)", "seconds",
        SECONDS))
    # Operations: the control socket's path, the metrics endpoint.
    control: str | None = _opt(None, Option(
        ("--control",), "Control socket (absolute path, mode 0600) answering one command "
        "per connection: show info, show conns, show metrics, help", "path", TEXT))
    metrics: Address | None = _opt(None, Option(
        ("--metrics",), "Serve GET /metrics (Prometheus) there, e.g. [127.0.0.1]:[9105]",
        "host:port", _value(_metrics)))
    # Bounds: None is the original's "no limit" and the kernel's timeouts.
    max_connections: int | None = _opt(None, Option(
        ("--max-connections",), "At most n connections at once; the next clients wait in "
        "the kernel's backlog", "n", COUNT))
    when_full: str = _opt(QUEUE, Option(
        ("--when-full",), "At --max-connections: queue (the next clients wait in the "
        "kernel's backlog), reset (they are reset at once) or bypass (a full worker stops "
        "listening; while every worker is full, the interception rules let new connections "
        "pass the proxy, as when the daemon is down)", "mode", _value(_when_full)))
    max_per_client: int | None = _opt(None, Option(
        ("--max-per-client",), "At most n connections at once from one client address; "
        "more are reset", "n", COUNT))
    connect_timeout: float | None = _opt(None, Option(
        ("--connect-timeout",), "Reset the client when its server has not accepted the "
        "connection within this long", "seconds", SECONDS))
    idle_timeout: float | None = _opt(None, Option(
        ("--idle-timeout",), "Reset both sides of a connection that moved no byte either way "
        "for this long", "seconds", SECONDS))
    # Per destination and per client: policy_file.py reads it, policy.py applies it.
    policy: str | None = _opt(None, Option(
        ("--policy",), "Policy file (TOML, absolute path): per destination and per client, "
        "the options a connection gets, and what is never intercepted (see POLICY in the "
        "man page); re-read on SIGHUP and tcp-intercept-ctl reload", "file", TEXT))
    # Least privilege: who the daemon becomes once its sockets are bound.
    user: str | None = _opt(None, Option(
        ("-u", "--user"), "Once listening, run as this user, keeping only the capabilities "
        "still needed (CAP_NET_ADMIN with -B client)", "user", TEXT))
    group: str | None = _opt(None, Option(
        ("-g", "--group"), "With -u: run with this group instead of the user's own",
        "group", TEXT))

    @property
    def spoof_client(self) -> bool:
        return self.outgoing is None

    def describe(self) -> str:
        """The options in force, as a command line that gives them."""
        outgoing = "client" if self.spoof_client else str(self.outgoing)
        words = ["-b", str(self.listen), "-B", outgoing]
        for name, (option, *_), default in FIELDS:
            value = getattr(self, name)
            if name in ("listen", "outgoing") or value == default:
                continue
            if isinstance(value, Keepalive):
                words += ["--keepalive-idle", str(value.idle), "--keepalive-interval",
                          str(value.interval), "--keepalive-count", str(value.count)]
            elif value is True:
                words.append(min(option.flags, key=len))
            else:
                words += [min(option.flags, key=len),
                          f"{value:g}" if isinstance(value, float) else str(value)]
        return " ".join(words)


# (field name, its options, its default), in --help's order.
FIELDS = [(f.name, f.metadata["options"], f.default) for f in fields(Config)
          if f.default is not MISSING]
