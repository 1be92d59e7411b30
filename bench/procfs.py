"""What the bench reads about a process and the machine from /proc."""

from __future__ import annotations

import os
import platform
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def kib(path: str, key: str) -> int:
    """The number of a 'Key:   123 kB' line of a /proc file; KeyError if none."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} in {path}")


def status_kib(pid: int, key: str) -> int:
    """A line of /proc/PID/status (VmRSS, VmHWM, ...)."""
    return kib(f"/proc/{pid}/status", key)


def pss_kib(pid: int) -> int:
    return kib(f"/proc/{pid}/smaps_rollup", "Pss")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def memory(pid: int) -> dict:
    return {"rss_kib": status_kib(pid, "VmRSS"), "pss_kib": pss_kib(pid), "fds": fd_count(pid)}


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle (all CPUs, all namespaces)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICK


def machine() -> dict:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu_model": model,
            "python": platform.python_version(),
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
            "mem_total_kib": kib("/proc/meminfo", "MemTotal")}
