"""request_server.py on its own (a loop in this process, Unix sockets): the
bounds that make an operator's client harmless.

serve() stops the loop once the client is done (or after `seconds`) and
closes the server's sockets only after that: an end of file or reset the
client sees came from the server's own bounds, never from the teardown.
Upper bounds on time leave room for a loaded machine; lower bounds are
exact (a timeout must not fire early).
"""

from __future__ import annotations

import socket
import threading
import time

from tcp_intercept.evloop import Loop
from tcp_intercept.request_server import RequestServer


def serve(tmp_path, client, *, answer: bytes = b"answer\n", seconds: float = 3.0,
          **options) -> tuple[object, list]:
    """Run a RequestServer while client(path) runs in a thread, `seconds` at
    most; (what client returned, the requests the handler saw)."""
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    loop = Loop()
    seen: list = []

    def handle(request, respond):
        seen.append(request)
        respond(answer if request is not None else b"too long\n")

    server = RequestServer(loop, listener, handle, end=b"\n", **options)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(client(path)), daemon=True)
    stop = loop.timer(seconds)
    stop.start(loop.stop)
    done = loop.timer(0.02, 0.02)
    done.start(lambda: thread.is_alive() or loop.stop())
    thread.start()
    loop.run()
    thread.join(timeout=10)
    server.close()
    stop.close()
    done.close()
    listener.close()
    loop.destroy()
    return result[0] if result else None, seen


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def test_one_request_one_answer_then_closed(tmp_path):
    def client(path):
        with connect(path) as sock:
            sock.sendall(b"show info\nmore ignored\n")
            return sock.recv(100), sock.recv(100)
    (answer, after), seen = serve(tmp_path, client, seconds=0.5)
    assert (answer, after, seen) == (b"answer\n", b"", [b"show info"])


def test_a_silent_client_is_dropped_after_the_timeout(tmp_path):
    def client(path):
        with connect(path) as sock:
            started = time.monotonic()
            assert sock.recv(1) == b""
            return time.monotonic() - started
    waited, seen = serve(tmp_path, client, timeout=0.4)
    assert 0.35 <= waited <= 2.5 and seen == []


def test_an_overlong_request_is_answered_as_such(tmp_path):
    def client(path):
        with connect(path) as sock:
            try:
                sock.sendall(b"y" * (1 << 20))
            except OSError:
                pass
            return sock.recv(100)
    answer, seen = serve(tmp_path, client, seconds=1.0, max_request=1024)
    assert answer == b"too long\n" and seen == [None]


def test_a_client_that_never_reads_is_dropped(tmp_path):
    big = b"z" * (8 << 20)

    def client(path):
        with connect(path) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"give\n")
            time.sleep(1.0)  # never reads: the server must give up on us
            got = 0
            try:
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            return got, time.monotonic()
    started = time.monotonic()
    (got, ended), _ = serve(tmp_path, client, answer=big, timeout=0.4, seconds=4.0)
    assert got < len(big)
    assert ended < started + 4.0, "the end came from the teardown, not the server's timeout"


def test_clients_beyond_the_maximum_are_closed_at_once(tmp_path):
    def client(path):
        held = [connect(path) for _ in range(3)]
        time.sleep(0.2)
        with connect(path) as extra:
            started = time.monotonic()
            closed = extra.recv(1) == b""
            elapsed = time.monotonic() - started
        for sock in held:
            sock.close()
        return closed, elapsed
    (closed, elapsed), _ = serve(tmp_path, client, max_clients=3, seconds=3.0)
    assert closed and elapsed < 2.0  # "at once": long before the 10 s request timeout
