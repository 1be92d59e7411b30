"""libev, through gevent's bundled Cython binding, and nothing else of gevent.

No greenlets, no hub, no monkey-patching: the rest of the daemon sees a libev
loop with io, timer and signal watchers, each with start(callback, *args),
stop() and close(), as in C. gevent documents this interface as low-level and
free to change between minor releases, so every use of it goes through here
(and tests/test_evloop.py checks it on its own).

A one-shot timer that is started again after it fired goes off at once in
this binding (its expiry is not re-based): restartable timers repeat, and are
stopped when not wanted.

A watcher must be close()d when its owner is done with it: gevent allocates
the native ev_io outside Python's heap, and only close() frees it. The io
watchers of connections are parked instead (park()) and re-pointed at the
next connection's descriptors (borrow_io()): creating one costs an
allocation and an fcntl() (gevent checks the descriptor), re-pointing one
neither.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from gevent.libev import corecext

READ = corecext.READ
WRITE = corecext.WRITE
# Passed as a callback argument, replaced by the events that fired.
EVENTS = corecext.EVENTS
PARKED_MAX = 4096  # io watchers kept for reuse; more are closed


class Loop:
    """One libev loop (epoll) and the watchers that run on it."""

    __slots__ = ("_loop", "on_error", "now", "_parked")

    def __init__(self, on_error: Callable[[object, BaseException], None] | None = None):
        # Not libev's default loop: that one also reaps children for gevent.
        self._loop = corecext.loop(default=False)
        self._loop.error_handler = self
        self.on_error = on_error
        # now(): the wall-clock time at the start of this loop iteration
        # (libev's ev_now), called per event: the C method itself.
        self.now = self._loop.now
        self._parked: list = []

    def io(self, fd: int, events: int):
        return self._loop.io(fd, events)

    def borrow_io(self, fd: int, events: int):
        """An io watcher for fd: a parked one re-pointed, else a new one."""
        if self._parked:
            watcher = self._parked.pop()
            watcher.fd = fd
            watcher.events = events
            return watcher
        return self._loop.io(fd, events)

    def park(self, watcher) -> None:
        """Stop a borrowed watcher (its descriptor may be closed right after)
        and keep it for a later borrow_io()."""
        watcher.stop()
        if len(self._parked) < PARKED_MAX:
            self._parked.append(watcher)
        else:
            watcher.close()

    def timer(self, after: float, repeat: float = 0.0):
        return self._loop.timer(after, repeat)

    def signal(self, signum: int):
        return self._loop.signal(signum)

    def run(self) -> None:
        """Until stop() is called or no watcher is left."""
        self._loop.run()

    def stop(self) -> None:
        self._loop.break_()

    def destroy(self) -> None:
        for watcher in self._parked:
            watcher.close()
        self._parked.clear()
        self._loop.destroy()

    # Called by gevent for an exception that escaped a callback.
    def handle_error(self, context, exc_type, value, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            raise value  # SystemExit and friends end the loop as usual
        if self.on_error is not None:
            self.on_error(context, value)
        else:
            sys.excepthook(exc_type, value, tb)
