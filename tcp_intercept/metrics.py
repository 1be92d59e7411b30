"""The Prometheus metrics: the exposition (for GET /metrics and `show
metrics`) and the HTTP endpoint (--metrics HOST:PORT), served by the master.

prometheus_client writes the text format; the numbers are read when a
scraper asks (a custom collector over the shared counters: counters.py), so
relaying pays nothing for being watched. Names follow Prometheus' guide:
`tcp_intercept_` then what is counted, base units, `_total` for counters,
labels for the dimensions and none for unbounded values such as addresses.
The process_* families are prometheus_client's own, summed over the master
and its workers (start time and descriptor limit: the master's).

The endpoint speaks just enough HTTP/1.x for a scraper: one GET per
connection, answered with Connection: close, the request head at most 8 KiB
(request_server.py bounds the rest).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)

from . import __version__, histograms
from . import counters as c
from .address import Address
from .errors import StartupError
from .request_server import RequestServer
from .status import Status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8192

class DaemonCollector:
    """Reads the status at each scrape: the summed counters, the processes'
    pids (master first), and the number of workers serving."""

    def __init__(self, source: Status, version: str):
        self.source = source
        self.version = version

    def collect(self):
        totals = self.source.totals()
        yield _gauge("tcp_intercept_connections", "Connections open now",
                     c.open_connections(totals))
        yield from _families(totals)
        words = self.source.histogram_words()
        if words is not None:
            yield from _histograms(words)
        yield _gauge("tcp_intercept_workers", "Worker processes serving",
                     self.source.workers_serving())
        info = GaugeMetricFamily("tcp_intercept_build_info", "The running version",
                                 labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        full = GaugeMetricFamily("tcp_intercept_when_full_info", "What a worker at its share "
                                 "of --max-connections does (--when-full)", labels=["mode"])
        full.add_metric([self.source.when_full()], 1)
        yield full
        yield from _processes(self.source.pids())
        matches = self.source.policy_matches()
        if matches:
            # A label per rule: the policy's names, a bounded set (the guide's
            # rule against unbounded labels is about addresses and such).
            family = CounterMetricFamily("tcp_intercept_policy_matches",
                                         "Connections each policy rule matched (default: none)",
                                         labels=["rule"])
            for rule, count in matches.items():
                family.add_metric([rule], count)
            yield family


def _families(totals: list[int]):
    """Every family of counters.FAMILIES, with its fields' totals."""
    for name, (kind, text, label) in c.FAMILIES.items():
        make = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        fields = [(index, field) for index, field in enumerate(c.FIELDS) if field.family == name]
        if label is None:
            [(index, _)] = fields
            yield make(f"tcp_intercept_{name}", text, value=totals[index])
            continue
        family = make(f"tcp_intercept_{name}", text, labels=[label])
        for index, field in fields:
            family.add_metric([field.label], totals[index])
        yield family


def _histograms(words: list[int]):
    """histograms.HISTOGRAMS, those of one family under one name."""
    families: dict[str, HistogramMetricFamily] = {}
    for histogram in histograms.HISTOGRAMS:
        buckets, total = histograms.read(words, histogram)
        family = families.get(histogram.family)
        if family is None:
            family = families[histogram.family] = HistogramMetricFamily(
                f"tcp_intercept_{histogram.family}", histogram.help,
                labels=[histogram.label[0]] if histogram.label else None)
        family.add_metric([histogram.label[1]] if histogram.label else [], buckets, total)
    yield from families.values()


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


# process_* families: summed over the processes, or the master's own.
_SUMMED = {"process_virtual_memory_bytes", "process_resident_memory_bytes",
           "process_cpu_seconds", "process_open_fds"}


def _processes(pids: list[int]):
    """prometheus_client's process families for each pid, folded into one."""
    folded: dict[str, object] = {}
    for index, pid in enumerate(pids):
        for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
            if family.name not in folded:
                if index == 0:
                    folded[family.name] = family
                continue
            if family.name in _SUMMED:
                mine = folded[family.name]
                for i, sample in enumerate(family.samples):
                    mine.samples[i] = mine.samples[i]._replace(
                        value=mine.samples[i].value + sample.value)
    yield from folded.values()


def exposition(source: Status, version: str = __version__) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(source, version))
    return generate_latest(registry)


def open_metrics_socket(addr: Address) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr.sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        raise StartupError(f"Can not listen for metrics on {addr}: {err.strerror}") from None
    return sock


class MetricsEndpoint:
    def __init__(self, loop, sock: socket.socket, answer: Callable[[], bytes]):
        self.answer = answer
        self.server = RequestServer(loop, sock, self._handle, end=b"\r\n\r\n",
                                    max_request=MAX_HEAD)

    def _handle(self, request: bytes | None, respond: Callable[[bytes], None]) -> None:
        if request is None:
            respond(_http(431, "Request Header Fields Too Large", b"request head too long\n"))
            return
        words = request.split(b"\r\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/1."):
            respond(_http(400, "Bad Request", b"bad request\n"))
        elif words[0] not in (b"GET", b"HEAD"):
            respond(_http(405, "Method Not Allowed", b"GET /metrics\n", allow=True))
        elif words[1].split(b"?", 1)[0] != b"/metrics":
            respond(_http(404, "Not Found", b"try /metrics\n"))
        else:
            body = self.answer()
            respond(_http(200, "OK", body, content_type=CONTENT_TYPE,
                          head_only=words[0] == b"HEAD"))

    def close(self) -> None:
        self.server.close()


def _http(status: int, reason: str, body: bytes, *, content_type: str = "text/plain",
          allow: bool = False, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    if allow:
        head += "Allow: GET, HEAD\r\n"
    return (head + "\r\n").encode() + (b"" if head_only else body)
