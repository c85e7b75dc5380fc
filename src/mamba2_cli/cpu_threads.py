"""How many threads torch uses on CPU when the user names none (`--threads`).

torch's default, one thread per core, is the slow choice wherever another process keeps a
core busy: every parallel region waits for the thread that shares a core (a 2-core machine
with one core busy: tiny-code decoded at 8-19 tok/s with the default, 127-177 with one
thread). So each forward takes as many threads as there are cores the other processes left
free lately (measured from /proc/stat, this process's own CPU time taken out), and the decode
step of a small model one thread: its parallel regions are too short to pay for the
synchronisation even on idle cores. Switching costs well under a microsecond.
"""

from __future__ import annotations

import os
import time

import torch

# Decode of a model whose weights are smaller than this runs on one thread: a token's
# matvecs then take a few milliseconds in all, the scale of a few hundred barriers.
SMALL_DECODE_BYTES = 64 << 20
# How often the free cores are measured again (seconds).
RESAMPLE_S = 0.5


def _cpu_busy_s() -> float | None:
    """Seconds all CPUs spent not idle since boot (/proc/stat's first line), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        return os.cpu_count() or 1


def free_cores_now(cores: int) -> int:
    """Cores free of other runnable tasks at this instant (/proc/loadavg's running count,
    this thread taken out), at least one."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return cores
    return max(1, min(cores, cores - (running - 1)))


class ThreadPolicy:
    """Threads for each forward of one model on CPU: see the module's note."""

    def __init__(self, weight_bytes: int, cores: int | None = None):
        self.cores = cores or _usable_cores()
        self.small = weight_bytes < SMALL_DECODE_BYTES
        self.free = free_cores_now(self.cores)  # until a /proc/stat interval is long enough
        self._last = (time.monotonic(), _cpu_busy_s(), _own_cpu_s())

    def free_cores(self) -> int:
        """Cores the other processes left free since the last measurement (at least one)."""
        now = time.monotonic()
        t0, busy0, own0 = self._last
        if now - t0 >= RESAMPLE_S:
            busy = _cpu_busy_s()
            if busy is not None and busy0 is not None:
                others = (busy - busy0) - (_own_cpu_s() - own0)
                self.free = max(1, min(self.cores, round(self.cores - others / (now - t0))))
            self._last = (now, busy, _own_cpu_s())
        return self.free

    def threads(self, tokens: int) -> int:
        """Threads for a forward over `tokens` positions per sequence (1: a decode step)."""
        if tokens == 1 and self.small:
            return 1
        return self.free_cores()

    def apply(self, tokens: int) -> None:
        n = self.threads(tokens)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def auto_threads(model) -> ThreadPolicy | None:
    """The policy for a model on CPU, None on other devices."""
    if model.device.type != "cpu":
        return None
    # Quantized weights are buffers, not parameters.
    return ThreadPolicy(sum(t.nbytes for t in (*model.parameters(), *model.buffers())))
