"""How much of our cores other processes take, and the thread count that suits what is left.

Why: every kernel splits its work over a team of OpenMP threads that meet at a barrier when it
ends. With a CPU-bound neighbour the OS deschedules one team thread for a timeslice (milliseconds)
at a time, and each of a decode step's hundreds of parallel regions waits for it: on a 2-core
machine with one busy neighbour, two threads served 4-7x slower than one. So between steps the
CPU backend measures the CPU time others spend on the cores it may use (/proc/stat's busy time
on them, less this process's own) and runs one thread per core they leave it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PROC_STAT = "/proc/stat"
# Other processes' average use of a core from which it counts as taken: a neighbour that runs
# 40% of the time already deschedules our thread on that core mid-step often enough to hurt.
TAKEN_FROM = 0.4


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall: float  # time.monotonic()
    busy: float  # CPU seconds spent on our CPUs by anyone since boot
    ours: float  # CPU seconds this process has spent


def busy_seconds(cpus: Iterable[int], path: str = PROC_STAT) -> float | None:
    """CPU seconds since boot that these CPUs spent not idle (steal included), or None without /proc/stat."""
    wanted = {f"cpu{c}" for c in cpus}
    ticks = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name in wanted:
                    # user nice system idle iowait irq softirq steal (guest time is inside user)
                    values = [int(v) for v in rest.split()[:8]]
                    ticks += sum(values) - values[3] - values[4]
    except (OSError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (0 where /proc cannot say)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return 0.0


def sample(cpus: Iterable[int], path: str = PROC_STAT) -> CpuSample | None:
    """Now: busy time on our CPUs, and the CPU time of this process and the one that started it
    (the API server, when the engine serves: its work is the engine's own, not a neighbour's)."""
    busy = busy_seconds(cpus, path)
    if busy is None:
        return None
    own = os.times()
    return CpuSample(time.monotonic(), busy, own.user + own.system + process_cpu_seconds(os.getppid()))


def others_cores(before: CpuSample, after: CpuSample) -> float:
    """Cores' worth of CPU that other processes used on our CPUs between two samples."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.ours - before.ours)) / wall)


def threads_for(cores: int, others: float) -> int:
    """One thread per core the other processes leave us, at least one."""
    taken = math.floor(others + (1.0 - TAKEN_FROM))
    return max(1, min(cores, cores - taken))


class AdaptiveThreads:
    """Between steps, ``update()`` re-measures at most every ``interval_s`` and returns the new
    thread count when it should change (else None). Other processes' use is smoothed over two
    windows, so one burst does not flip the count back and forth."""

    def __init__(
        self,
        cpus: Iterable[int],
        cores: int,
        interval_s: float = 0.5,
        read: Callable[[], CpuSample | None] | None = None,
    ) -> None:
        self.cpus = sorted(cpus)
        self.cores = cores
        self.interval_s = interval_s
        self._read = read or (lambda: sample(self.cpus))
        self.threads = cores
        self.others: float | None = None  # smoothed cores' worth, once measured
        self._last = self._read()

    @property
    def available(self) -> bool:
        return self._last is not None

    def update(self) -> int | None:
        last = self._last
        if last is None or time.monotonic() - last.wall < self.interval_s:
            return None
        now = self._read()
        if now is None:
            return None
        self._last = now
        measured = others_cores(last, now)
        self.others = measured if self.others is None else (self.others + measured) / 2
        threads = threads_for(self.cores, self.others)
        if threads == self.threads:
            return None
        logger.log(
            logging.WARNING if threads < self.threads else logging.INFO,
            "cpu: other processes use %.1f of the %d cores this engine runs on: %d thread%s instead of %d "
            "(set PAGEDLLM_CPU_THREADS to fix the count)",
            self.others,
            self.cores,
            threads,
            "" if threads == 1 else "s",
            self.threads,
        )
        self.threads = threads
        return threads

    def describe(self) -> str:
        if self.others is None:
            return f"threads adapt to other processes' use of the {self.cores} cores (not measured yet)"
        return (
            f"other processes used {self.others:.1f} of {self.cores} cores at the last step: "
            f"{self.threads} thread{'' if self.threads == 1 else 's'} (adapts; PAGEDLLM_CPU_THREADS fixes it)"
        )


def load_note(cores: int) -> str | None:
    """A warning when the 1-minute load average says the cores are oversubscribed, else None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    if load <= cores:
        return None
    return (
        f"cores oversubscribed: load average {load:.1f} over the {cores} cores this process may use "
        "(other processes compete for them)"
    )
