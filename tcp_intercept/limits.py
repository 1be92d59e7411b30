"""--max-connections and --max-per-client, as one worker applies them.

At its share of --max-connections a worker does what --when-full says
(the listener does it):
  queue   stop accepting: the kernel's backlog holds the next clients, who
          wait and are served as soon as a connection closes (the original);
  reset   go on accepting, and reset each new connection at once;
  bypass  stop listening (shutdown() of the listening socket, listen() again
          once a connection closes; the connections then waiting in its
          backlog are reset): the kernel gives the worker's share to the
          other workers, and while none listens the interception rules let
          new connections pass the proxy to their servers (tproxy.sh: nft's
          tproxy passes what no socket takes; for iptables the master holds
          back its heartbeat while every worker is full). The daemon never
          sees those connections: it counts the times it stood aside.
With several workers each takes an equal share (so the
sum is never exceeded); as connections are spread evenly over the workers,
the shares fill together.

A client address with --max-per-client connections open gets its next one
reset at once; other clients are not affected. With several workers the
listeners spread connections by client address (steering.py), so one
worker sees all of a client's connections and its count is exact. A
refusal is logged at most once per second per address, with how many were
refused since the last such line.

Across an upgrade the old worker N drains while the new worker N serves
the same listening socket: the old one's connections go on counting
against both limits in the new one (inherit(), forget(); the master passes
them on). The new one begins to accept only once the old one has stopped
and said what it holds (channel.py: "drained", "accept"), so the limits
hold exactly through the hand-over.

The listener (listener.py) is the one owner of a worker's Limits: it admits
each connection and releases it when it closes.
"""

from __future__ import annotations

from loguru import logger as log

from . import counters
from .config import BYPASS, QUEUE, RESET

LOG_EVERY = 1.0        # seconds between two lines about one address
FORGET_AFTER = 4096    # addresses remembered for that before the old are dropped
_WHILE_FULL = {QUEUE: "not accepting", RESET: "resetting new connections",
               BYPASS: "not listening (new connections pass the proxy)"}


def share(total: int, workers: int, number: int) -> int:
    """Worker number's (1..workers) part of total; the parts add up to total."""
    return total // workers + (1 if number <= total % workers else 0)


class Limits:
    __slots__ = ("ctr", "max_connections", "max_per_client", "per_client", "refused",
                 "logged", "full", "inherited", "inherited_from", "when_full", "counting")

    def __init__(self, ctr: memoryview, max_connections: int | None,
                 max_per_client: int | None, when_full: str = QUEUE, per_client: bool = False):
        """per_client: count per client address even without max_per_client
        (a policy rule may give its connections a limit of their own)."""
        self.ctr = ctr
        self.when_full = when_full
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.counting = per_client or max_per_client is not None
        self.per_client: dict[str, int] = {}
        self.refused: dict[str, int] = {}    # refusals not logged yet, per address
        self.logged: dict[str, float] = {}   # when an address was last logged
        self.full = False                    # at max_connections
        self.inherited = 0                   # open in the worker this one succeeds
        self.inherited_from: dict[str, int] = {}  # the same, per address

    def reached(self, open_now: int) -> bool:
        """Whether this worker must stop accepting; says so once per stop."""
        open_now += self.inherited
        if self.max_connections is None or open_now < self.max_connections:
            return False
        if not self.full:
            self.full = True
            self.ctr[counters.LIMITED_MAX_CONNECTIONS] += 1
            log.warning("Reached --max-connections ({} open here): {} until a connection "
                        "closes", open_now, _WHILE_FULL[self.when_full])
        return True

    def room_again(self, open_now: int) -> bool:
        """After a close: whether accepting may resume (and says so)."""
        open_now += self.inherited
        if self.full and open_now < self.max_connections:
            self.full = False
            log.info("Accepting connections again ({} open here)", open_now)
            return True
        return False

    def admit(self, address: str, now: float, limit: int | None = -1) -> bool:
        """Whether a new connection from address may be relayed; counts it.
        limit: the connection's own per-client limit (its policy rule's;
        None: none), else --max-per-client."""
        if not self.counting:
            return True
        if limit == -1:
            limit = self.max_per_client
        held = self.per_client.get(address, 0)
        if limit is None or held + self.inherited_from.get(address, 0) < limit:
            self.per_client[address] = held + 1
            return True
        self.ctr[counters.LIMITED_MAX_PER_CLIENT] += 1
        self.refused[address] = self.refused.get(address, 0) + 1
        if now - self.logged.get(address, 0.0) >= LOG_EVERY:
            self._say(address, now, limit)
        return False

    def release(self, address: str) -> None:
        """A connection from address closed."""
        if not self.counting:
            return
        held = self.per_client[address] - 1
        if held:
            self.per_client[address] = held
        else:
            del self.per_client[address]

    def inherit(self, address: str, count: int) -> None:
        """count connections from address, held by the worker this one
        succeeds: they count here until forget()."""
        self.inherited += count
        self.inherited_from[address] = self.inherited_from.get(address, 0) + count

    def forget(self, address: str, count: int) -> None:
        """count of those inherited connections from address closed."""
        held = self.inherited_from.get(address, 0)
        count = min(count, held)
        self.inherited -= count
        if held > count:
            self.inherited_from[address] = held - count
        else:
            self.inherited_from.pop(address, None)

    @property
    def bypass(self) -> bool:
        return self.when_full == BYPASS

    def _say(self, address: str, now: float, limit: int) -> None:
        count = self.refused.pop(address)
        log.warning("[{}] already has {} connections (--max-per-client): reset {} "
                    "new one(s) from it", address, limit, count)
        if len(self.logged) >= FORGET_AFTER:
            self.logged = {a: t for a, t in self.logged.items() if now - t < LOG_EVERY}
            self.refused = {a: n for a, n in self.refused.items() if a in self.logged}
        self.logged[address] = now
