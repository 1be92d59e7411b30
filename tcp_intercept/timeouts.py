"""--connect-timeout and --idle-timeout, for one worker, without a timer per
connection and without touching a timer when bytes move.

Connect: every connection starts its connect() when it is accepted, and
all share one timeout, so their deadlines come in the order they were
accepted: a queue, whose head a coarse timer checks.

Idle: a connection stamps the loop's time on each event it handles (one
attribute store of libev's cached time, about 0.1 us, done anyway for
`show conns`); a coarse timer sweeps the table and resets the ones whose
stamp is too old. Measured (micro-benchmark, this machine): a sweep costs
about 0.1 us per connection (10,000 connections: 1 ms), once every tenth
of the timeout and at most every 5 s; re-arming a timer per event instead
(timer.again()) costs about 0.2 us on every event, plus a watcher per
connection.

Either is enforced within its bound: a deadline is acted on at most one
tick (a tenth of the timeout, between 50 ms and 1 s for connects, 5 s for
idle) after it passed.
"""

from __future__ import annotations

from collections import deque

from .evloop import Loop
from .table import ConnectionTable


def tick(seconds: float, longest: float) -> float:
    return min(max(seconds / 10, 0.05), longest)


class Deadlines:
    def __init__(self, loop: Loop, table: ConnectionTable, connect_timeout: float | None,
                 idle_timeout: float | None):
        self.loop = loop
        self.table = table
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.connecting: deque = deque()
        self.timers = []
        if connect_timeout:
            every = tick(connect_timeout, 1.0)
            self.timers.append((loop.timer(every, every), self._check_connects))
        if idle_timeout:
            every = tick(idle_timeout, 5.0)
            self.timers.append((loop.timer(every, every), self._sweep_idle))

    def start(self) -> None:
        for timer, callback in self.timers:
            timer.start(callback)

    def close(self) -> None:
        for timer, _ in self.timers:
            timer.stop()
            timer.close()
        self.connecting.clear()

    def connect_started(self, connection) -> None:
        """Connection.on_connecting: a connect() is under way."""
        self.connecting.append(connection)

    def _check_connects(self) -> None:
        expired = self.loop.now() - self.connect_timeout
        queue = self.connecting
        while queue and queue[0].started <= expired:
            queue.popleft().connect_timed_out()  # a no-op once connected or closed

    def _sweep_idle(self) -> None:
        seconds = self.idle_timeout
        expired = self.loop.now() - seconds
        for connection in self.table.connections():
            if connection.active <= expired and connection.c2s is not None:
                connection.idle_timed_out(seconds)
