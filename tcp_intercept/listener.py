"""The listening socket: accept in batches, drop loops, back off on EMFILE.

TPROXY hands us connections addressed to anybody; getsockname() of an
accepted socket is the destination the client asked for. One whose
destination is this very listener (a client talking to the daemon itself, or
rules that send our own traffic back to us) would connect to itself forever,
so it is dropped.
"""

from __future__ import annotations

import _socket  # the C socket: no per-object Python __init__, int attributes
import errno
import socket
from collections.abc import Callable

from loguru import logger as log

from . import counters
from .address import Address, format_sockaddr
from .config import RESET
from .connection import Connection, Context, reset_on_close
from .evloop import READ
from .limits import Limits
from .sockopts import IPPROTO_MPTCP, set_transparent

TCP_SAVE_SYN = 27
ACCEPT_BATCH = 64
BACKOFF = 0.5          # seconds without accept() once descriptors run out
# Errors that concern only the connection being accepted.
PER_CONNECTION = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                  errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                  errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH)


def open_listeners(addr: Address, options: list, count: int,
                   mptcp: bool = False) -> list[socket.socket]:
    """count sockets bound to addr, listening, transparent, in one
    SO_REUSEPORT group (one per worker: see master.py); raises OSError
    (CapabilityError).

    SO_REUSEPORT would let a second daemon join the group and take half the
    connections, so a plain socket first checks that nobody holds the port.
    The same option lets -B client spoof a client whose source port is our
    listening port: the outgoing socket joins the port too (connection.py).
    """
    proto = IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP
    with socket.socket(addr.family, socket.SOCK_STREAM, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(addr.sockaddr)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.socket(addr.family, socket.SOCK_STREAM, proto))
            sock = socks[-1]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            set_transparent(sock)
            # Accepted sockets inherit these: set once here, not per connection.
            for level, option, value in options:
                sock.setsockopt(level, option, value)
            sock.bind(addr.sockaddr)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class Listener:
    """Accepts, and with limits (limits.py) owns them: it admits each
    connection and releases it when it closes (ctx.on_close). Once closed
    (a draining worker), each release goes to the after_close given to close()."""
    __slots__ = ("sock", "family", "proto", "ctx", "port", "host", "wildcard", "watcher", "timer",
                 "backing_off", "limits", "closed", "after_close",
                 "on_bypass")

    def __init__(self, sock: socket.socket, addr: Address, ctx: Context,
                 limits: Limits | None = None):
        self.sock = sock
        # Plain ints: socket.socket's family property makes an enum each time.
        self.family, self.proto = int(sock.family), sock.proto
        self.ctx = ctx
        self.limits = limits
        self.closed = False
        self.after_close: Callable[[str], None] | None = None
        if limits is not None:
            ctx.on_close = self._release
        self.port = addr.port
        self.host = addr.host
        self.wildcard = addr.is_wildcard
        self.watcher = ctx.loop.io(sock.fileno(), READ)
        # Repeating: gevent's binding fires a restarted one-shot timer at once.
        self.timer = ctx.loop.timer(BACKOFF, BACKOFF)
        self.backing_off = False
        self.on_bypass = None  # on_bypass(True or False) when it stops or resumes listening

    def start(self) -> None:
        # A worker that died while standing aside (--when-full bypass) left
        # the socket not listening: its successor listens again.
        self.sock.listen(socket.SOMAXCONN)
        self.watcher.start(self._on_readable)

    def close(self, after_close: Callable[[str], None] | None = None) -> None:
        """Stop accepting; after_close(client address) for each connection
        that closes from now on (with limits)."""
        self.closed = True
        self.after_close = after_close
        for watcher in (self.watcher, self.timer):
            watcher.stop()
            watcher.close()
        self.sock.close()
        self.ctx.reserve.close()

    def _on_readable(self) -> None:
        accept = self.sock._accept
        limits = self.limits
        for _ in range(ACCEPT_BATCH):
            full = limits is not None and limits.reached(len(self.ctx.table))
            if full and limits.when_full != RESET:
                self._stand_by()
                return
            try:
                fd, peer = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in PER_CONNECTION:
                    continue
                self._back_off(err)
                return
            if self.backing_off:
                self.backing_off = False
                self.timer.stop()
                log.info("Accepting connections again ({} open)", len(self.ctx.table))
            if full:  # --when-full reset
                self._reset(fd, peer)
            elif not self._take(fd, peer):
                return

    def _stand_by(self) -> None:
        """At --max-connections: stop accepting (queue) and, with bypass,
        listening; _room_again() undoes both."""
        self.watcher.stop()
        if self.limits.bypass:
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError as err:
                log.error("Cannot stop listening (--when-full bypass): {}", err.strerror)
                return
            self.ctx.ctr[counters.FULL_BYPASS_PERIODS] += 1  # count
            if self.on_bypass is not None:
                self.on_bypass(True)

    def _reset(self, fd: int, peer: tuple) -> None:
        # Counted before the client can see it: who saw the reset and then
        # asks show info finds it counted.
        self.ctx.ctr[counters.FULL_RESET] += 1  # count
        client = _socket.socket(self.family, socket.SOCK_STREAM, self.proto, fd)
        if self.ctx.on_refused is not None:
            try:
                self.ctx.on_refused(peer, client.getsockname(), "PMC")
            except OSError:
                pass  # no destination to name: the reset alone
        reset_on_close(client)
        client.close()

    def _take(self, fd: int, peer: tuple) -> bool:
        """Relay the accepted connection, or drop it; False: stop accepting now."""
        client = _socket.socket(self.family, socket.SOCK_STREAM, self.proto, fd)
        try:
            client.setblocking(False)
            dst = client.getsockname()
        except OSError:
            client.close()
            return True
        try:
            if dst[1] == self.port and self._aimed_at_us(dst):
                log.warning("{}-->{}: Connection directly to us, dropping",
                            format_sockaddr(peer), format_sockaddr(dst))
                client.close()
                return True
        except OSError as err:  # no descriptor for the probe
            client.close()
            self._back_off(err)
            return False
        policy = self.ctx.policy
        recipe, syn_dscp = (self.ctx.recipe, None) if policy is None else \
            policy.choose(client, peer, dst)
        if self.limits is not None and \
                not self.limits.admit(peer[0], self.ctx.loop.now(), recipe.max_per_client):
            if self.ctx.on_refused is not None:
                self.ctx.on_refused(peer, dst, "PLC")
            reset_on_close(client)  # refused, not served
            client.close()
            return True
        Connection(self.ctx, client, peer, dst, recipe, syn_dscp)
        return True

    def _release(self, connection: Connection) -> None:
        """A connection admitted here closed."""
        if self.closed:
            if self.after_close is not None:
                self.after_close(connection.peer[0])
            return
        self.limits.release(connection.peer[0])
        self._room_again()

    def inherit(self, address: str, count: int) -> None:
        """count connections from address, held by the draining worker this
        one succeeds, count against the limits until forget()."""
        self.limits.inherit(address, count)

    def forget(self, address: str, count: int) -> None:
        self.limits.forget(address, count)
        self._room_again()

    def save_syn(self, on: bool) -> None:
        """Whether the kernel keeps each client's SYN for us (TCP_SAVE_SYN):
        a policy reads it for DSCP copy and the client's MPTCP. An MPTCP
        listener refuses it: there the accepted socket tells MPTCP, and a
        policy with DSCP copy does not load (policy_file.py)."""
        if self.proto == IPPROTO_MPTCP:
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_SAVE_SYN, int(on))
        except OSError as err:
            if on:
                log.error("TCP_SAVE_SYN on the listening socket: {}: the policy's dscp = "
                          "\"copy\" and client_mptcp can not read the client's SYN",
                          err.strerror)

    def _room_again(self) -> None:
        """Accept (and with bypass, listen) again if the limit had stopped us."""
        if not self.limits.room_again(len(self.ctx.table)):
            return
        if self.limits.bypass:
            self.sock.listen(socket.SOMAXCONN)
            if self.on_bypass is not None:
                self.on_bypass(False)
        if not self.backing_off and not self.watcher.active:
            self.watcher.start(self._on_readable)

    def _aimed_at_us(self, dst: tuple) -> bool:
        """Whether dst, an address on our port, is our own listening address."""
        if not self.wildcard:
            return dst[0] == self.host
        # Bound to the wildcard: any local address on our port is us. An
        # address is local exactly when a plain bind() to it succeeds.
        probe = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            probe.bind((dst[0], 0))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def _back_off(self, err: OSError) -> None:
        """Out of descriptors or memory: pause accepting instead of spinning,
        and close the pipes that connections are not using this instant."""
        self.ctx.pool.shed()
        if not self.backing_off:
            self.backing_off = True
            log.error("accept(): {}; not accepting new connections for {} s "
                      "({} open)", err.strerror, BACKOFF, len(self.ctx.table))
        self.watcher.stop()
        if not self.timer.active:
            self.timer.start(self._resume)

    def _resume(self) -> None:
        """Try again once the reserve is back; _on_readable stops the timer
        once accept() works."""
        if self.ctx.reserve.restore():
            self.watcher.start(self._on_readable)

