"""The master: the process in the pid file. It holds the listening sockets,
forks the workers that accept and relay, replaces a worker that dies, and
turns signals into what they mean. It never touches a connection.

Signals (each handler below says the same):
  SIGTERM, SIGINT  stop: TERM to every worker (they close their
                   connections), wait for them, exit 0
  SIGHUP           reopen the log here and in every worker
  SIGUSR1          show info and show conns, into the log
  SIGUSR2          upgrade in place (handover.py): exec the installed program,
                   which starts new workers and drains the old ones
  SIGCHLD          reap workers; one that died unasked is replaced

A timer pings the serving workers (liveness.py): one that stops answering
is killed and replaced; while all answer, the master's heartbeat goes to
systemd's watchdog and to the firewall (tproxy.sh's iptables rules).

Worker states: channel.State (starting, serving, old, draining, stopping,
hung).
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger as log

from . import histograms, __version__, handover
from .channel import Channel, State, Word, count_line, parse_count
from .config import Config
from .control import Control, remove_control_socket
from .counters import PID, WORKER_RESTARTS, Board
from .detach import notify
from .errors import EX_OSERR, EX_SOFTWARE
from .evloop import Loop
from .liveness import PING_EVERY, Heartbeat, Pinger
from .logs import Log
from .policy import Policy
from .policy_keeper import PolicyKeeper
from .status import Status
from .worker import Worker

STOP_TIMEOUT = 10.0    # seconds workers get to close their connections before KILL
RESPAWN_DELAY = 1.0    # a worker failing to start is replaced after this long
YOUNG = 1.0            # seconds: twice in a row dying this soon is failing to start
CHECK_POLL = 0.05      # seconds between looks at an upgrade's check
FLUSH_WAIT = 0.2       # seconds the workers get to write out their log lines
DRAINED_WAIT = 1.0     # seconds an upgrade's new worker waits for the old one's "drained"


@dataclass(eq=False)
class WorkerHandle:
    """The master's view of one worker process."""
    pid: int
    number: int          # 1..N; worker N serves listener N-1
    slot: int            # its counters
    channel: Channel | None = None
    state: State = State.STARTING
    started: float = 0.0
    pinged: float | None = None  # when its unanswered ping went
    bypassing: bool = False      # --when-full bypass: full, not listening
    successor: bool = False      # started by an upgrade: waits for "accept"
    conns_waiting: list = field(default_factory=list)  # callbacks for "conns" answers
    conns_lines: list = field(default_factory=list)
    # Draining, with limits: its connections per client address, which
    # count against the limits of the worker now serving its number.
    held: Counter = field(default_factory=Counter)


@dataclass(eq=False)
class _Barrier:
    """Master._in_order(): the workers still to answer FLUSHED, and what then."""
    waiting: set[int]
    then: Callable[[], None]
    timer: object


@dataclass
class Sockets:
    """Every socket the master holds: made at start-up (before detaching) or
    handed over by an upgrade, kept for the daemon's whole life."""
    listeners: list[socket.socket] = field(default_factory=list)
    control: socket.socket | None = None
    control_path: str | None = None
    control_file: tuple[int, int] | None = None
    metrics: socket.socket | None = None

    def all(self) -> list[socket.socket]:
        return [s for s in (*self.listeners, self.control, self.metrics) if s is not None]

    def close(self) -> None:
        if self.control is not None:
            remove_control_socket(self.control_path, self.control_file)
        for sock in self.all():
            sock.close()


