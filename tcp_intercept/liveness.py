"""Whether the daemon serves: the master asks its workers, and says so outside.

Every PING_EVERY seconds the master sends "ping" to each serving worker
that has no ping outstanding; the worker's loop answers "pong" at once. A
worker whose ping has had no answer for HUNG_AFTER seconds has stopped
serving (its loop blocked: a stuck callback, a tight loop, a write to a
dead disk, SIGSTOP): the master logs it, kills it and starts another,
which takes the same listening socket and so the connections waiting in
its backlog (the master holds the socket).

While every worker answers, each tick is also a heartbeat to the outside:
  - systemd's watchdog (WATCHDOG=1, when the unit sets WatchdogSec=): a
    master that hangs stops it, and systemd restarts the daemon;
  - a UDP datagram to 127.0.0.1 and ::1 on the listening port, while
    tproxy.sh's iptables rules are installed (their recent list exists):
    they apply TPROXY only while these keep coming, so a daemon that is
    gone (SIGKILL included: nothing of ours has to run) or hung lets
    connections pass within two seconds (iptables' TPROXY target would
    drop them; nft's tproxy passes them by itself when nothing listens, and
    then no datagram goes to a UDP service that may use the same port
    number). Sending needs no privilege; an error (no route, a DROP rule)
    is nobody's business.

A master that did not run for HUNG_AFTER (it was stopped itself, or
starved) does not blame its workers for pings it did not read: their
clocks restart.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable

from .channel import Word
from .detach import notify

PING_EVERY = 0.25   # seconds between two ticks
HUNG_AFTER = 1.0    # seconds a ping may go unanswered
LOOPBACKS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
# tproxy.sh's iptables rules note the heartbeat there (our network namespace's).
RECENT_LIST = "/proc/net/xt_recent/tcp_intercept"


class Heartbeat:
    """The signs of life the master gives outside (systemd, the firewall)."""

    def __init__(self, port: int):
        self.port = port
        self.watchdog = "WATCHDOG_USEC" in os.environ and \
            os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        self.socks: list[tuple[socket.socket, str]] = []
        for family, address in LOOPBACKS:
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            except OSError:  # no IPv6 here
                continue
            sock.setblocking(False)
            self.socks.append((sock, address))

    def beat(self, firewall: bool = True) -> None:
        """To systemd; and to the firewall unless firewall is False (every
        worker stands aside: --when-full bypass)."""
        if self.watchdog:
            notify("WATCHDOG=1")
        if not firewall or not os.path.exists(RECENT_LIST):
            return
        for sock, address in self.socks:
            try:
                sock.sendto(b"", (address, self.port))
            except OSError:
                pass

    def close(self) -> None:
        for sock, _ in self.socks:
            sock.close()
        self.socks.clear()


class Pinger:
    """The master's side of ping and pong. A worker is anything with a
    `channel` (send()) and the attribute `pinged` (when its outstanding
    ping went, or None)."""

    def __init__(self, on_hung: Callable[[object, float], None]):
        self.on_hung = on_hung
        self.last_tick: float | None = None

    def tick(self, workers: Iterable, now: float) -> bool:
        """Ping the workers; on_hung(worker, silent_for) for each that has
        not answered in time. True if every one answered its last ping."""
        stalled = self.last_tick is not None and now - self.last_tick > HUNG_AFTER
        self.last_tick = now
        healthy = True
        for worker in workers:
            if worker.pinged is not None and stalled:
                worker.pinged = now  # our silence, not theirs
            if worker.pinged is None:
                worker.pinged = now
                worker.channel.send(Word.PING)
            elif now - worker.pinged > HUNG_AFTER:
                healthy = False
                self.on_hung(worker, now - worker.pinged)
        return healthy

    @staticmethod
    def pong(worker) -> None:
        worker.pinged = None
