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

    @property
    def spoof_client(self) -> bool:
        return self.outgoing is None
