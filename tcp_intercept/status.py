"""What the master tells operators: the numbers and the table that the
control socket (control.py), the metrics (metrics.py) and SIGUSR1 show.
Counters come from shared memory (counters.py), the table from every
worker over its channel (channel.py); the text is report.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import NAME, __version__, report
from .counters import FIELDS

if TYPE_CHECKING:
    from .master import Master

ANSWER_TIMEOUT = 5.0   # seconds a worker gets to list its connections


class Status:
    def __init__(self, master: Master):
        self.master = master

    def totals(self) -> list[int]:
        return self.master.board.totals()

    def pids(self) -> list[int]:
        return [os.getpid(), *sorted(self.master.workers)]

    def workers_serving(self) -> int:
        return sum(h.state == "serving" for h in self.master.workers.values())

    def info_lines(self) -> list[str]:
        master = self.master
        processes = [report.Process("master", os.getpid())]
        for handle in sorted(master.workers.values(), key=lambda h: (h.number, h.pid)):
            counts = list(master.board.slot(handle.slot)[:len(FIELDS)])
            processes.append(report.Process(f"worker {handle.number}", handle.pid,
                                            handle.state, counts))
        return report.info_lines(name=NAME, version=__version__,
                                 options=master.config.describe(),
                                 uptime=time.time() - master.started, processes=processes,
                                 totals=master.board.totals())

    def conns(self, done: Callable[[list[str]], None]) -> None:
        """done(the show conns table) once every worker has listed its
        connections, or ANSWER_TIMEOUT has passed (then a comment line names
        the workers that did not answer)."""
        asked = [h for h in self.master.workers.values() if not h.channel.closed]
        lines: list[str] = []
        waiting = {h.pid for h in asked}
        timer = self.master.loop.timer(ANSWER_TIMEOUT)

        def finish() -> None:
            timer.stop()
            timer.close()
            table = report.conns_table(lines)
            table += [f"# worker {pid} did not answer" for pid in sorted(waiting)]
            waiting.clear()
            done(table)

        def answered(pid: int, answer: list[str]) -> None:
            if pid in waiting:
                waiting.discard(pid)
                lines.extend(answer)
                if not waiting:
                    finish()

        for handle in asked:
            handle.conns_waiting.append(lambda answer, pid=handle.pid: answered(pid, answer))
            handle.channel.send("conns")
        if not asked:
            finish()
        else:
            timer.start(lambda: waiting and finish())

    def metrics(self) -> bytes:
        from .metrics import exposition  # imported at start-up (server.py)
        return exposition(self, __version__)
