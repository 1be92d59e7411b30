"""tcp-intercept-ctl top: a full-screen view of the daemon, refreshed every
second, like top or iftop. At the head the totals (connections, new ones a
second, bytes a second each way, workers), then the busiest connections
with both legs' RTT and retransmits and their throughput each way.

Keys: b sort by throughput (the default), a by age, r by the slower leg's
RTT, t by retransmits; p or space pause (the screen stays, the daemon is
not asked); q quits.

It only asks the control socket (`show info`, `show conns full`), twice a
second's worth of work for the daemon's master and the workers' listing
(in slices: relaying goes on). Throughput is the difference of the bytes
relayed between two refreshes.

Built on curses, not rich: curses is in Python's standard library (nothing
more to install or package), reads keys with a timeout and reports a
resized terminal, which is all a live view needs; rich draws tables well
but reads no keys, so it would need a termios loop of our own beside it.
"""

from __future__ import annotations

import curses
import os
import time
from dataclasses import dataclass, field

from collections.abc import Callable

REFRESH = 1.0
MIN_COLUMNS, MIN_LINES = 100, 8
SORTS = {"b": "throughput", "a": "age", "r": "rtt", "t": "retransmits"}
HEADER = (f"{'ID':<12} {'CLIENT':<22} {'DESTINATION':<22} {'AGE_S':>7} {'C>S/s':>9} "
          f"{'S>C/s':>9} {'C_RTT_MS':>9} {'S_RTT_MS':>9} {'C_RETR':>6} {'S_RETR':>6}  STATE")


@dataclass
class Sample:
    """One reading of the daemon: show info's numbers, show conns full's rows."""
    when: float
    info: dict[str, str]
    conns: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> row


# ctl's: ask(path, command, timeout) -> the answer's bytes (OSError when none),
# and why(OSError) -> what to tell the operator.
Ask = Callable[..., bytes]


def read(ask: Ask, path: str) -> Sample:
    """A sample now; OSError when the daemon does not answer."""
    info_text = ask(path, "show info", timeout=3).decode()
    info = dict(line.split(": ", 1) for line in info_text.splitlines() if ": " in line)
    header, *rows = ask(path, "show conns full", timeout=3).decode().splitlines()
    columns = header.split()[1:]
    conns = {}
    for row in rows:
        if not row.startswith("#"):
            cells = dict(zip(columns, row.split(), strict=False))
            conns[cells["id"]] = cells
    return Sample(time.monotonic(), info, conns)


def _rate(now: Sample, before: Sample | None, key: str, row: dict | None = None) -> float:
    if before is None:
        return 0.0
    seconds = max(now.when - before.when, 1e-3)
    if row is None:
        return max(int(now.info.get(key, 0)) - int(before.info.get(key, 0)), 0) / seconds
    old = before.conns.get(row["id"])
    return max(int(row[key]) - int(old[key]), 0) / seconds if old else 0.0


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def rows(now: Sample, before: Sample | None, sort: str) -> list[dict]:
    """The connections with their throughput, sorted as asked (biggest first)."""
    found = []
    for row in now.conns.values():
        c2s, s2c = _rate(now, before, "bytes_c2s", row), _rate(now, before, "bytes_s2c", row)
        found.append({**row, "c2s_rate": c2s, "s2c_rate": s2c})
    key = {"throughput": lambda r: r["c2s_rate"] + r["s2c_rate"],
           "age": lambda r: _number(r["age_s"]),
           "rtt": lambda r: max(_number(r["c_rtt_ms"]), _number(r["s_rtt_ms"])),
           "retransmits": lambda r: _number(r["c_retrans"]) + _number(r["s_retrans"])}[sort]
    return sorted(found, key=key, reverse=True)


def human(rate: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if rate < 1000 or unit == "GB":
            return f"{rate:.0f}{unit}" if unit == "B" else f"{rate:.1f}{unit}"
        rate /= 1000
    return ""


def head(now: Sample, before: Sample | None, sort: str, paused: bool) -> list[str]:
    info = now.info
    return [f"tcp-intercept {info.get('Version', '?')}  pid {info.get('Pid', '?')}  "
            f"workers {info.get('Workers', '?')}  up {info.get('Uptime', '?')}"
            + ("   [PAUSED]" if paused else ""),
            f"connections {info.get('Connections_open', '?')}  "
            f"new/s {_rate(now, before, 'Connections_accepted'):.1f}  "
            f"C>S {human(_rate(now, before, 'Bytes_c2s'))}/s  "
            f"S>C {human(_rate(now, before, 'Bytes_s2c'))}/s  "
            f"sorted by {sort}",
            "keys: b throughput  a age  r rtt  t retransmits  p pause  q quit", ""]


def line(row: dict) -> str:
    return (f"{row['id']:<12} {row['client']:<22} {row['destination']:<22} "
            f"{_number(row['age_s']):>7.1f} {human(row['c2s_rate']):>9} "
            f"{human(row['s2c_rate']):>9} {row['c_rtt_ms']:>9} {row['s_rtt_ms']:>9} "
            f"{row['c_retrans']:>6} {row['s_retrans']:>6}  {row['state']}")


class Top:
    def __init__(self, screen, path: str, ask: Ask, why: Callable[[OSError], str]):
        self.screen = screen
        self.path = path
        self.ask = ask
        self.why = why
        self.sort = "throughput"
        self.paused = False
        self.before: Sample | None = None
        self.now: Sample | None = None
        self.error = ""

    def run(self) -> None:
        curses.curs_set(0)
        self.screen.timeout(100)
        due = 0.0
        while True:
            if not self.paused and time.monotonic() >= due:
                due = time.monotonic() + REFRESH
                self._refresh()
            self._draw()
            key = self.screen.getch()
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
            elif key in (ord("q"), ord("Q")):
                return
            elif key in (ord("p"), ord(" ")):
                self.paused = not self.paused
            elif key >= 0 and chr(key) in SORTS:
                self.sort = SORTS[chr(key)]

    def _refresh(self) -> None:
        try:
            sample = read(self.ask, self.path)
        except (OSError, ValueError) as err:
            self.error = (f"The daemon is gone: {self.path}: "
                          f"{self.why(err) if isinstance(err, OSError) else err}")
            self.before = self.now = None
            return
        self.error = ""
        self.before, self.now = self.now, sample

    def _draw(self) -> None:
        screen = self.screen
        screen.erase()
        height, width = screen.getmaxyx()
        if width < MIN_COLUMNS or height < MIN_LINES:
            text = [f"Terminal too small: {width}x{height};",
                    f"top needs {MIN_COLUMNS}x{MIN_LINES}. q quits."]
        elif self.error:
            text = [self.error, "Trying again every second; q quits."]
        elif self.now is None:
            text = ["Asking the daemon..."]
        else:
            listed = rows(self.now, self.before, self.sort)
            text = head(self.now, self.before, self.sort, self.paused) + [HEADER]
            text += [line(row) for row in listed[:height - len(text) - 1]]
        for y, content in enumerate(text[:height]):
            screen.addnstr(y, 0, content, width - 1)
        screen.refresh()


def main(path: str, ask: Ask, why: Callable[[OSError], str]) -> None:
    # curses believes LINES and COLUMNS over the terminal itself: values left
    # in the environment by whatever started us would fix the size for good.
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
    curses.wrapper(lambda screen: Top(screen, path, ask, why).run())
