"""Measure the CPU load of other processes while a benchmark runs (Linux ``/proc/stat``).

Shared by ``native_speed.py`` and ``compare_builds.py``; it imports nothing from erllama.
"""

from __future__ import annotations

import os
import time


def cpu_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """CPU cores used by other processes (and steal) while a block runs.

    ggml's threads spin, so another process taking a core stalls every barrier of a
    decode: a repetition that ran beside such load is not comparable, and this says so.
    """

    def __enter__(self):
        self.wall0, self.busy0, self.own0 = time.perf_counter(), cpu_busy_s(), self._own()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall0
        busy = cpu_busy_s()
        self.other = None if busy is None or self.busy0 is None else \
            max(0.0, (busy - self.busy0 - (self._own() - self.own0)) / wall)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system
