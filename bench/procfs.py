"""What the bench reads about a process and the machine from /proc."""

from __future__ import annotations

import os
import platform
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The live child processes of pid (a master's workers)."""
    try:
        return [int(child) for child in
                Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """The CPU time of pid and its children so far: its own utime + stime,
    those of the children it reaped (cutime + cstime), and those of its live
    children (a master's workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields 14-17 of stat(5)
    own = sum(int(f) for f in fields[11:15]) / TICK
    return own + sum(_own_cpu(child) for child in children(pid))


def _own_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


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
    """RSS, PSS and descriptors of pid and its live children, summed."""
    pids = [pid, *children(pid)]
    return {"rss_kib": sum(status_kib(p, "VmRSS") for p in pids),
            "pss_kib": sum(pss_kib(p) for p in pids), "fds": sum(fd_count(p) for p in pids)}


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
