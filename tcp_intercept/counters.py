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
from dataclasses import dataclass

@dataclass(frozen=True)
class Field:
    """One word of a slot, declared once: show info's key, and the Prometheus
    family (FAMILIES) and label value under which /metrics shows it."""
    info: str | None
    family: str | None = None
    label: str | None = None


# family -> (kind, help, label name); the exposition adds tcp_intercept_ (and
# _total to counters).
FAMILIES = {
    "connections_accepted": ("counter", "Connections intercepted", None),
    "connections_limited": ("counter", "Connections refused or held back by a limit, by limit",
                            "reason"),
    "connect_failures": ("counter", "Connections to servers that failed, by reason", "reason"),
    "connections_closed": ("counter", "Connections closed, by how they ended", "how"),
    "bytes": ("counter", "Bytes relayed, by direction (c2s: client to server)", "direction"),
    "worker_restarts": ("counter", "Workers that died and were replaced", None),
    "connections_full_reset": ("counter", "Connections reset at --max-connections "
                               "(--when-full reset)", None),
    "full_bypass_periods": ("counter", "Times a worker at its share of --max-connections "
                            "stopped listening (--when-full bypass); while every worker "
                            "has, new connections pass the proxy unseen", None),
    "pipes": ("gauge", "Kernel pipes of the pipe pools, lent to a relay or free", "state"),
    "retransmits": ("counter", "Segments retransmitted, by leg (client: client to router), "
                    "read from TCP_INFO at each close with --leg-stats", "leg"),
    "port_reuse_conflicts": ("counter", "New connections (-B client) whose 4-tuple a socket of "
                             "an earlier one still held, by outcome: that closing socket "
                             "reclaimed, or the connection refused", "outcome"),
}
FIELDS: list[Field] = []


def _declare(info: str | None, family: str | None = None, label: str | None = None) -> int:
    FIELDS.append(Field(info, family, label))
    return len(FIELDS) - 1


# The layout of a slot, in order. A new field goes at the end: an upgrade's
# new program reads the old workers' slots by these indices (SLOT_WORDS
# leaves room), and an old worker leaves a new field at 0.
ACCEPTED = _declare("Connections_accepted", "connections_accepted")
LIMITED_MAX_CONNECTIONS = _declare("Limited_max_connections", "connections_limited",
                                   "max_connections")
LIMITED_MAX_PER_CLIENT = _declare("Limited_max_per_client", "connections_limited",
                                  "max_per_client")
CONNECT_REFUSED = _declare("Connect_failed_refused", "connect_failures", "refused")
CONNECT_UNREACHABLE = _declare("Connect_failed_unreachable", "connect_failures", "unreachable")
CONNECT_TIMEOUT = _declare("Connect_failed_timeout", "connect_failures", "timeout")
CONNECT_OTHER = _declare("Connect_failed_other", "connect_failures", "other")
CLOSED_CLEAN = _declare("Closed_clean", "connections_closed", "clean")
CLOSED_RESET = _declare("Closed_reset", "connections_closed", "reset")
CLOSED_IDLE_TIMEOUT = _declare("Closed_idle_timeout", "connections_closed", "idle_timeout")
BYTES_C2S = _declare("Bytes_c2s", "bytes", "c2s")
BYTES_S2C = _declare("Bytes_s2c", "bytes", "s2c")
WORKER_RESTARTS = _declare("Worker_restarts", "worker_restarts")
PIPES_LENT = _declare("Pipes_lent", "pipes", "lent")
PIPES_FREE = _declare("Pipes_free", "pipes", "free")
PID = _declare(None)  # the slot's owner
IN_USE = _declare(None)
FULL_RESET = _declare("Full_reset", "connections_full_reset")
FULL_BYPASS_PERIODS = _declare("Full_bypass_periods", "full_bypass_periods")
RETRANS_CLIENT = _declare("Retransmits_client", "retransmits", "client")
RETRANS_SERVER = _declare("Retransmits_server", "retransmits", "server")
PORT_REUSE_RECLAIMED = _declare("Port_reuse_reclaimed", "port_reuse_conflicts", "reclaimed")
PORT_REUSE_REFUSED = _declare("Port_reuse_refused", "port_reuse_conflicts", "refused")

# The fields that add up over time (the others are gauges: the state now).
COUNTERS = tuple(index for index, field in enumerate(FIELDS)
                 if field.family and FAMILIES[field.family][0] == "counter")
CLOSED = (CLOSED_CLEAN, CLOSED_RESET, CLOSED_IDLE_TIMEOUT)
SLOT_WORDS = 32  # room to add fields without changing the layout
WORD = 8


def open_connections(counts) -> int:
    return counts[ACCEPTED] - sum(counts[i] for i in CLOSED)


class Board:
    """`slots` slots of counters in shared memory; slot 0 is the master's.
    `words` a slot: SLOT_WORDS for the counters, histograms.WORDS for the
    histograms' board (its own memfd, so the counters' layout stays)."""

    def __init__(self, slots: int = 0, fd: int | None = None, words: int = SLOT_WORDS,
                 name: str = "tcp-intercept-counters"):
        """A new board of `slots` slots, or the one in memfd `fd` (an upgrade)."""
        size = slots * words * WORD
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        else:
            size = os.fstat(fd).st_size
        self.fd = fd
        self.words = words
        self._map = mmap.mmap(fd, size)
        self._words = memoryview(self._map).cast("Q")
        self.slots = size // (words * WORD)

    def slot(self, index: int) -> memoryview:
        """Slot index, as a writable sequence of words (the FIELDS indices)."""
        start = index * self.words
        return self._words[start:start + self.words]

    def claim(self, pid: int = 0) -> int:
        """A free worker slot, zeroed; IndexError when there is none."""
        for index in range(1, self.slots):
            slot = self.slot(index)
            if not slot[IN_USE]:
                for i in range(self.words):
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

    def fold(self, index: int) -> None:
        """retire() for a board whose every word adds up (the histograms')."""
        slot, master = self.slot(index), self.slot(0)
        for i in range(self.words):
            master[i] += slot[i]
            slot[i] = 0

    def sums(self, indices) -> list[int]:
        """Each word of slot 0 summed with the same word of the slots indices."""
        total = list(self.slot(0))
        for index in indices:
            for i, value in enumerate(self.slot(index)):
                total[i] += value
        return total

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
