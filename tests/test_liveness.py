"""liveness.py on its own: the ping's bookkeeping, and the heartbeat's
datagrams (to a socket of ours on loopback) and watchdog messages."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import pytest

from tcp_intercept import liveness
from tcp_intercept.liveness import HUNG_AFTER, PING_EVERY, Heartbeat, Pinger



@dataclass(eq=False)
class FakeWorker:
    name: str
    pinged: float | None = None
    sent: list = field(default_factory=list)

    @property
    def channel(self):
        return self

    def send(self, *lines: str) -> None:
        self.sent.extend(lines)


def test_a_worker_that_answers_is_pinged_once_per_answer_and_never_hung():
    hung = []
    pinger, worker = Pinger(lambda w, silent: hung.append(w)), FakeWorker("a")
    for now in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5):
        assert pinger.tick([worker], now)
        Pinger.pong(worker)
    assert worker.sent == ["ping"] * 7 and hung == []


def test_a_silent_worker_is_hung_after_a_second_and_the_others_are_not():
    hung = []
    pinger = Pinger(lambda w, silent: hung.append((w.name, silent)))
    quiet, chatty = FakeWorker("quiet"), FakeWorker("chatty")
    results, now = [], 0.0
    while now <= 1.5:
        results.append(pinger.tick([quiet, chatty], now))
        Pinger.pong(chatty)
        now += PING_EVERY
    assert quiet.sent == ["ping"], "a ping outstanding is not sent again"
    assert [name for name, _ in hung] == ["quiet"] * len([r for r in results if not r])
    assert hung[0][1] > HUNG_AFTER
    # Healthy until the quiet one's ping is over HUNG_AFTER old.
    assert results[:5] == [True] * 5 and not results[-1]


def test_a_master_that_did_not_run_does_not_blame_its_workers():
    hung = []
    pinger, worker = Pinger(lambda w, silent: hung.append(w)), FakeWorker("a")
    assert pinger.tick([worker], 0.0)
    # The master was stopped for 30 s; the worker's pong waits unread.
    assert pinger.tick([worker], 30.0)
    assert hung == []
    Pinger.pong(worker)
    assert pinger.tick([worker], 30.25)
    assert hung == []


def test_heartbeat_sends_to_loopback_on_the_port_and_not_when_told_not_to(tmp_path,
                                                                          monkeypatch):
    recent = tmp_path / "tcp_intercept"
    recent.touch()  # as if tproxy.sh's iptables rules were installed
    monkeypatch.setattr(liveness, "RECENT_LIST", str(recent))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(2)
        heartbeat = Heartbeat(sink.getsockname()[1])
        try:
            heartbeat.beat(firewall=False)
            heartbeat.beat()
            data, sender = sink.recvfrom(16)
            assert data == b"" and sender[0] == "127.0.0.1"
            sink.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sink.recvfrom(16)  # the one with firewall=False sent nothing
            recent.unlink()  # no iptables rules (nft, or none): nothing goes out
            heartbeat.beat()
            with pytest.raises(TimeoutError):
                sink.recvfrom(16)
        finally:
            heartbeat.close()


def test_heartbeat_pets_systemds_watchdog_when_the_unit_has_one(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        quiet = Heartbeat(9)
        quiet.beat(firewall=False)
        quiet.close()
        monkeypatch.setenv("WATCHDOG_USEC", "10000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        watched = Heartbeat(9)
        watched.beat(firewall=False)  # systemd's watchdog is not the firewall's business
        watched.close()
        assert systemd.recv(64) == b"WATCHDOG=1"
        systemd.settimeout(0.2)
        with pytest.raises(TimeoutError):
            systemd.recv(64)