class Master:
    def __init__(self, config: Config, sockets: Sockets, logs: Log, board: Board,
                 command: list[str], taken: handover.Handover | None = None,
                 policy: Policy | None = None):
        self.config = config
        self.sockets = sockets
        self.listeners = sockets.listeners
        self.logs = logs
        self.board = board
        # The histograms' board: a memfd of its own, slot for slot with the
        # counters' (none handed over by a program older than it: a new one).
        fd = taken.histograms if taken is not None else None
        self.histograms = Board(slots=board.slots, fd=fd, words=histograms.WORDS,
                                name="tcp-intercept-histograms")
        self.command = command  # to exec for an upgrade
        self.taken = taken      # what an upgrade handed us
        self.started = taken.started if taken else time.time()
        self.upgrading = taken is not None
        self.drain_sent: float | None = None  # when the old workers were told to drain
        self.loop = Loop(on_error=self._on_error)
        self.workers: dict[int, WorkerHandle] = {}
        self.policy_keeper = PolicyKeeper(config, policy, self.loop, self._tell_policy)
        self.status = Status(config, board, self.loop, self.workers, self.started,
                             self.policy_keeper, self.histograms)
        self.control = None if sockets.control is None else \
            Control(self.loop, sockets.control, self.status, self.policy_keeper.reload)
        self.metrics_endpoint = None
        if sockets.metrics is not None:
            from .metrics import MetricsEndpoint, exposition
            self.metrics_endpoint = MetricsEndpoint(self.loop, sockets.metrics,
                                                    lambda: exposition(self.status))
        self.young_deaths: dict[int, int] = {}  # per worker number, in a row
        self.stopping = False
        self.on_ready: Callable[[int, str], None] | None = None
        self.respawn = self.loop.timer(RESPAWN_DELAY, RESPAWN_DELAY)
        self.stop_timer = self.loop.timer(STOP_TIMEOUT)
        self.check: handover.Check | None = None  # SIGUSR2's check, while it runs
        self.check_timer = self.loop.timer(CHECK_POLL, CHECK_POLL)
        self.flushing: list[_Barrier] = []  # signals waiting for the workers' log lines
        self.pinger = Pinger(self._on_hung)
        self.heartbeat = Heartbeat(config.listen.port)
        self.tick_timer = self.loop.timer(PING_EVERY, PING_EVERY)
        self.one_word = {  # the lines of one word a worker sends, but for "conns" answers
            Word.PONG: lambda handle, _: Pinger.pong(handle),
            Word.FULL: self._on_bypass, Word.ROOM: self._on_bypass,
            Word.READY: self._on_ready,
            Word.FLUSHED: lambda handle, _: self._flushed(handle.pid),
            Word.DRAINED: lambda handle, _: self._let_accept(handle.number),
        }
        self.signals = []
        for signum, handler in ((signal.SIGINT, self._on_exit_signal),
                                (signal.SIGTERM, self._on_exit_signal),
                                (signal.SIGHUP, self._on_hup),
                                (signal.SIGUSR1, self._on_usr1),
                                (signal.SIGUSR2, self._on_usr2),
                                (signal.SIGCHLD, self._on_child)):
            watcher = self.loop.signal(signum)
            watcher.start(handler, signum)
            self.signals.append(watcher)
        handover.unblock_signals()  # blocked across an upgrade's exec

    def run(self, on_ready: Callable[[int, str], None]) -> None:
        """Start the workers; on_ready(0, "") once every one of them serves,
        or on_ready(status, why) if one failed first; then run until stopped."""
        self.on_ready = on_ready
        if self.taken is not None:
            self._adopt(self.taken.workers)
        for number in range(1, self.config.workers + 1):
            self._spawn(number)
        self.logs.attach(self.loop)
        self.tick_timer.start(self._on_tick)
        self.loop.run()
        self._close()

    # -- workers ------------------------------------------------------------------

    def _spawn(self, number: int) -> None:
        """Fork worker `number`; a failure to fork is retried by the respawn timer."""
        slot = self.board.claim()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.logs.flush()
        # Objects of the master that the child never uses must never be
        # freed there either: their descriptors are closed under them, and
        # the numbers reused by the worker's connections.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as err:
            gc.unfreeze()
            self.board.retire(slot)
            self.histograms.fold(slot)
            ours.close()
            theirs.close()
            log.error("Can not start worker {}: fork(): {}", number, err.strerror)
            self._schedule_respawn()
            return
        # During an upgrade the old worker of this number still accepts on
        # the same listening socket: ours waits until it no longer does.
        successor = self.upgrading and any(h.number == number and h.state == State.OLD
                                           for h in self.workers.values())
        if pid == 0:
            os._exit(self._become_worker(number, slot, theirs, successor))
        gc.unfreeze()
        theirs.close()
        self.board.slot(slot)[PID] = pid
        handle = WorkerHandle(pid, number, slot, started=self.loop.now(), successor=successor)
        self._watch(handle, ours)
        for old in self.workers.values():
            if old.number == number and old.held:
                handle.channel.send(*(count_line(Word.HELD, address, count)
                                      for address, count in old.held.items()))

    def _watch(self, handle: WorkerHandle, channel: socket.socket) -> None:
        """Count handle among the workers and listen to its channel (its end
        is learnt from SIGCHLD, not from the channel)."""
        handle.channel = Channel(self.loop, channel, lambda line: self._on_line(handle, line),
                                 lambda: None)
        self.workers[handle.pid] = handle

    def _become_worker(self, number: int, slot: int, channel: socket.socket,
                       successor: bool) -> int:
        """In the forked child: drop everything of the master's, serve, exit."""
        try:
            for watcher in self.signals:  # libev: a signal belongs to one loop
                watcher.stop()
            # One listening socket per worker (an SO_REUSEPORT group made by
            # the master) rather than one inherited by all: measured with
            # bench/variants.py (-w 2, 4 alternating rounds, 2026-12-04), a
            # shared socket wakes every worker for each connection and all
            # but one find nothing to accept: 6088 against 6516 conn/s,
            # 160 against 152 CPU us per connection (system time +7 us).
            # The kernel hashes connections over the group; the master keeps
            # every socket open, so a worker's death or an upgrade drops no
            # connection waiting in a queue (the new worker N takes socket N).
            listener = self.listeners[number - 1]
            keep = {0, 1, 2, channel.fileno(), listener.fileno()}
            if self.logs.fileno() is not None:
                keep.add(self.logs.fileno())
            _close_all_but(keep)
            self.logs.detach()
            worker = Worker(self.config, number, listener, channel, self.board.slot(slot),
                            self.logs, self.policy_keeper.policy, self.histograms.slot(slot))
            return worker.run(accepting=not successor)
        except BaseException:
            log.opt(exception=True).error("Worker {} failed", number)
            return EX_SOFTWARE

    def _on_line(self, handle: WorkerHandle, line: str) -> None:
        if line in self.one_word:
            self.one_word[line](handle, line)
        elif (counted := parse_count(line)) is not None:
            if counted[0] == Word.MATCHED:
                self.policy_keeper.add(*counted[1:])
            else:
                self._pass_on(handle, line, *counted)
        elif line.startswith(f"{Word.POLICY} "):  # "policy DIGEST loaded|kept"
            _, digest, what = (line.split() + ["", ""])[:3]
            self.policy_keeper.answered(handle.pid, digest, what == "loaded")
        elif handle.conns_waiting:
            if line:
                handle.conns_lines.append(line)
            else:  # the empty line ends an answer
                lines, handle.conns_lines = handle.conns_lines, []
                handle.conns_waiting.pop(0)(lines)

    def _on_ready(self, handle: WorkerHandle, line: str) -> None:
        if handle.state == State.STARTING:
            handle.state = State.SERVING
            self._check_ready()

    def _on_bypass(self, handle: WorkerHandle, line: str) -> None:
        handle.bypassing = line == Word.FULL

    def _pass_on(self, old: WorkerHandle, line: str, word: Word, address: str,
                 count: int) -> None:
        """A draining worker holds (or no longer holds) connections from a
        client address: so does, for its limits, the worker of its number."""
        old.held[address] += count if word == Word.HELD else -count
        if old.held[address] <= 0:
            del old.held[address]
        self._to_successor(old.number, line)

    def _to_successor(self, number: int, *lines: str) -> None:
        for handle in self.workers.values():
            if handle.number == number and handle.state in (State.STARTING, State.SERVING):
                handle.channel.send(*lines)

    def _let_accept(self, number: int) -> None:
        """The old worker `number` no longer accepts (it said "drained", or
        exited, or did not answer in time): its successor begins to. So
        the two never accept side by side, and every connection the old
        one holds counts against the new one's limits before it accepts."""
        for handle in self.workers.values():
            if handle.number == number and handle.successor \
                    and handle.state in (State.STARTING, State.SERVING):
                handle.successor = False
                handle.channel.send(Word.ACCEPT)

    def _check_ready(self) -> None:
        if self.status.workers_serving() < self.config.workers:
            return
        if self.upgrading:
            self._upgraded()
        if self.on_ready is not None:
            on_ready, self.on_ready = self.on_ready, None
            on_ready(0, "")

    def _on_tick(self) -> None:
        """Ping the workers; the heartbeat if every worker number is served
        by a worker that answers (or, during an upgrade, by the old one)."""
        if self.stopping:
            return
        if self.drain_sent is not None and self.loop.now() - self.drain_sent > DRAINED_WAIT:
            self.drain_sent = None  # old workers that did not say "drained" (hung, or older)
            for number in {h.number for h in self.workers.values() if h.successor}:
                self._let_accept(number)
        serving = [h for h in self.workers.values() if h.state == State.SERVING]
        answering = self.pinger.tick(serving, self.loop.now())
        served = len(serving) >= self.config.workers or \
            (self.upgrading and any(h.state == State.OLD for h in self.workers.values()))
        if answering and served:
            # Every worker full and standing aside: tell iptables' rules too.
            self.heartbeat.beat(firewall=not (serving and all(h.bypassing for h in serving)))

    def _on_hung(self, handle: WorkerHandle, silent: float) -> None:
        log.error("Worker {} (pid {}) has not answered for {:.1f} s; killing it",
                  handle.number, handle.pid, silent)
        handle.state = State.HUNG  # replaced when SIGCHLD says it is gone
        _kill(handle.pid, signal.SIGKILL)

    # SIGCHLD: one or more workers exited.
    def _on_child(self, signum: int) -> None:
        for pid, handle in list(self.workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._exited(handle, status)

    def _exited(self, handle: WorkerHandle, status: int) -> None:
        del self.workers[handle.pid]
        self.policy_keeper.gone(handle.pid)
        handle.channel.close()
        if handle.held:  # what it held when it went
            self._to_successor(handle.number, *(count_line(Word.CLOSED, address, count)
                                                for address, count in handle.held.items()))
        if handle.state in (State.OLD, State.DRAINING):
            self._let_accept(handle.number)
        self.board.retire(handle.slot)
        self.histograms.fold(handle.slot)
        for callback in handle.conns_waiting:
            callback(handle.conns_lines)
        how = _describe(status)
        if self.stopping or handle.state in (State.OLD, State.DRAINING):
            log.info("Worker {} (pid {}) {}", handle.number, handle.pid, how)
        elif self.on_ready is not None and not self.upgrading:
            on_ready, self.on_ready = self.on_ready, None
            on_ready(EX_OSERR, f"Worker {handle.number} {how} during start-up")
            self._stop()
        else:
            log.error("Worker {} (pid {}) {}; starting another", handle.number, handle.pid, how)
            self.board.slot(0)[WORKER_RESTARTS] += 1
            young = self.loop.now() - handle.started < YOUNG
            self.young_deaths[handle.number] = self.young_deaths.get(handle.number, 0) + 1 \
                if young else 0
            if self.young_deaths[handle.number] >= 2:  # no fork loop
                self._schedule_respawn()
            else:
                self._spawn(handle.number)
        if self.stopping and not self.workers:
            self.loop.stop()

    def _schedule_respawn(self) -> None:
        if not self.respawn.active:
            self.respawn.start(self._respawn_missing)

    def _respawn_missing(self) -> None:
        """Start every worker number that has no process serving it."""
        self.respawn.stop()
        if self.stopping:
            return
        serving = {h.number for h in self.workers.values()
                   if h.state not in (State.OLD, State.DRAINING)}
        for number in range(1, self.config.workers + 1):
            if number not in serving:
                self._spawn(number)

    # -- upgrade (handover.py) ---------------------------------------------------

    # SIGUSR2: exec the installed program in place, handing it everything.
    def _on_usr2(self, signum: int) -> None:
        self._in_order(self._upgrade)

    def _upgrade(self) -> None:
        if self.upgrading or self.check is not None or self.stopping:
            log.warning("Received SIGUSR2, but {}: ignored",
                        "the daemon is stopping" if self.stopping else
                        "an upgrade is still under way")
            return
        log.info("Received SIGUSR2, upgrading: checking {}", " ".join(self.command))
        self.check = handover.Check(self.command)
        self.check_timer.start(self._on_check)

    def _on_check(self) -> None:
        if not self.check.done():
            return
        self.check_timer.stop()
        why, self.check = self.check.why_not, None
        if why is not None:
            log.error("Upgrade aborted, this program goes on: the installed one would not "
                      "start: {}", why)
            return
        log.info("The installed program starts: handing over to it (pid {} stays)", os.getpid())
        notify("RELOADING=1")
        self.logs.flush()
        self.heartbeat.beat()  # the longest silence the new program may take
        err = handover.exec_new(self.command, self._handover())
        notify("READY=1")
        log.error("Upgrade aborted, this program goes on: exec {}: {}", self.command[0],
                  err.strerror)

    def _handover(self) -> handover.Handover:
        sockets = self.sockets
        return handover.Handover(
            version=__version__, started=self.started,
            listeners=[sock.fileno() for sock in sockets.listeners], board=self.board.fd,
            histograms=self.histograms.fd,
            control=sockets.control.fileno() if sockets.control else None,
            control_path=sockets.control_path,
            control_file=list(sockets.control_file) if sockets.control_file else None,
            metrics=sockets.metrics.fileno() if sockets.metrics else None,
            workers=[handover.OldWorker(h.pid, h.number, h.slot, h.channel.sock.fileno())
                     for h in self.workers.values() if not h.channel.closed])

    def _adopt(self, old: list[handover.OldWorker]) -> None:
        """The workers of the program we replaced: they serve until ours do."""
        for worker in old:
            self._watch(WorkerHandle(worker.pid, worker.number, worker.slot, state=State.OLD,
                                     started=self.loop.now()),
                        handover.adopt(worker.channel))
        self._on_child(signal.SIGCHLD)  # any that exited during the exec

    def _upgraded(self) -> None:
        """Our workers all serve: the old ones stop accepting and drain."""
        self.upgrading = False
        old = [h for h in self.workers.values() if h.state == State.OLD]
        for handle in old:
            handle.state = State.DRAINING
            handle.channel.send(Word.DRAIN)
        self.drain_sent = self.loop.now()
        for number in {h.number for h in self.workers.values() if h.successor} - \
                {h.number for h in old}:
            self._let_accept(number)  # its old worker is gone already
        log.info("Upgrade done: version {} serves with {} worker(s); {} old worker(s) "
                 "drain their connections", __version__, self.config.workers, len(old))
        notify("READY=1")

    # -- signals -------------------------------------------------------------------

    def _in_order(self, then: Callable[[], None]) -> None:
        """then() once every worker of ours has written out the log lines it
        holds (up to logs.FLUSH_DELAY old), or FLUSH_WAIT has passed: the
        line then() logs about a signal stands after what came before it.
        (A replaced program's old workers may not know FLUSH: not asked.)"""
        asked = [h for h in self.workers.values()
                 if h.state in (State.STARTING, State.SERVING) and not h.channel.closed]
        if not asked:
            then()
            return
        barrier = _Barrier({h.pid for h in asked}, then, self.loop.timer(FLUSH_WAIT))
        self.flushing.append(barrier)
        for handle in asked:
            handle.channel.send(Word.FLUSH)
        barrier.timer.start(lambda: self._end_barrier(barrier))

    def _flushed(self, pid: int) -> None:
        for barrier in list(self.flushing):
            barrier.waiting.discard(pid)
            if not barrier.waiting:
                self._end_barrier(barrier)

    def _end_barrier(self, barrier: _Barrier) -> None:
        if barrier in self.flushing:
            self.flushing.remove(barrier)
            barrier.timer.stop()
            barrier.timer.close()
            barrier.then()

    # SIGUSR1: show info and show conns, into the log.
    def _on_usr1(self, signum: int) -> None:
        self._in_order(self._dump)

    def _dump(self) -> None:
        log.info("Received SIGUSR1, writing show info and show conns to the log")
        for line in self.status.info_lines():
            log.info("show info: {}", line)
        self.status.conns(lambda lines: [log.info("show conns: {}", line) for line in lines])

    # SIGINT, SIGTERM: every worker closes its connections; we wait for them.
    def _on_exit_signal(self, signum: int) -> None:
        self._in_order(lambda: self._exit(signum))

    def _exit(self, signum: int) -> None:
        log.info("Received {}, exiting", signal.Signals(signum).name)
        self._stop()

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.respawn.stop()
        if self.check is not None:
            self.check.cancel()
            self.check = None
            self.check_timer.stop()
        for handle in self.workers.values():
            handle.state = State.STOPPING
            _kill(handle.pid, signal.SIGTERM)
        if not self.workers:
            self.loop.stop()
        else:
            self.stop_timer.start(self._stop_overdue)

    def _stop_overdue(self) -> None:
        for handle in self.workers.values():
            log.error("Worker {} (pid {}) did not stop within {} s; killing it",
                      handle.number, handle.pid, STOP_TIMEOUT)
            _kill(handle.pid, signal.SIGKILL)
        self.stop_timer.stop()
        self.stop_timer = self.loop.timer(STOP_TIMEOUT)
        self.stop_timer.start(self.loop.stop)

    # SIGHUP: logrotate moved the log file away; every process reopens it.
    # It re-reads the policy too, if there is one (policy_keeper.py).
    def _on_hup(self, signum: int) -> None:
        self._in_order(self._reopen)

    def _reopen(self) -> None:
        self.logs.reopen()
        for handle in self.workers.values():
            _kill(handle.pid, signal.SIGHUP)
        if self.config.policy:
            self.policy_keeper.reload()

    def _tell_policy(self, digest: str) -> list[int]:
        """A reloaded policy: every worker of ours loads it (not an old
        program's: it may not know the word); the pids told."""
        told = []
        for handle in self.workers.values():
            if handle.state in (State.STARTING, State.SERVING) and not handle.channel.closed:
                handle.channel.send(f"{Word.POLICY} {digest}")
                told.append(handle.pid)
        return told

    def _on_error(self, context, err: BaseException) -> None:
        log.opt(exception=err).error("Unexpected error in {}", context)

    def _close(self) -> None:
        for watcher in (*self.signals, self.respawn, self.stop_timer, self.check_timer,
                        self.tick_timer, *(barrier.timer for barrier in self.flushing)):
            watcher.stop()
            watcher.close()
        self.heartbeat.close()
        for server in (self.control, self.metrics_endpoint):
            if server is not None:
                server.close()
        for handle in self.workers.values():
            handle.channel.close()
        for sock in self.listeners:
            sock.close()
        self.logs.detach()
        self.loop.destroy()


def _close_all_but(keep: set[int]) -> None:
    """Close every descriptor of this process that is not in keep."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
