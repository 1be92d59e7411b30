"""A worker: one process, one libev loop, accepting on its listener and
relaying the connections it accepted. It knows of the master only its
channel (ready, ping, conns, drain, accept) and its slot of counters.

Life of a worker:
  waiting   started by an upgrade: ready, but not accepting until the old
            worker of its number has stopped ("accept")
  serving   accepting and relaying
  draining  after "drain" (an upgrade started new workers): the listener is
            closed here (the master keeps it open for the new workers), the
            connections go on until they end; the worker exits when the last
            one is gone, or closes them after --drain-timeout
  stopping  SIGTERM or SIGINT, or the master is gone (EOF on the channel):
            stop accepting, close every connection, exit
"""

from __future__ import annotations

import signal
import socket
from collections import Counter

from loguru import logger as log

from . import policy_file, recipe
from .channel import Channel, Word, count_line, parse_count
from .config import Config
from .connection import Context
from .errors import PolicyError
from .evloop import Loop
from .limits import Limits
from .limits import share as limits_share
from .listener import Listener
from .listing import Listing
from .logs import Log
from .pipes import PipePool
from .policy import Policy, counts_clients
from .summary import Closing
from .table import ConnectionTable
from .timeouts import Deadlines

PIPE_TRIM_INTERVAL = 1.0  # seconds; idle pipes go after one to two of these
MATCH_REPORT = 1.0  # seconds between two reports of the policy's matches


