"""The pipe pool on its own: lending, returning, reclaiming, bounding, trimming."""

import os

from tcp_intercept.pipes import PipePool


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Borrower:
    """Holds at most one pipe and says whether it used it (as a relay does)."""

    def __init__(self, pool: PipePool):
        self.pool = pool
        self.pipe = pool.take(self)
        self.busy = False

    def reclaim(self, idle_only: bool = True) -> None:
        if self.busy and idle_only:
            self.busy = False
        else:
            self.give()

    def give(self) -> None:
        if self.pipe is not None:
            self.pool.give(self, self.pipe)
            self.pipe = None


def test_a_returned_pipe_is_lent_again_and_a_dirty_one_is_closed():
    pool = PipePool(max_free=4, size=65536)
    first = pool.take("a")
    pool.give("a", first)
    assert pool.take("b") == first
    before = open_fds()
    pool.give("b", first, empty=False)
    assert open_fds() == before - 2 and len(pool) == 0 and not pool.lent
    pool.close()


def test_the_pool_keeps_at_most_max_free():
    pool = PipePool(max_free=2, size=65536)
    base = open_fds()
    pipes = [pool.take(n) for n in range(5)]
    for n, pipe in enumerate(pipes):
        pool.give(n, pipe)
    assert len(pool) == 2 and open_fds() == base + 4
    pool.close()
    assert open_fds() == base


def test_trim_closes_only_pipes_nobody_needed_since_the_last_trim():
    pool = PipePool(max_free=8, size=65536)
    base = open_fds()
    pipes = [pool.take(n) for n in range(4)]
    for n, pipe in enumerate(pipes):
        pool.give(n, pipe)
    pool.trim()            # the 4 were all in use during this interval
    assert len(pool) == 4
    pool.give(0, pool.take(0))  # one is used again; three stay idle and go
    pool.trim()
    assert len(pool) == 1
    pool.trim()            # nothing used at all since: all go
    assert len(pool) == 0 and open_fds() == base


def test_reclaim_takes_back_only_pipes_left_unused_for_a_whole_interval():
    pool = PipePool(max_free=8, size=65536)
    base = open_fds()
    busy, idle = Borrower(pool), Borrower(pool)
    busy.busy = True
    pool.reclaim()
    assert busy.pipe is not None and idle.pipe is None and pool.lent == {busy}
    pool.reclaim()         # busy moved nothing since: its pipe goes too
    assert busy.pipe is None and not pool.lent and len(pool) == 2
    pool.trim()            # nobody took them again
    pool.trim()
    assert len(pool) == 0 and open_fds() == base


def test_shed_takes_back_even_busy_pipes_and_closes_every_free_one():
    pool = PipePool(max_free=8, size=65536)
    base = open_fds()
    borrowers = [Borrower(pool) for _ in range(3)]
    borrowers[0].busy = True
    pool.give("x", pool.take("x"))
    pool.shed()
    assert all(b.pipe is None for b in borrowers) and not pool.lent
    assert len(pool) == 0 and open_fds() == base
