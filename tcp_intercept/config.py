"""The frozen Config every part of the daemon reads."""

from __future__ import annotations

from dataclasses import dataclass

from .address import Address

DEFAULT_LISTEN = "[0.0.0.0]:[5000]"
DEFAULT_OUTGOING = "[0.0.0.0]:[0]"

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
class Config:
    listen: Address
    # None means "-B client": bind to the client's own address and port.
    outgoing: Address | None
    foreground: bool = False
    pid_file: str | None = None
    log_file: str | None = None
    quiet: bool = False
    nodelay: bool = False
    keepalive: Keepalive | None = None
    user_timeout: float | None = None
    congestion: str | None = None
    client_congestion: str | None = None
    mptcp: bool = False
    mptcp_listen: bool = False
    workers: int = 1
    # Old workers close what they still relay this long after an upgrade.
    drain_timeout: float | None = None
    # Operations: the control socket's path, the metrics endpoint.
    control: str | None = None
    metrics: Address | None = None
    # Bounds: None is the original's "no limit" and the kernel's timeouts.
    max_connections: int | None = None
    max_per_client: int | None = None
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    # Least privilege: who the daemon becomes once its sockets are bound.
    user: str | None = None
    group: str | None = None

    @property
    def spoof_client(self) -> bool:
        return self.outgoing is None

    def describe(self) -> str:
        """The options in force, as a command line that gives them."""
        outgoing = "client" if self.spoof_client else str(self.outgoing)
        words = ["-b", str(self.listen), "-B", outgoing]
        for name, option in _OPTIONS:
            value = getattr(self, name)
            if value is True:
                words.append(option)
            elif value not in (None, False) and not (name == "workers" and value == 1):
                words += [option, f"{value:g}" if isinstance(value, float) else str(value)]
        if self.keepalive is not None:
            ka = self.keepalive
            words += ["--keepalive-idle", str(ka.idle), "--keepalive-interval", str(ka.interval),
                      "--keepalive-count", str(ka.count)]
        return " ".join(words)


# Config fields and the option that sets each, in the order describe() says them.
_OPTIONS = (
    ("foreground", "-f"), ("quiet", "-q"), ("nodelay", "-n"), ("pid_file", "-p"),
    ("log_file", "-l"), ("congestion", "-C"), ("client_congestion", "--client-congestion"),
    ("mptcp", "-M"), ("mptcp_listen", "--mptcp-listen"), ("user_timeout", "--user-timeout"),
    ("workers", "-w"), ("drain_timeout", "--drain-timeout"), ("control", "--control"),
    ("metrics", "--metrics"), ("max_connections", "--max-connections"),
    ("max_per_client", "--max-per-client"), ("connect_timeout", "--connect-timeout"),
    ("idle_timeout", "--idle-timeout"), ("user", "-u"), ("group", "-g"),
)
