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


def cpu_times() -> dict[str, tuple[float, float]]:
    """Per "cpu" (all cores) and "cpuN": seconds busy (anything but idle and iowait) and,
    within that, seconds the hypervisor gave the core's turn to another guest (steal)."""
    times = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if not line.startswith(b"cpu"):
                break
            name, *fields = line.split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            busy = (user + nice + system + irq + softirq + steal) / _TICK
            times[name.decode()] = (busy, steal / _TICK)
    return times


def only_cpu(pid: int) -> str | None:
    """The "cpuN" `pid` is pinned to, or None when it may run on several."""
    cpus = os.sched_getaffinity(pid)
    return f"cpu{next(iter(cpus))}" if len(cpus) == 1 else None


def own_cpu_seconds() -> float:
    """User plus system CPU time this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall time and CPU use between two points: own, the server's, everyone else's.

    When the server is pinned to one core, that core's busy time is kept too: it
    includes the softirq work of its sends, which utime+stime leave out, and the
    time the hypervisor ran another guest on it (steal), which is also kept apart.
    """

    def __init__(self, clock, server_pid: int | None, helper_pids: tuple[int, ...] = ()) -> None:
        self._clock = clock
        self._pid = server_pid
        self._helpers = helper_pids  # the generator's own helper processes, counted apart
        self._core = only_cpu(server_pid) if server_pid else None
        self.start()

    def start(self) -> None:
        self.t0 = self._clock()
        self.own0 = own_cpu_seconds()
        self.srv0 = process_cpu_seconds(self._pid) if self._pid else None
        self.helpers0 = sum(process_cpu_seconds(pid) for pid in self._helpers)
        self.box0 = cpu_times()

    def stop(self) -> dict[str, float | None]:
        """Return wall seconds, own and server CPU, and what the rest of the box used."""
        wall = self._clock() - self.t0
        own = own_cpu_seconds() - self.own0
        srv = process_cpu_seconds(self._pid) - self.srv0 if self._pid else None
        helpers = sum(process_cpu_seconds(pid) for pid in self._helpers) - self.helpers0
        box1 = cpu_times()
        others = box1["cpu"][0] - self.box0["cpu"][0] - own - (srv or 0.0) - helpers
        core = steal = None
        if self._core:
            core = box1[self._core][0] - self.box0[self._core][0]
            steal = box1[self._core][1] - self.box0[self._core][1]
        return {
            "wall": wall,
            "gen_cpu_s": own,
            "server_cpu_s": srv,
            "others_cpu_s": others,
            "helpers_cpu_s": helpers,
            "server_core_busy_s": core,
            "server_core_steal_s": steal,
        }
