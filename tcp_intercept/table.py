"""The connection table: every live connection, keyed by arrival order.

The original kept a list and scanned it to remove a connection (O(n) per
close); a SortedDict keyed by a serial number removes in O(log n) and still
walks the connections oldest first at shutdown.
"""

from __future__ import annotations

from itertools import count

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

    def __len__(self) -> int:
        return len(self._live)

    def connections(self) -> list:
        """Oldest first; a copy, so closing them while iterating is safe."""
        return list(self._live.values())
