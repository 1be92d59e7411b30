"""Which worker's listener gets a new connection, when it must be by client.

The kernel spreads the connections of an SO_REUSEPORT group over its
sockets by a hash of the whole 4-tuple: one client's connections land on
every worker. For --max-per-client a worker must see all of a client's
connections, so the group gets a classic BPF program that picks the socket
from the client's address alone (IPv4, or the last 32 bits of IPv6; the
hash multiplies by a golden-ratio constant, so neighbouring addresses
spread). The program runs in the kernel at the SYN, TPROXY included.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000  # offsets from the network (IP) header

_LD_B, _LD_W = 0x30, 0x20         # BPF_LD | BPF_B|BPF_W | BPF_ABS
_RSH, _MUL, _MOD = 0x74, 0x24, 0x94  # BPF_ALU | op | BPF_K
_JEQ, _JA, _RET_A = 0x15, 0x05, 0x16


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def by_client_program(sockets: int) -> bytes:
    """The program's instructions: client address -> socket index."""
    return b"".join((
        _insn(_LD_B, 0, 0, SKF_NET_OFF),            # A = first byte of the IP header
        _insn(_RSH, 0, 0, 4),                       # A = IP version
        _insn(_JEQ, 2, 0, 6),                       # IPv6: skip the next two
        _insn(_LD_W, 0, 0, SKF_NET_OFF + 12),       # IPv4 source address
        _insn(_JA, 0, 0, 1),
        _insn(_LD_W, 0, 0, SKF_NET_OFF + 20),       # IPv6 source, last 32 bits
        _insn(_MUL, 0, 0, 0x9E3779B1),
        _insn(_RSH, 0, 0, 16),
        _insn(_MOD, 0, 0, sockets),
        _insn(_RET_A, 0, 0, 0),
    ))


def steer_by_client(group: list[socket.socket]) -> None:
    """Attach the program to the group (any one member holds it for all)."""
    code = by_client_program(len(group))
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxQ", len(code) // 8, ctypes.addressof(buffer))
    group[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
