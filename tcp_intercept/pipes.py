"""The pipe pool: kernel pipes lent to relays while they splice.

A relay needs a pipe only while its stream is busy, so an idle connection
holds none. reclaim(), called periodically, takes the pipe back from every
borrower that left it empty and moved nothing since the previous call; a
busy stream keeps its pipe across bursts instead of copying the start of
each one. A pipe comes back to the pool empty; one that still holds bytes
(its connection died mid-transfer) is closed instead. The pool keeps at most
`max_free` pipes, and trim() closes those that nobody took since the last
call: after a burst the daemon's descriptors go back to what its connections
hold.
"""

from __future__ import annotations

import fcntl
import os

from .counters import PIPES_FREE, PIPES_LENT, SLOT_WORDS

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20


class PipePool:
    __slots__ = ("_free", "max_free", "size", "lent", "_low", "ctr")

    def __init__(self, ctr: memoryview | None = None, max_free: int = 32,
                 size: int = PIPE_SIZE):
        self._free: list[tuple[int, int]] = []
        self.max_free = max_free
        self.size = size
        self.lent: set = set()  # who holds a pipe: objects with a reclaim() method
        self._low = 0  # fewest free pipes since the last trim()
        # The worker's counters, where the pool shows how many pipes it has.
        self.ctr = ctr if ctr is not None else memoryview(bytearray(8 * SLOT_WORDS)).cast("Q")

    def _show(self) -> None:
        self.ctr[PIPES_LENT] = len(self.lent)
        self.ctr[PIPES_FREE] = len(self._free)

    def take(self, borrower) -> tuple[int, int]:
        """(read end, write end) of an empty non-blocking pipe; OSError if none."""
        if self._free:
            pipe = self._free.pop()
            self._low = min(self._low, len(self._free))
        else:
            self._low = 0
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                # Unprivileged or over fs.pipe-user-pages-soft: the kernel
                # refuses and the 64 KiB default pipe does the job, slower.
                fcntl.fcntl(pipe[1], F_SETPIPE_SZ, self.size)
            except OSError:
                pass
        self.lent.add(borrower)
        self._show()  # count
        return pipe

    def give(self, borrower, pipe: tuple[int, int], empty: bool = True) -> None:
        self.lent.discard(borrower)
        if empty and len(self._free) < self.max_free:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])
        self._show()  # count

    def reclaim(self, idle_only: bool = True) -> None:
        """Ask every borrower to give its pipe back if it no longer needs it
        (with idle_only False: if it is empty at all)."""
        for borrower in list(self.lent):
            borrower.reclaim(idle_only)

    def shed(self) -> None:
        """Out of descriptors: take back every empty pipe and close them all."""
        self.reclaim(idle_only=False)
        self.close()

    def trim(self) -> None:
        """reclaim(), then close the pipes nobody took since the last trim()."""
        self.reclaim()
        for _ in range(self._low):
            r, w = self._free.pop(0)  # the oldest: the others were used since
            os.close(r)
            os.close(w)
        self._low = len(self._free)
        self._show()  # count

    def close(self) -> None:
        while self._free:
            r, w = self._free.pop()
            os.close(r)
            os.close(w)
        self._show()  # count

    def __len__(self) -> int:
        return len(self._free)
