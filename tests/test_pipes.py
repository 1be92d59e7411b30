"""The pipe pool on its own: lending, returning, bounding, trimming."""

import os

from tcp_intercept.pipes import PipePool


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_returned_pipe_is_lent_again_and_a_dirty_one_is_closed():
    pool = PipePool(max_free=4, size=65536)
    first = pool.take()
    pool.give(first)
    assert pool.take() == first
    before = open_fds()
    pool.give(first, empty=False)
    assert open_fds() == before - 2 and len(pool) == 0
    pool.close()


def test_the_pool_keeps_at_most_max_free():
    pool = PipePool(max_free=2, size=65536)
    base = open_fds()
    pipes = [pool.take() for _ in range(5)]
    for pipe in pipes:
        pool.give(pipe)
    assert len(pool) == 2 and open_fds() == base + 4
    pool.close()
    assert open_fds() == base


def test_trim_closes_only_pipes_nobody_needed_since_the_last_trim():
    pool = PipePool(max_free=8, size=65536)
    base = open_fds()
    pipes = [pool.take() for _ in range(4)]
    for pipe in pipes:
        pool.give(pipe)
    pool.trim()            # the 4 were all in use during this interval
    assert len(pool) == 4
    pool.give(pool.take())  # one is used again; three stay idle and go
    pool.trim()
    assert len(pool) == 1
    pool.trim()            # nothing used at all since: all go
    assert len(pool) == 0 and open_fds() == base
