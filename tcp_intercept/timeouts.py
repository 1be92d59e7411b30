"""--connect-timeout and --idle-timeout (or a policy rule's), for one
worker, without a timer per connection and without touching a timer when
bytes move.

Connect: every connection starts its connect() when it is accepted, and
connections with the same timeout (the recipe's: the command line's or a
policy rule's) have their deadlines in the order they were accepted: a
queue per timeout, whose heads a coarse timer checks.

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
    """Both timeouts for one worker. Each connection's come from its recipe
    (the command line's, or its policy rule's): connections with the same
    connect timeout share a queue; the idle sweep reads each one's own."""

    def __init__(self, loop: Loop, table: ConnectionTable):
        self.loop = loop
        self.table = table
        self.connecting: dict[float, deque] = {}  # connect timeout -> its queue
        self.connect_timer = self.idle_timer = None
        self.connect_tick = self.idle_tick = None  # the timers' periods once running

    def expect(self, recipes) -> None:
        """The recipes connections may get (at start-up and on each reload):
        the timers tick often enough for the shortest of their timeouts."""
        for recipe in recipes:
            if recipe.connect_timeout:
                every = tick(recipe.connect_timeout, 1.0)
                if self.connect_tick is None or every < self.connect_tick:
                    self.connect_tick = every
                    self.connect_timer = self._restart(self.connect_timer, every,
                                                       self._check_connects)
            if recipe.idle_timeout:
                every = tick(recipe.idle_timeout, 5.0)
                if self.idle_tick is None or every < self.idle_tick:
                    self.idle_tick = every
                    self.idle_timer = self._restart(self.idle_timer, every, self._sweep_idle)

    def close(self) -> None:
        for timer in (self.connect_timer, self.idle_timer):
            if timer is not None:
                timer.stop()
                timer.close()
        self.connecting.clear()

    def connect_started(self, connection) -> None:
        """Connection.on_connecting: a connect() is under way."""
        seconds = connection.recipe.connect_timeout
        if seconds:
            queue = self.connecting.get(seconds)
            if queue is None:
                queue = self.connecting[seconds] = deque()
            queue.append(connection)

    def _check_connects(self) -> None:
        now = self.loop.now()
        for seconds, queue in list(self.connecting.items()):
            expired = now - seconds
            while queue and queue[0].started <= expired:
                queue.popleft().connect_timed_out()  # a no-op once connected or closed
            if not queue:
                del self.connecting[seconds]

    def _sweep_idle(self) -> None:
        now = self.loop.now()
        for connection in self.table.connections():
            seconds = connection.recipe.idle_timeout
            if seconds and connection.active <= now - seconds and connection.c2s is not None:
                connection.idle_timed_out(seconds)

    def _restart(self, timer, every: float, callback):
        """A running timer of period every in place of timer (gevent's cannot
        change its period)."""
        if timer is not None:
            timer.stop()
            timer.close()
        timer = self.loop.timer(every, every)
        timer.start(callback)
        return timer
