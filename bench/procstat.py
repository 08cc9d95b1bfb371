"""CPU time and memory of the server under test (from /proc) and of this process."""

from __future__ import annotations

import os
import resource

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used so far (utime+stime of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses; the fields follow the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


def machine_busy_seconds() -> float:
    """CPU time all cores together have spent on anything but idle and iowait."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def own_cpu_seconds() -> float:
    """User plus system CPU time this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall time, own CPU and (when a pid is given) server CPU between two points."""

    def __init__(self, clock, server_pid: int | None) -> None:
        self._clock = clock
        self._pid = server_pid
        self.start()

    def start(self) -> None:
        self.t0 = self._clock()
        self.own0 = own_cpu_seconds()
        self.srv0 = process_cpu_seconds(self._pid) if self._pid else None
        self.box0 = machine_busy_seconds()

    def stop(self) -> dict[str, float | None]:
        """Return wall seconds, own and server CPU, and what the rest of the box used."""
        wall = self._clock() - self.t0
        own = own_cpu_seconds() - self.own0
        srv = process_cpu_seconds(self._pid) - self.srv0 if self._pid else None
        box = machine_busy_seconds() - self.box0
        others = box - own - (srv or 0.0)
        return {"wall": wall, "gen_cpu_s": own, "server_cpu_s": srv, "others_cpu_s": others}
