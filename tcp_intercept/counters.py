"""The counters: plain 64-bit integers in memory the master and its workers share.

Each worker counts where things happen (`ctr[ACCEPTED] += 1`), in a slot of
its own, so no two processes ever write the same word and no lock is
needed. The master reads every slot when somebody asks (show info,
/metrics): relaying pays one indexed add per event and nothing for being
watched. Slot 0 is the master's: its own counters, and the totals of every
worker that is gone, folded in when it is reaped, so that a counter summed
over the daemon never goes backwards when a worker exits, dies or is
replaced by an upgrade. The memory is a memfd: the upgrade hands it to the
new program, which goes on counting from the same numbers.

Every line that counts (or stamps a connection's last activity, for
--idle-timeout and show conns) ends with `# count`: bench/nocount.py makes
a copy of the package with those lines stubbed out, to measure what
counting costs.

Open connections are not counted separately: every accepted connection ends
in exactly one of the closed_* counters, so open = accepted - closed. A
worker that dies takes its connections with it (the kernel resets them);
folding its slot counts them as closed by reset.
"""

from __future__ import annotations

import mmap
import os

# Counters (only ever grow) and gauges (the state now), one word each.
FIELDS = (
    "accepted",
    "limited_max_connections", "limited_max_per_client",
    "connect_refused", "connect_unreachable", "connect_timeout", "connect_other",
    "closed_clean", "closed_reset", "closed_idle_timeout",
    "bytes_c2s", "bytes_s2c",
    "worker_restarts",
    # gauges
    "pipes_lent", "pipes_free",
    # the slot's owner
    "pid", "in_use",
)
(ACCEPTED, LIMITED_MAX_CONNECTIONS, LIMITED_MAX_PER_CLIENT,
 CONNECT_REFUSED, CONNECT_UNREACHABLE, CONNECT_TIMEOUT, CONNECT_OTHER,
 CLOSED_CLEAN, CLOSED_RESET, CLOSED_IDLE_TIMEOUT,
 BYTES_C2S, BYTES_S2C, WORKER_RESTARTS,
 PIPES_LENT, PIPES_FREE, PID, IN_USE) = range(len(FIELDS))
COUNTERS = range(PIPES_LENT)  # the fields that add up over time
CLOSED = (CLOSED_CLEAN, CLOSED_RESET, CLOSED_IDLE_TIMEOUT)
SLOT_WORDS = 32  # room to add fields without changing the layout
WORD = 8


def open_connections(counts) -> int:
    return counts[ACCEPTED] - sum(counts[i] for i in CLOSED)


class Board:
    """`slots` slots of counters in shared memory; slot 0 is the master's."""

    def __init__(self, slots: int = 0, fd: int | None = None):
        """A new board of `slots` slots, or the one in memfd `fd` (an upgrade)."""
        size = slots * SLOT_WORDS * WORD
        if fd is None:
            fd = os.memfd_create("tcp-intercept-counters", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        else:
            size = os.fstat(fd).st_size
        self.fd = fd
        self._map = mmap.mmap(fd, size)
        self._words = memoryview(self._map).cast("Q")
        self.slots = size // (SLOT_WORDS * WORD)

    def slot(self, index: int) -> memoryview:
        """Slot index, as a writable sequence of words (the FIELDS indices)."""
        start = index * SLOT_WORDS
        return self._words[start:start + SLOT_WORDS]

    def claim(self, pid: int = 0) -> int:
        """A free worker slot, zeroed; IndexError when there is none."""
        for index in range(1, self.slots):
            slot = self.slot(index)
            if not slot[IN_USE]:
                for i in range(SLOT_WORDS):
                    slot[i] = 0
                slot[IN_USE], slot[PID] = 1, pid
                return index
        raise IndexError("every counter slot is taken")

    def retire(self, index: int) -> None:
        """Fold a gone worker's counters into slot 0 and free its slot. Its
        connections still open died with it: they count as closed by reset."""
        slot, master = self.slot(index), self.slot(0)
        for i in COUNTERS:
            master[i] += slot[i]
        master[CLOSED_RESET] += open_connections(slot)
        for i in range(SLOT_WORDS):
            slot[i] = 0

    def in_use(self) -> list[int]:
        return [i for i in range(1, self.slots) if self.slot(i)[IN_USE]]

    def totals(self) -> list[int]:
        """Every field summed over slot 0 and the live workers' slots."""
        total = list(self.slot(0)[:len(FIELDS)])
        for index in self.in_use():
            slot = self.slot(index)
            for i in range(len(FIELDS)):
                total[i] += slot[i]
        return total

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self.fd)
