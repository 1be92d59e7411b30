"""The connection table: every live connection, keyed by arrival order.

The original kept a list and scanned it to remove a connection (O(n) per
close); a SortedDict keyed by a serial number removes in O(log n) and still
walks the connections oldest first at shutdown.
"""

from __future__ import annotations

from itertools import count, islice

from sortedcontainers import SortedDict


class ConnectionTable:
    __slots__ = ("_live", "_serial", "on_empty")

    def __init__(self):
        self._live = SortedDict()
        self._serial = count()
        self.on_empty = None  # called when the last connection goes (draining)

    def add(self, connection) -> int:
        key = next(self._serial)
        self._live[key] = connection
        return key

    def remove(self, key: int) -> None:
        del self._live[key]
        if self.on_empty is not None and not self._live:
            self.on_empty()

    def get(self, key: int):
        """The connection of that key, or None."""
        return self._live.get(key)

    def __len__(self) -> int:
        return len(self._live)

    def newest(self) -> int:
        """The key of the newest connection; -1 when there is none."""
        return self._live.peekitem(-1)[0] if self._live else -1

    def page(self, start: int, stop: int, size: int) -> tuple[list, int | None]:
        """Up to size connections keyed from start to stop, oldest first, and
        the key to go on from (None: that was the last of them)."""
        keys = list(islice(self._live.irange(start, stop), size + 1))
        more = keys.pop() if len(keys) > size else None
        return [self._live[key] for key in keys], more

    def connections(self) -> list:
        """Oldest first; a copy, so closing them while iterating is safe."""
        return list(self._live.values())
