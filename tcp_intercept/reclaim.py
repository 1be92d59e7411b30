"""Taking a 4-tuple back from a closing socket of an earlier connection (-B client).

With -B client our socket toward the server has the client's address and
port, so it has the client's 4-tuple. A client that opens a new connection
from the same port to the same server while our socket of the previous one
is still closing in the kernel (FIN_WAIT, LAST_ACK, CLOSING: its answer lost,
or gone to another router of an ECMP group) makes our connect() fail with
EADDRNOTAVAIL. (A TIME_WAIT socket with timestamps is reused by the kernel
itself: SO_REUSEADDR on a bound socket.)

A socket in that state is an orphan: its process has closed it and the kernel
finishes the close alone; sock_diag reports it with inode 0. The client,
which opens the same 4-tuple again, has given up that connection, so the
orphan only stands in the way: we destroy it (SOCK_DESTROY, what `ss -K`
does: the server's end gets a reset) and connect again. A socket some
process still holds is not ours to take, and the new connection is refused.

Both requests go to the kernel over NETLINK_SOCK_DIAG and are answered while
sendmsg() runs: the worker's loop never waits on them.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY, SOCK_DESTROY = 20, 21
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG = struct.Struct("=IHHII")        # length, type, flags, sequence, port id
REQUEST = struct.Struct("=BBBxI")       # family, protocol, extensions, states
SOCKID = struct.Struct("!HH16s16s")     # local port, remote port, addresses
SOCKID_TAIL = struct.Struct("=III")     # interface, cookie (two words)
MSG_HEAD = struct.Struct("=BBBB")       # family, state, timer, retransmits
MSG_TAIL = struct.Struct("=IIIII")      # expires, rqueue, wqueue, uid, inode
NO_COOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
# Kernel TCP states (include/net/tcp_states.h) by number, for the log line.
STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
          6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
          11: "CLOSING"}
LISTEN = 10


class Held(Exception):
    """The 4-tuple is not free and cannot be taken back; says why (the
    kernel's error number in `code`, when it gave one)."""

    def __init__(self, why: str, code: int = 0):
        super().__init__(why)
        self.code = code


def take_back(family: int, local: tuple, remote: tuple) -> str:
    """Destroy the orphaned TCP socket whose 4-tuple is local -> remote; its
    state's name, for the log ("gone already" if no socket has it any more).
    Held when a socket has it that is not an orphan (a process holds it, or
    it listens), or the kernel refuses."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:
        try:
            reply = _ask(nl, SOCK_DIAG_BY_FAMILY, 0, _request(family, local, remote, None))
        except Held as err:
            if err.code != errno.ENOENT:
                raise
            return "gone already"  # it closed meanwhile: connect again
        state, inode, cookie = _parse(reply)
        name = STATES.get(state, str(state))
        if inode != 0 or state == LISTEN:
            raise Held(f"held by a live socket ({name})")
        _ask(nl, SOCK_DESTROY, NLM_F_ACK, _request(family, local, remote, cookie))
        return name


def _request(family: int, local: tuple, remote: tuple, cookie: tuple | None) -> bytes:
    """inet_diag_req_v2 for exactly one socket (local -> remote; cookie
    pins the very socket we looked at)."""
    pack = socket.inet_pton
    src, dst = pack(family, local[0]), pack(family, remote[0])
    cookie = cookie or (NO_COOKIE, NO_COOKIE)
    return (REQUEST.pack(family, socket.IPPROTO_TCP, 0, ALL_STATES)
            + SOCKID.pack(local[1], remote[1], src.ljust(16, b"\0"), dst.ljust(16, b"\0"))
            + SOCKID_TAIL.pack(0, *cookie))


def _ask(nl: socket.socket, kind: int, flags: int, body: bytes) -> bytes:
    """Send one request, return the kernel's one answer (after the header);
    Held on an error answer. A query is answered with the socket or an
    error, an action (NLM_F_ACK) with an error number, 0 for success."""
    nl.send(NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | flags, 1, 0) + body)
    try:
        data = nl.recv(8192, socket.MSG_DONTWAIT)
    except BlockingIOError:
        raise Held("the kernel did not answer the socket query") from None
    length, kind_back, _flags, _seq, _port = NLMSG.unpack_from(data)
    payload = data[NLMSG.size:length]
    if kind_back == NLMSG_ERROR:
        code = -struct.unpack_from("=i", payload)[0]
        if code:
            why = "no such socket" if code == errno.ENOENT else os.strerror(code)
            raise Held(f"{'destroying' if flags else 'looking up'} the socket: {why}", code)
    return payload


def _parse(reply: bytes) -> tuple[int, int, tuple[int, int]]:
    """(state, inode, cookie) of an inet_diag_msg."""
    if len(reply) < MSG_HEAD.size + SOCKID.size + SOCKID_TAIL.size + MSG_TAIL.size:
        raise Held("no such socket")
    _family, state, _timer, _retrans = MSG_HEAD.unpack_from(reply)
    _iface, *cookie = SOCKID_TAIL.unpack_from(reply, MSG_HEAD.size + SOCKID.size)
    *_, inode = MSG_TAIL.unpack_from(reply, MSG_HEAD.size + SOCKID.size + SOCKID_TAIL.size)
    return state, inode, tuple(cookie)