class Worker:
    def __init__(self, config: Config, number: int, listener_sock: socket.socket,
                 channel_sock: socket.socket, ctr: memoryview, logs: Log,
                 policy: Policy | None = None, histogram_slot: memoryview | None = None):
        self.config = config
        self.number = number
        self.logs = logs
        self.loop = Loop(on_error=self._on_error)
        self.pool = PipePool(ctr)
        self.table = ConnectionTable()
        self.deadlines = Deadlines(self.loop, self.table)
        log = None if config.quiet else logs
        self.ctx = Context(loop=self.loop, pool=self.pool, table=self.table, ctr=ctr,
                           log=log if config.log_format == "original" else None,
                           recipe=recipe.from_config(config))
        self.deadlines.expect([self.ctx.recipe])
        if config.leg_stats or (log is not None and config.log_format != "original"):
            closing = Closing(log, config.log_format,
                              histogram_slot if config.leg_stats else None, ctr)
            self.ctx.on_end, self.ctx.on_refused = closing, closing.refused
        if config.connect_timeout:
            self.ctx.on_connecting = self.deadlines.connect_started
        limits = None
        per_client = counts_clients(config, policy)  # --max-per-client, or a rule's
        self.limited = bool(config.max_connections or per_client)
        if self.limited:
            share = config.max_connections and \
                limits_share(config.max_connections, config.workers, number)
            limits = Limits(ctr, share, config.max_per_client, config.when_full,
                            per_client=per_client)
        self.listener: Listener | None = Listener(listener_sock, config.listen, self.ctx, limits)
        self.match_timer = self.loop.timer(MATCH_REPORT, MATCH_REPORT)
        if policy is not None:
            self._use_policy(policy)
        self.channel = Channel(self.loop, channel_sock, self._on_command, self._on_master_gone)
        self.listener.on_bypass = self._on_bypass
        self.trim = self.loop.timer(PIPE_TRIM_INTERVAL, PIPE_TRIM_INTERVAL)
        self.drain_timer = None
        self.listing = Listing(self.loop, self.table, self.channel)
        self.exit_status = 0
        self.signals = []
        for signum, handler in ((signal.SIGINT, self._on_exit_signal),
                                (signal.SIGTERM, self._on_exit_signal),
                                (signal.SIGHUP, self._on_hup)):
            watcher = self.loop.signal(signum)
            watcher.start(handler, signum)
            self.signals.append(watcher)
        # The master's business: a USR1 or USR2 sent here by mistake must
        # not kill the worker (their default action).
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)

    def run(self, accepting: bool = True) -> int:
        """Serve until told to stop; the exit status. Not accepting: until
        the master says "accept" (an upgrade's old worker still does)."""
        if accepting:
            self.listener.start()
        self.trim.start(self.pool.trim)
        if self.config.policy:
            self.match_timer.start(self._report_matches)
        self.logs.attach(self.loop)
        self.channel.send(Word.READY)
        self.loop.run()
        self._close()
        return self.exit_status

    # -- what the master says ------------------------------------------------

    def _on_command(self, line: str) -> None:
        if line == Word.PING:  # the loop runs (liveness.py)
            self.channel.send(Word.PONG)
        elif line.split(" ", 1)[0] in (Word.CONNS, Word.CONN):
            self.listing.ask(line)
        elif line == Word.DRAIN:
            self._drain()
        elif line == Word.ACCEPT:
            if self.listener is not None:
                self.listener.start()
        elif line == Word.FLUSH:
            self.logs.flush()
            self.channel.send(Word.FLUSHED)
        elif (counted := parse_count(line)) is not None:
            self._predecessor(*counted)
        elif line.startswith(f"{Word.POLICY} "):
            self._reload_policy(line.split(" ", 1)[1])
        else:
            log.error("Unknown command from the master: {!r}", line)

    def _predecessor(self, word: Word, address: str, count: int) -> None:
        """The old worker of our number, draining after an upgrade, holds
        (or no longer holds) count connections from address: they count
        against our limits (limits.py)."""
        if self.listener is None or self.listener.limits is None:
            return
        if word == Word.HELD:
            self.listener.inherit(address, count)
        else:
            self.listener.forget(address, count)

    def _on_bypass(self, bypassing: bool) -> None:
        """--when-full bypass: the master holds back the firewall's heartbeat
        while every worker stands aside (liveness.py)."""
        self.channel.send(Word.FULL if bypassing else Word.ROOM)

    # -- the policy (policy_keeper.py tells the master's side) ---------------

    def _use_policy(self, policy: Policy) -> None:
        """policy for the connections accepted from now on; those open keep theirs."""
        self.ctx.policy = policy
        self.deadlines.expect(policy.recipes())
        if any(made.connect_timeout for made in policy.recipes()):
            self.ctx.on_connecting = self.deadlines.connect_started
        if self.listener is not None:
            self.listener.save_syn(policy.needs_syn)

    def _reload_policy(self, digest: str) -> None:
        """The master reloaded the policy file (it read digest, SHA-256):
        load it, and say so ("loaded"), or keep the old one ("kept")."""
        try:
            policy = policy_file.load(self.config.policy, self.config)
            if policy.digest != digest:
                raise PolicyError(f"{self.config.policy} changed while it was reloaded "
                                  "(reload again)")
        except PolicyError as err:
            log.error("Worker {}: policy not reloaded, the old one stays: {}", self.number, err)
            self.channel.send(f"{Word.POLICY} {digest} kept")
            return
        self._report_matches()
        self._use_policy(policy)
        self.channel.send(f"{Word.POLICY} {digest} loaded")

    def _report_matches(self) -> None:
        """Tell the master what each rule matched since the last report."""
        if self.ctx.policy is not None:
            taken = self.ctx.policy.take_matched()
            if taken:
                self.channel.send(*(count_line(Word.MATCHED, name, count)
                                    for name, count in taken.items()))

    # EOF on the channel: the master died (it never closes it otherwise).
    def _on_master_gone(self) -> None:
        log.error("The master process is gone; closing every connection and exiting")
        self.exit_status = 1
        self.loop.stop()

    def _drain(self) -> None:
        """Stop accepting; leave the loop once no connection is left. With
        limits, say what this worker holds, for the worker of its number
        that succeeds it (again at each "drain": a later upgrade's master
        asks anew), and then each close. "drained" once the listener is
        closed: the successor may accept."""
        if self.limited:
            held = Counter(connection.peer[0] for connection in self.table.connections())
            self.channel.send(*(count_line(Word.HELD, address, count)
                                for address, count in held.items()))
        if self.listener is None:
            self.channel.send(Word.DRAINED)
            return
        # Our connections no longer count for our successor as they close.
        self.listener.close(self._closed_while_draining if self.limited else None)
        self.listener = None
        self.channel.send(Word.DRAINED)
        self.table.on_empty = self.loop.stop
        if not len(self.table):
            self.loop.stop()
        elif self.config.drain_timeout:
            self.drain_timer = self.loop.timer(self.config.drain_timeout)
            self.drain_timer.start(self._drain_overdue)

    def _drain_overdue(self) -> None:
        """--drain-timeout: cut what is left (with a reset: bytes may be lost)."""
        log.warning("Drain timeout: closing the last {} connection(s)", len(self.table))
        for connection in self.table.connections():
            connection.abort()
        self.loop.stop()

    def _closed_while_draining(self, address: str) -> None:
        self.channel.send(count_line(Word.CLOSED, address, 1))

    # -- signals ----------------------------------------------------------------

    # SIGINT, SIGTERM: leave the loop; _close() does the rest in order.
    def _on_exit_signal(self, signum: int) -> None:
        self.loop.stop()

    # SIGHUP (forwarded by the master): logrotate moved the log file away.
    def _on_hup(self, signum: int) -> None:
        self.logs.reopen()

    def _on_error(self, context, err: BaseException) -> None:
        log.opt(exception=err).error("Unexpected error in {}", context)

    def _close(self) -> None:
        """Stop accepting, then close every connection, then the loop."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for connection in self.table.connections():
            connection.close()
        self._report_matches()
        self.listing.close()
        watchers = [*self.signals, self.trim, self.match_timer]
        if self.drain_timer is not None:
            watchers.append(self.drain_timer)
        for watcher in watchers:
            watcher.stop()
            watcher.close()
        self.channel.close()
        self.deadlines.close()
        self.pool.close()
        self.logs.detach()
        self.loop.destroy()

