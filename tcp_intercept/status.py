"""What the master tells operators: the numbers and the table that the
control socket (control.py), the metrics (metrics.py) and SIGUSR1 show.
Counters come from shared memory (counters.py), the table from every
worker over its channel (channel.py); the text is report.py's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from . import NAME, __version__, report
from .channel import State, Word
from .config import Config
from .counters import FIELDS, Board
from .evloop import Loop
from .policy_keeper import PolicyKeeper

ANSWER_TIMEOUT = 5.0   # seconds a worker gets to list its connections


class Status:
    """The master's numbers and table for operators. workers: the master's
    live map of pid -> its handle of each worker (master.WorkerHandle: number,
    pid, slot, state, channel, conns_waiting)."""

    def __init__(self, config: Config, board: Board, loop: Loop, workers: Mapping,
                 started: float, policy: PolicyKeeper | None = None):
        self.config = config
        self.policy = policy
        self.board = board
        self.loop = loop
        self.workers = workers
        self.started = started

    def totals(self) -> list[int]:
        return self.board.totals()

    def pids(self) -> list[int]:
        return [os.getpid(), *sorted(self.workers)]

    def policy_lines(self) -> list[str]:
        return self.policy.lines() if self.policy is not None else []

    def policy_matches(self) -> dict[str, int]:
        """Per rule name, the connections it matched (none without --policy)."""
        return self.policy.totals() if self.policy is not None else {}

    def workers_serving(self) -> int:
        return sum(h.state == State.SERVING for h in self.workers.values())

    def info_lines(self) -> list[str]:
        processes = [report.Process("master", os.getpid())]
        for handle in sorted(self.workers.values(), key=lambda h: (h.number, h.pid)):
            counts = list(self.board.slot(handle.slot)[:len(FIELDS)])
            processes.append(report.Process(f"worker {handle.number}", handle.pid,
                                            handle.state, counts))
        return report.info_lines(name=NAME, version=__version__,
                                 options=self.config.describe(),
                                 uptime=time.time() - self.started, processes=processes,
                                 totals=self.board.totals(), when_full=self.when_full())

    def when_full(self) -> str:
        """--when-full: what a worker at its share of --max-connections does."""
        return self.config.when_full

    def conns(self, done: Callable[[list[str]], None]) -> None:
        """done(the show conns table) once every worker has listed its
        connections, or ANSWER_TIMEOUT has passed (then a comment line names
        the workers that did not answer)."""
        asked: list = [h for h in self.workers.values() if not h.channel.closed]
        lines: list[str] = []
        waiting = {h.pid for h in asked}
        timer = self.loop.timer(ANSWER_TIMEOUT)

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
            handle.channel.send(Word.CONNS)
        if not asked:
            finish()
        else:
            timer.start(lambda: waiting and finish())
