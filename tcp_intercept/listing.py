"""A worker's answers to the master's questions about its connections
(channel.py): "conns", "conns full" and "conn SELECTOR".

Questions are answered one after the other, in the order asked (the master
reads each answer as the lines up to an empty line). A listing goes
CONNS_SLICE connections per loop iteration (FULL_SLICE for "conns full",
which reads both legs' TCP_INFO), so relaying goes on in between however
long the table is; one time stamp serves the whole answer.

"conn SELECTOR" is answered at once with one JSON line (or none): the
connection SELECTOR names, either `PID.KEY` (the id `show conns full`
gives) or its client's address `[ip]:port`. Finding it by address scans
the table: about 0.2 us a connection, 2 ms for 10,000.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import deque

from . import report, tcpinfo
from .channel import Channel, Word
from .evloop import Loop
from .table import ConnectionTable

# Connections listed per loop iteration for "conns": at about 3.7 us each,
# relaying pauses under a millisecond however long the table is.
CONNS_SLICE = 200
# "conns full" also reads TCP_INFO and the congestion control of both legs
# and writes 22 more cells: about 20 us a connection (2 x 5.7 us reading a
# leg, 6 us the line), so fewer at a time for about the same pause.
FULL_SLICE = 35


class Listing:
    def __init__(self, loop: Loop, table: ConnectionTable, channel: Channel):
        self.loop = loop
        self.table = table
        self.channel = channel
        self.asked: deque[str] = deque()  # questions not answered in full yet
        self.start: int | None = None
        self.stop = -1
        self.now = 0.0
        self.timer = loop.timer(0.0)

    def ask(self, line: str) -> None:
        self.asked.append(line)
        if len(self.asked) == 1:
            self._begin()

    def _begin(self) -> None:
        question = self.asked[0]
        if question.startswith(f"{Word.CONN} "):
            self.channel.send(*self._one(question.split(" ", 1)[1]), "")
            self._done()
            return
        self.start, self.stop = 0, self.table.newest()
        self.now = self.loop.now()
        self.timer.start(self._page)

    def _done(self) -> None:
        self.asked.popleft()
        if self.asked:
            self._begin()

    def _page(self) -> None:
        full = self.asked[0] == f"{Word.CONNS} full"
        now, pid = self.now, os.getpid()
        page, self.start = self.table.page(self.start, self.stop,
                                           FULL_SLICE if full else CONNS_SLICE)
        if full:
            lines = [report.encode_full(pid, c.key, c.snapshot(now), tcpinfo.read(c.client),
                                        tcpinfo.read(c.server if c.c2s else None))
                     for c in page]
        else:
            lines = [report.encode(pid, c.snapshot(now)) for c in page]
        if self.start is not None:
            self.channel.send(*lines)
            self.timer.start(self._page)
            return
        self.channel.send(*lines, "")
        self._done()

    def _one(self, selector: str) -> list[str]:
        connection = self._find(selector)
        if connection is None:
            return []
        now = self.loop.now()
        c = connection
        server = tcpinfo.read(c.server if c.c2s else None)
        client = tcpinfo.read(c.client)
        return [json.dumps({
            "id": f"{os.getpid()}.{c.key}", "snapshot": c.snapshot(now),
            # The --policy rule that chose the connection's options (recipe.py:
            # "default" when none did).
            "end": c.ended, "rule": c.recipe.name,
            "client_leg": client._asdict() if client else None,
            "server_leg": server._asdict() if server else None,
            "time": now})]

    def _find(self, selector: str):
        pid, dot, key = selector.partition(".")
        if dot and pid.isdigit() and key.isdigit():
            return self.table.get(int(key)) if int(pid) == os.getpid() else None
        host, colon, port = selector.rpartition(":")
        try:
            host = str(ipaddress.ip_address(host.strip("[]")))
            port = int(port.strip("[]"))
        except ValueError:
            return None
        if not colon:
            return None
        for connection in self.table.connections():
            peer = connection.peer
            if peer[1] == port and peer[0] == host:
                return connection
        return None

    def close(self) -> None:
        self.timer.stop()
        self.timer.close()
