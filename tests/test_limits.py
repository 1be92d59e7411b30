"""limits.Limits on its own: shares, per-client counts, and connections
inherited from the worker an upgrade replaces."""

from tcp_intercept import counters
from tcp_intercept.limits import Limits, share


def board() -> memoryview:
    return memoryview(bytearray(8 * len(counters.FIELDS))).cast("Q")


def test_shares_add_up_to_the_total():
    for total in (1, 5, 6, 7, 1000):
        for workers in (1, 2, 3, 8):
            parts = [share(total, workers, n) for n in range(1, workers + 1)]
            assert sum(parts) == total and max(parts) - min(parts) <= 1


def test_inherited_connections_count_until_forgotten():
    ctr = board()
    limits = Limits(ctr, 3, 2)
    limits.inherit("10.0.0.1", 2)
    assert not limits.admit("10.0.0.1", 0.0)      # 2 held by the predecessor
    assert limits.admit("10.0.0.2", 0.0)
    assert limits.reached(1)                        # 1 here + 2 inherited
    limits.forget("10.0.0.1", 1)
    assert limits.room_again(1) and not limits.reached(1)
    assert limits.admit("10.0.0.1", 0.0)            # 1 inherited + 1 here
    assert not limits.admit("10.0.0.1", 0.0)
    limits.forget("10.0.0.1", 5)                    # more than inherited: the rest stays
    assert limits.inherited == 0 and limits.per_client == {"10.0.0.1": 1, "10.0.0.2": 1}
    assert ctr[counters.LIMITED_MAX_PER_CLIENT] == 2
    assert ctr[counters.LIMITED_MAX_CONNECTIONS] == 1
