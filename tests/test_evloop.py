"""The libev adapter on its own: gevent calls this interface low-level and
free to change, so what the daemon relies on is checked here directly."""

import os
import signal
import socket

from tcp_intercept.evloop import EVENTS, READ, WRITE, Loop


def test_io_watcher_reports_which_events_fired():
    loop = Loop()
    a, b = socket.socketpair()
    seen = []
    watcher = loop.io(a.fileno(), READ | WRITE)

    def fired(events):
        seen.append(events)
        watcher.stop()

    watcher.start(fired, EVENTS)
    b.send(b"x")
    loop.run()
    assert seen == [READ | WRITE]
    # events can change only while stopped, which is how connections re-arm
    watcher.events = READ
    assert watcher.events & (READ | WRITE) == READ
    watcher.close()
    a.close()
    b.close()
    loop.destroy()


def test_timer_and_signal_watchers_and_stop():
    loop = Loop()
    order = []
    timer = loop.timer(0.01)
    timer.start(lambda: (order.append("timer"), os.kill(os.getpid(), signal.SIGUSR1)))
    sig = loop.signal(signal.SIGUSR1)
    sig.start(lambda signum: (order.append(signum), loop.stop()), signal.SIGUSR1)
    loop.run()
    assert order == ["timer", signal.SIGUSR1]
    for watcher in (timer, sig):
        watcher.stop()
        watcher.close()
    loop.destroy()


def test_exception_in_a_callback_reaches_on_error_and_the_loop_goes_on():
    errors = []
    loop = Loop(on_error=lambda context, err: errors.append(err))
    first = loop.timer(0.0)
    second = loop.timer(0.02)

    def boom():
        raise ValueError("one connection's bug")

    first.start(boom)
    second.start(loop.stop)
    loop.run()
    assert [str(e) for e in errors] == ["one connection's bug"]
    assert not second.active
    first.close()
    second.close()
    loop.destroy()


def test_a_repeating_timer_stopped_and_started_again_waits_its_interval():
    loop = Loop()
    times = []
    timer = loop.timer(0.05, 0.05)
    restart = loop.timer(0.03, 0.03)

    def fired():
        times.append(loop.now())
        timer.stop()
        if len(times) == 1:
            restart.start(lambda: (restart.stop(), timer.start(fired)))
        else:
            loop.stop()

    start = loop.now()
    timer.start(fired)
    loop.run()
    assert times[0] - start >= 0.045
    assert times[1] - times[0] >= 0.075  # 0.03 until the restart, then 0.05
    for watcher in (timer, restart):
        watcher.close()
    loop.destroy()


def test_a_parked_watcher_serves_the_next_descriptor_even_with_the_same_number():
    """Connections park their io watchers and borrow them again for new
    sockets: often the same descriptor number, a new socket behind it."""
    loop = Loop()
    a, b = socket.socketpair()
    watcher = loop.borrow_io(a.fileno(), READ)
    watcher.start(lambda: None)
    loop.park(watcher)
    number = a.fileno()
    a.close()
    b.close()
    c, d = socket.socketpair()
    if c.fileno() != number:  # make the new socket take the old number
        os.dup2(c.fileno(), number)
        c.close()
        c = socket.socket(fileno=number)
    again = loop.borrow_io(number, READ)
    assert again is watcher, "the parked watcher was not reused"
    seen = []

    def fired(events):
        seen.append(events)
        again.stop()

    again.start(fired, EVENTS)
    d.send(b"x")
    loop.run()
    assert seen == [READ]
    loop.park(again)
    c.close()
    d.close()
    loop.destroy()
