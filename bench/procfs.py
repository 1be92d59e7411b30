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
    """The CPU time of pid and its children so far (cpu_times(), summed)."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) seconds of pid and its children so far: its own, those
    of the children it reaped (cutime, cstime), and those of its live
    children (a master's workers)."""
    fields = _stat(pid)
    user = (int(fields[11]) + int(fields[13])) / TICK  # utime + cutime (stat(5): 14, 16)
    system = (int(fields[12]) + int(fields[14])) / TICK  # stime + cstime (15, 17)
    for child in children(pid):
        try:
            child_fields = _stat(child)
        except OSError:
            continue
        user += int(child_fields[11]) / TICK
        system += int(child_fields[12]) / TICK
    return user, system


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


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
