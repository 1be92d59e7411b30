"""A splice pair: the intercepted client socket, our own socket to the
original destination, and one relay per direction.

Life of a connection:
  connecting  accepted; a non-blocking connect() to the original destination
              is under way. Only the server socket is watched (writable =
              connect finished). A refused or failed connect, or one that
              outlives --connect-timeout, resets the client.
  relaying    both relays run (C>S and S>C); `_update` alone decides which
              events each socket waits for, from the relays' states.
  half-closed one relay saw EOF and shut down its destination's write side;
              the other direction goes on until it sees EOF too.
  closed      both relays are done (clean), or an error (including a reset
              from either peer), --idle-timeout or the daemon's shutdown cut
              it: then both sockets are closed with SO_LINGER 0, so the other
              peer gets a reset too, not a FIN that would pass lost bytes off
              as a clean end.
Every connection counts once as accepted and once as closed (how: clean,
reset, idle timeout); a failed connect also counts why. The first thing
that ended it is kept as a termination code (`end_code()`, summary.py
lists them) for the close summary and `show conn`. With -B client, a
connect that finds the client's 4-tuple still held by a closing socket of an
earlier connection takes it back and tries once more, or fails (reclaim.py);
either way it counts and logs one line.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from os import strerror

from loguru import logger

from . import counters, reclaim
from .address import format_sockaddr
from .descriptors import Reserve
from .evloop import EVENTS, READ, WRITE, Loop
from .logs import Log
from .pipes import PipePool
from .relay import Relay, interest
from .policy import Policy
from .recipe import Recipe
from .table import ConnectionTable

LINGER_RESET = struct.pack("ii", 1, 0)
CONNECT_FAILURE = {errno.ECONNREFUSED: counters.CONNECT_REFUSED,
                   errno.ENETUNREACH: counters.CONNECT_UNREACHABLE,
                   errno.EHOSTUNREACH: counters.CONNECT_UNREACHABLE,
                   errno.ENETDOWN: counters.CONNECT_UNREACHABLE,
                   errno.EHOSTDOWN: counters.CONNECT_UNREACHABLE,
                   errno.ETIMEDOUT: counters.CONNECT_TIMEOUT}


@dataclass(eq=False)
class Context:
    """What every connection shares: the loop, its counters, how to reach servers."""
    loop: Loop
    pool: PipePool
    table: ConnectionTable
    ctr: memoryview  # this worker's counters (counters.py)
    # The per-connection lines go here (logs.Log's fast path); None with -q.
    log: Log | None
    # What a connection's legs get when no policy decides (recipe.py).
    recipe: Recipe = field(default_factory=Recipe)
    # The policy that chooses a recipe per connection, if any (policy.py).
    policy: Policy | None = None
    # Told of every connect() under way (--connect-timeout), when set.
    on_connecting: Callable[[Connection], None] | None = None
    # Told of every connection that closes (--max-connections, --max-per-client).
    on_close: Callable[[Connection], None] | None = None
    # The spare descriptor for when they run out (descriptors.py).
    reserve: Reserve = field(default_factory=Reserve)
    # Told of every connection about to close, its sockets still open
    # (summary.Closing, with --leg-stats or --log-format summary|json); None by
    # default, so that the default options read no TCP_INFO.
    on_end: Callable[[Connection, float], None] | None = None
    # Told of every client refused on arrival, (peer, destination, termination
    # code: PLC --max-per-client, PMC --when-full reset), for the close
    # summary; None by default.
    on_refused: Callable[[tuple, tuple, str], None] | None = None


class Connection:
    __slots__ = ("ctx", "recipe", "client", "server", "peer", "dst", "c2s", "s2c", "cw", "sw",
                 "cmask", "smask", "key", "closed", "_id", "started", "active", "connected",
                 "ended")

    def __init__(self, ctx: Context, client: socket.socket, peer: tuple, dst: tuple,
                 recipe: Recipe | None = None, syn_dscp: int | None = None):
        self.ctx = ctx
        # Which rule chose it: recipe.name (telemetry reads it there).
        self.recipe = recipe or ctx.recipe
        self.client = client
        self.peer = peer
        self.dst = dst
        self.server = None
        self.c2s = self.s2c = None
        self.cw = self.sw = None
        self.cmask = self.smask = 0
        self.closed = False
        self._id = None
        self.started = self.active = self.connected = ctx.loop.now()
        self.ended = None  # who and how, when it ends (end_code())
        self.key = ctx.table.add(self)
        ctx.ctr[counters.ACCEPTED] += 1  # count
        if ctx.log is not None:
            ctx.log.info(f"{self.id}: Connection intercepted")
        try:
            self._connect(syn_dscp)
        except OSError as err:
            self._connect_failed(err.errno, err.strerror or err)
        except Exception as err:
            self._fail(None, err)

    @property
    def id(self) -> str:
        """`[client]:port-->[destination]:port`, as the original named it."""
        if self._id is None:
            self._id = f"{format_sockaddr(self.peer)}-->{format_sockaddr(self.dst)}"
        return self._id

    def _connect(self, syn_dscp: int | None) -> None:
        ctx, recipe = self.ctx, self.recipe
        recipe.prepare_client(self.client, syn_dscp)
        self.server = server = recipe.open_server(self.client.family, ctx.reserve)
        recipe.prepare_server(server, self.peer, syn_dscp)
        status = server.connect_ex(self.dst)
        if status == errno.EADDRNOTAVAIL and recipe.spoof_client:
            status = self._reclaim(server)
            if status is None:
                return
        if status not in (0, errno.EINPROGRESS):
            raise OSError(status, strerror(status))
        if ctx.log is not None:
            ctx.log.info(f"{self.id}: Connecting {self.source}-->{format_sockaddr(self.dst)}"
                         if not recipe.spoof_client else
                         # Our side is the client's address: the id again.
                         f"{self.id}: Connecting {self.id}")
        # READ too: then WRITE alone says the handshake succeeded (an error
        # comes as EPOLLERR, which libev reports as READ and WRITE), and
        # SO_ERROR is asked only when READ came too.
        self.sw = ctx.loop.borrow_io(server.fileno(), READ | WRITE)
        self.smask = READ | WRITE
        self.sw.start(self._on_connected, EVENTS)
        if ctx.on_connecting is not None:
            ctx.on_connecting(self)

    def _reclaim(self, server: socket.socket) -> int | None:
        """Our 4-tuple is taken (reclaim.py): take it back and connect
        again (connect's status), or refuse the client (None)."""
        ctx = self.ctx
        try:
            state = reclaim.take_back(server.family, self.peer, self.dst)
        except (reclaim.Held, OSError) as err:
            ctx.ctr[counters.PORT_REUSE_REFUSED] += 1  # count
            if ctx.log is not None:
                ctx.log.warning(f"{self.id}: port reuse: 4-tuple {err}, refusing")
            self.abort()
            return None
        ctx.ctr[counters.PORT_REUSE_RECLAIMED] += 1  # count
        if ctx.log is not None:
            ctx.log.info(f"{self.id}: port reuse: reset our earlier socket ({state}) "
                         "with this 4-tuple")
        return server.connect_ex(self.dst)

    @property
    def source(self) -> str:
        """Our address toward the server, `[ip]:port`."""
        if self.recipe.spoof_client:
            return format_sockaddr(self.peer)
        try:
            return format_sockaddr(self.server.getsockname())
        except (OSError, AttributeError):
            return "-"

    def _on_connected(self, events: int) -> None:
        if self.closed:
            return
        self.sw.stop()  # re-armed by _update, with the relaying callback
        self.smask = 0
        self.active = self.ctx.loop.now()  # count
        self.connected = self.active
        try:
            error = events != WRITE and self.server.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_ERROR)
            if error:
                self._connect_failed(error, strerror(error))
                return
            if self.ctx.log is not None:
                self.ctx.log.info(f"{self.id}: server accepted connection, splicing")
            pool, ctr = self.ctx.pool, self.ctx.ctr
            self.c2s = Relay(self.client, self.server, "C>S", pool, ctr, counters.BYTES_C2S)
            self.s2c = Relay(self.server, self.client, "S>C", pool, ctr, counters.BYTES_S2C)
            self.c2s.other, self.s2c.other = self.s2c, self.c2s
            self.cw = self.ctx.loop.borrow_io(self.client.fileno(), READ)
        except Exception as err:
            self._fail(None, err)
            return
        # The client has usually spoken while we were connecting.
        self._on_event(READ, self.c2s, self.s2c)

    def _on_event(self, events: int, inbound: Relay, outbound: Relay) -> None:
        """`inbound` reads from the socket that fired, `outbound` writes to it."""
        if self.closed:
            return
        self.active = self.ctx.loop.now()  # count
        relay = inbound
        try:
            if events & READ and inbound.on_readable():
                self._eof(inbound)
            if events & WRITE:
                relay = outbound
                outbound.on_writable()
            self._update()
        except Exception as err:
            self._fail(relay, err, "C" if inbound is self.c2s else "S")

    def _eof(self, relay: Relay) -> None:
        if self.ended is None:  # the first FIN: a clean end begins
            self.ended = "CFD" if relay is self.c2s else "SFD"
        if self.ctx.log is not None:
            self.ctx.log.info(f"{self.id} {relay.name}: EOF")

    def _update(self) -> None:
        """The one place that decides what each socket waits for."""
        c2s, s2c = self.c2s, self.s2c
        if c2s.done and s2c.done:
            self.close(counters.CLOSED_CLEAN)
            return
        cmask = interest(c2s, s2c)
        if cmask != self.cmask:
            self.cmask = cmask
            self._arm(self.cw, cmask, c2s, s2c)
        smask = interest(s2c, c2s)
        if smask != self.smask:
            self.smask = smask
            self._arm(self.sw, smask, s2c, c2s)

    def _arm(self, watcher, mask: int, inbound: Relay, outbound: Relay) -> None:
        watcher.stop()
        if mask:
            watcher.events = mask
            watcher.start(self._on_event, EVENTS, inbound, outbound)

    def _connect_failed(self, code: int | None, why) -> None:
        self.ctx.ctr[CONNECT_FAILURE.get(code, counters.CONNECT_OTHER)] += 1  # count
        self._ended("P" if why == "timed out" else "S", "T" if code == errno.ETIMEDOUT else "R")
        if self.ctx.log is not None:
            self.ctx.log.warning(f"{self.id}: connect to server failed: {why}")
        self.abort()

    def connect_timed_out(self) -> None:
        """--connect-timeout: the server never finished the handshake."""
        if not self.closed and self.c2s is None:
            self._connect_failed(errno.ETIMEDOUT, "timed out")

    def idle_timed_out(self, seconds: float) -> None:
        """--idle-timeout: nothing moved either way for that long."""
        if self.ctx.log is not None:
            self.ctx.log.warning(f"{self.id}: idle for {seconds:g} s, resetting")
        self._ended("P", "T")
        self.abort(counters.CLOSED_IDLE_TIMEOUT)

    def _fail(self, relay: Relay | None, err: Exception, side: str = "P") -> None:
        """What a peer did (a reset, a vanished peer) is a per-connection line,
        silenced by -q like the others; a bug in here is always logged."""
        where = f"{self.id} {relay.name}" if relay is not None else self.id
        if not isinstance(err, OSError):
            self._ended("P", "E")
            logger.opt(exception=err).error("{}: internal error, closing", where)
        else:
            # ETIMEDOUT: --user-timeout or keepalive gave up on that side's peer.
            self._ended(side, "T" if err.errno == errno.ETIMEDOUT else "R")
            if self.ctx.log is not None:
                self.ctx.log.error(f"{where}: Error: {err.strerror or err}")
        self.abort()

    def _ended(self, who: str, how: str) -> None:
        """A reset, an error or a timeout: it outranks a FIN seen before."""
        if self.ended is None or self.ended[1] == "F":
            self.ended = who + how + self.phase()

    def phase(self) -> str:
        """C connecting, D relaying both ways, H half-closed."""
        if self.c2s is None:
            return "C"
        return "H" if self.c2s.done or self.s2c.done or self.ended is not None else "D"

    def end_code(self) -> str:
        """The termination code (summary.TERMINATION_CODES); closed by the
        daemon itself when nothing else ended it."""
        return self.ended or "PK" + self.phase()

    def abort(self, how: int = counters.CLOSED_RESET) -> None:
        """Close with a reset on both sides (SO_LINGER 0)."""
        if not self.closed:
            for sock in (self.client, self.server):
                if sock is not None:
                    reset_on_close(sock)
        self.close(how)

    def close(self, how: int = counters.CLOSED_RESET) -> None:
        """Release everything; count the end as `how` (a counters index).
        Idempotent, never raises; callbacks that run after it return at once
        (they check `closed`)."""
        if self.closed:
            return
        self.closed = True
        ctx = self.ctx
        if ctx.on_end is not None:
            ctx.on_end(self, ctx.loop.now())
        for watcher in (self.cw, self.sw):
            if watcher is not None:
                self.ctx.loop.park(watcher)
        if self.c2s is not None:
            self.c2s.release()
            self.s2c.release()
            self.c2s.other = self.s2c.other = None  # no cycle left for the collector
        self.client.close()
        if self.server is not None:
            self.server.close()
        ctx.ctr[how] += 1  # count
        ctx.table.remove(self.key)
        if ctx.on_close is not None:
            ctx.on_close(self)
        if ctx.log is not None:
            ctx.log.info(f"{self.id}: closed")

    # -- what `show conns` says of it ------------------------------------------

    @property
    def state(self) -> str:
        if self.c2s is None:
            return "connecting"
        if self.c2s.done:
            return "half-closed-C>S"
        if self.s2c.done:
            return "half-closed-S>C"
        return "relaying"

    def snapshot(self, now: float) -> tuple:
        """(started, client, destination, source, state, age s, idle s,
        bytes C>S, bytes S>C, which relays hold a pipe); now may be a
        little older than the last event (a listing in slices)."""
        c2s, s2c = self.c2s, self.s2c
        pipes = [r.name for r in (c2s, s2c) if r is not None and r.pipe is not None]
        return (self.started, format_sockaddr(self.peer), format_sockaddr(self.dst),
                self.source, self.state, now - self.started, max(now - self.active, 0.0),
                c2s.moved if c2s else 0, s2c.moved if s2c else 0, ",".join(pipes) or "-")


def reset_on_close(sock: socket.socket) -> None:
    """SO_LINGER 0: close() will send a reset, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass  # already broken: close() resets or says nothing anyway

