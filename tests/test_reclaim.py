"""reclaim.py's messages to the kernel, byte by byte (the namespace tests in
test_port_reuse.py show the kernel agrees)."""

from __future__ import annotations

import socket
import struct

import pytest

from tcp_intercept import reclaim



def test_a_request_names_one_socket_by_its_4_tuple_and_cookie():
    body = reclaim._request(socket.AF_INET, ("10.0.0.2", 40000), ("10.0.1.2", 80), (7, 9))
    assert len(body) == 56  # inet_diag_req_v2
    family, proto, ext, states = struct.unpack_from("=BBBxI", body)
    assert (family, proto, ext, states) == (socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
    sport, dport = struct.unpack_from("!HH", body, 8)
    assert (sport, dport) == (40000, 80)
    assert body[12:16] == socket.inet_aton("10.0.0.2") and body[16:28] == bytes(12)
    assert body[28:32] == socket.inet_aton("10.0.1.2")
    assert struct.unpack_from("=III", body, 44) == (0, 7, 9)


def test_without_a_cookie_any_socket_of_the_4_tuple_is_meant():
    body = reclaim._request(socket.AF_INET6, ("fd00::2", 1), ("fd00:1::2", 2), None)
    assert body[12:28] == socket.inet_pton(socket.AF_INET6, "fd00::2")
    assert struct.unpack_from("=II", body, 48) == (0xFFFFFFFF, 0xFFFFFFFF)


def test_an_answer_gives_state_inode_and_cookie():
    sockid = struct.pack("!HH16s16s", 1, 2, bytes(16), bytes(16)) + struct.pack("=III", 0, 5, 6)
    msg = struct.pack("=BBBB", socket.AF_INET, 4, 0, 0) + sockid + struct.pack("=IIIII",
                                                                             0, 0, 0, 0, 0)
    assert reclaim._parse(msg) == (4, 0, (5, 6))
    with pytest.raises(reclaim.Held):
        reclaim._parse(msg[:20])
