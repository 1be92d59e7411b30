"""What the master tells operators: the numbers and the table that the
control socket (control.py), the metrics (metrics.py) and SIGUSR1 show.
Counters come from shared memory (counters.py), the table from every
worker over its channel (channel.py); the text is report.py's.
"""

from __future__ import annotations

import json
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
CONN_INTERVAL = 1.0    # seconds between show conn's two readings


class Status:
    """The master's numbers and table for operators. workers: the master's
    live map of pid -> its handle of each worker (master.WorkerHandle: number,
    pid, slot, state, channel, conns_waiting)."""

    def __init__(self, config: Config, board: Board, loop: Loop, workers: Mapping,
                 started: float, policy: PolicyKeeper | None = None,
                 histograms: Board | None = None):
        self.config = config
        self.policy = policy
        self.board = board
        self.histograms = histograms
        self.loop = loop
        self.workers = workers
        self.started = started

    def totals(self) -> list[int]:
        return self.board.totals()

    def histogram_words(self) -> list[int] | None:
        """The histograms' words summed over the workers (histograms.py);
        None without --leg-stats, which fills them."""
        if self.histograms is None or not self.config.leg_stats:
            return None
        return self.histograms.sums(self.board.in_use())

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

    def conns(self, done: Callable[[list[str]], None], full: bool = False) -> None:
        """done(the show conns table, or show conns full's) once every worker
        has listed its connections, or ANSWER_TIMEOUT has passed (then a
        comment line names the workers that did not answer)."""
        def finish(lines: list[str], silent: list[int]) -> None:
            table = report.conns_table(lines, full)
            done(table + [f"# worker {pid} did not answer" for pid in silent])

        self._ask(f"{Word.CONNS} full" if full else Word.CONNS, finish)

    def conn(self, selector: str, done: Callable[[list[str]], None]) -> None:
        """done(show conn's lines): the connection selector names (listing.py)
        read from its worker twice, CONN_INTERVAL apart on a timer, for the
        throughput; "ERROR: ..." when no worker has it."""
        if not selector or len(selector.split()) != 1:
            done(["ERROR: show conn ID|ADDR: give one id (from show conns full) "
                  "or one client address [ip]:port"])
            return

        def first(lines: list[str], silent: list[int]) -> None:
            if not lines:
                done([f"ERROR: no connection {selector}"
                      + (f" (worker {silent} did not answer)" if silent else "")])
                return
            before = json.loads(lines[0])
            timer = self.loop.timer(CONN_INTERVAL)

            def again() -> None:
                timer.close()
                self._ask(f"{Word.CONN} {before['id']}", lambda lines, _: done(
                    report.conn_lines(before, json.loads(lines[0]) if lines else None)))

            timer.start(again)

        self._ask(f"{Word.CONN} {selector}", first)

    def _ask(self, question: str, done: Callable[[list[str], list[int]], None]) -> None:
        """Ask every worker; done(their answers' lines, the pids that did not
        answer within ANSWER_TIMEOUT)."""
        asked: list = [h for h in self.workers.values() if not h.channel.closed]
        lines: list[str] = []
        waiting = {h.pid for h in asked}
        timer = self.loop.timer(ANSWER_TIMEOUT)

        def finish() -> None:
            timer.stop()
            timer.close()
            silent = sorted(waiting)
            waiting.clear()
            done(lines, silent)

        def answered(pid: int, answer: list[str]) -> None:
            if pid in waiting:
                waiting.discard(pid)
                lines.extend(answer)
                if not waiting:
                    finish()

        for handle in asked:
            handle.conns_waiting.append(lambda answer, pid=handle.pid: answered(pid, answer))
            handle.channel.send(question)
        if not asked:
            finish()
        else:
            timer.start(lambda: waiting and finish())
