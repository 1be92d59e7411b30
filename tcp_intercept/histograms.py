"""Histograms of what connections were, filled at close (with --leg-stats)
and read by /metrics: how long connections
lasted, how long the server took to accept, and each leg's smoothed RTT
when it closed.

Like the counters (counters.py), they are plain 64-bit words in shared
memory, one slot per worker in a board of their own (a memfd handed over
by an upgrade like the counters'): a worker adds 1 to a bucket and the
microseconds to a sum; the master sums the slots at scrape time. A
bucket holds the observations above the previous bound up to its own
(Prometheus makes them cumulative: `le`).

The bounds suit a 1 ms LAN leg and a 600 ms geostationary satellite leg
alike: a factor of about two from 0.5 ms to 5 s, with 0.6 and 0.7 s where
satellite round trips sit. A connect time can also hold the kernel's SYN
retransmissions (1, 3, 7 s...).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

RTT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7,
               1.0, 2.0, 5.0)
CONNECT_BUCKETS = (*RTT_BUCKETS, 10.0, 30.0)
DURATION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    14400.0, 86400.0)


@dataclass(frozen=True)
class Histogram:
    family: str           # tcp_intercept_ + this
    help: str
    buckets: tuple[float, ...]
    label: tuple[str, str] | None  # (name, value), or None
    offset: int           # its first word in a slot: the buckets, +Inf, the sum (us)

    @property
    def words(self) -> int:
        return len(self.buckets) + 2


HISTOGRAMS: list[Histogram] = []


def _declare(family: str, text: str, buckets: tuple[float, ...],
             label: tuple[str, str] | None = None) -> Histogram:
    offset = sum(h.words for h in HISTOGRAMS)
    HISTOGRAMS.append(Histogram(family, text, buckets, label, offset))
    return HISTOGRAMS[-1]


DURATION = _declare("connection_duration_seconds", "How long connections lasted, "
                    "accept to close", DURATION_BUCKETS)
CONNECT = _declare("connect_seconds", "Time from accepting a client to the server "
                   "accepting our connection", CONNECT_BUCKETS)
RTT_CLIENT = _declare("leg_rtt_seconds", "Smoothed RTT of each leg when the connection "
                      "closed (client: client to router)", RTT_BUCKETS, ("leg", "client"))
RTT_SERVER = _declare("leg_rtt_seconds", "Smoothed RTT of each leg when the connection "
                      "closed (client: client to router)", RTT_BUCKETS, ("leg", "server"))
WORDS = sum(h.words for h in HISTOGRAMS)


def observe(slot, histogram: Histogram, seconds: float) -> None:
    offset = histogram.offset
    slot[offset + bisect_left(histogram.buckets, seconds)] += 1
    slot[offset + len(histogram.buckets) + 1] += int(seconds * 1_000_000)


def read(words, histogram: Histogram) -> tuple[list[tuple[str, int]], float]:
    """Prometheus' view of one histogram in summed words: the cumulative
    buckets [(le, count)...], "+Inf" last, and the sum in seconds."""
    offset, size = histogram.offset, len(histogram.buckets)
    buckets, total = [], 0
    for index, bound in enumerate((*histogram.buckets, "+Inf")):
        total += words[offset + index]
        buckets.append((bound if isinstance(bound, str) else f"{bound:g}", total))
    return buckets, words[offset + size + 1] / 1_000_000
