"""The connection table's pages: how a worker lists a long table in slices
while connections come and go between them."""

from tcp_intercept.table import ConnectionTable


def listed(table: ConnectionTable, size: int, between=lambda: None) -> list:
    start, stop, out = 0, table.newest(), []
    while start is not None:
        page, start = table.page(start, stop, size)
        out += page
        between()
    return out


def test_pages_list_every_connection_once_oldest_first():
    table = ConnectionTable()
    assert table.newest() == -1 and listed(table, 3) == []
    for name in "abcdefg":
        table.add(name)
    assert table.newest() == 6
    for size in (1, 2, 3, 7, 8):
        assert listed(table, size) == list("abcdefg")


def test_a_page_skips_what_closed_and_stops_at_what_was_newest_when_asked():
    table = ConnectionTable()
    keys = {name: table.add(name) for name in "abcdef"}
    events = iter([lambda: table.remove(keys["d"]), lambda: table.add("late"),
                   lambda: table.remove(keys["a"])])
    assert listed(table, 2, lambda: next(events, lambda: None)()) == list("abcef")
