#!/usr/bin/env python3
"""`python -m phxbroker ARGS...` with the time its garbage collections take measured.

    PHXBROKER_GC_REPORT=/tmp/gc.json python bench/serve_gc_timed.py serve --config bench.toml

A sampling profiler cannot see the collector (a sample taken while it runs shows the
Python line whose allocation started it), so this wrapper times every collection
with `gc.callbacks` (the thread's CPU time, start to stop) and, on SIGUSR1, writes the
totals so far to the file named by PHXBROKER_GC_REPORT as one JSON object:
`{"seq": n, "gc_cpu_s": ..., "collections": [gen0, gen1, gen2], "gc_cpu_s_by_gen": [...]}`
(`seq` counts the reports, so a reader can wait for the one it asked for). The
package runs as `python -m phxbroker` runs it, whatever its module layout.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import signal
import sys
import time

REPORT_ENV = "PHXBROKER_GC_REPORT"


class GcTimer:
    """Sums the CPU time of every collection, by generation."""

    def __init__(self) -> None:
        self.started = 0.0
        self.collections = [0, 0, 0]
        self.cpu_by_gen = [0.0, 0.0, 0.0]
        self.reports = 0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.thread_time()
        else:
            gen = info.get("generation", 2)
            self.collections[gen] += 1
            self.cpu_by_gen[gen] += time.thread_time() - self.started

    def write(self, path: str) -> None:
        self.reports += 1
        report = {
            "seq": self.reports,
            "gc_cpu_s": sum(self.cpu_by_gen),
            "collections": self.collections,
            "gc_cpu_s_by_gen": self.cpu_by_gen,
        }
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.replace(tmp, path)


def main() -> None:
    timer = GcTimer()
    gc.callbacks.append(timer)
    path = os.environ.get(REPORT_ENV)
    if path:
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: timer.write(path))
    # Nothing of bench/ should be importable by the server: drop this script's folder.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.argv = ["phxbroker", *sys.argv[1:]]
    runpy.run_module("phxbroker", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
