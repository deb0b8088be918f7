"""Share the CPU cores between concurrent jobs: size PyTorch's intra-op thread pool to this job's share.

PyTorch starts one intra-op thread per core. Two such jobs on the same cores (two ``affmae``
runs, a fine-tune next to a segmentation in one napari, or any other busy program) ask for twice
the cores there are, and OpenMP's threads then wait on each other at every parallel region: on
a 2-core machine each job ran about 9 times slower than alone, where sharing fairly costs 2 times.

A `CpuShare` held around a job fixes that without any setting:

* it counts the jobs of this process that hold a share (each gets an equal part), and
* it measures how many cores everything else on the machine keeps busy (from ``/proc/stat``
  minus this process's own CPU time, smoothed over the last few seconds), and
* before each step (`rebalance`, throttled to once per ``interval_s``) it sets the *calling
  thread's* torch thread count to ``floor((free cores) / (jobs in this process) + 0.25)``, at
  least 1 and at most the cores this process may run on.

So a job alone uses every core; two jobs settle on half each within a step or two; when one ends
the other takes the cores back. An explicit ``threads`` is kept as given (no adapting). Outside
Linux (no ``/proc/stat``) only the jobs of this process are counted.

Thread counts in PyTorch are per thread: a share must be rebalanced from the thread that runs the
job (`wrap` does this on every progress event, which the engine emits from that thread).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)
HEADROOM = 0.25  # a core counts as free for us when less than 0.75 of it is busy elsewhere
SMOOTHING = 0.5  # weight of the newest load sample in the running estimate

_lock = threading.Lock()
_active: set[int] = set()  # ids of the shares held in this process


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy since boot (None outside Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class CpuShare:
    """Holds this job's share of the CPU while entered (see the module docstring).

    ``threads``: a fixed torch thread count (None = adapt to the free cores); ``interval_s``: the
    least time between two load measurements.
    """

    def __init__(self, threads: int | None = None, interval_s: float = 1.0) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 (or None to share the free cores); got {threads}")
        self.fixed = threads
        self.interval_s = interval_s
        self.cores = available_cores()
        self.other_load = 0.0  # cores kept busy by other processes (smoothed)
        self.threads = threads or self.cores
        self._sample: tuple[float, float, float | None] | None = None  # wall, own cpu, system busy
        self._restore: int | None = None

    # ------------------------------------------------------------------------------------------ holding

    def __enter__(self) -> "CpuShare":
        with _lock:
            _active.add(id(self))
        self._restore = torch.get_num_threads()
        self._sample = (time.monotonic(), _own_cpu_seconds(), _system_busy_seconds())
        self.rebalance(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _active.discard(id(self))
        if self._restore is not None:
            torch.set_num_threads(self._restore)

    def wrap(self, progress: Callable | None) -> Callable:
        """A progress callback that rebalances (in the job's thread) and then calls ``progress``."""
        def report(event: object) -> None:
            self.rebalance()
            if progress is not None:
                progress(event)
        return report

    # ------------------------------------------------------------------------------------------ sizing

    def measure(self) -> float | None:
        """Update and return the smoothed number of cores busy outside this process (None when it cannot
        be measured here, or less than ``interval_s`` has passed since the last sample)."""
        if self._sample is None:
            return None
        wall0, own0, busy0 = self._sample
        wall = time.monotonic()
        if wall - wall0 < self.interval_s:
            return None
        own, busy = _own_cpu_seconds(), _system_busy_seconds()
        self._sample = (wall, own, busy)
        if busy is None or busy0 is None:
            return None
        other = max(0.0, (busy - busy0) - (own - own0)) / (wall - wall0)  # cores
        self.other_load = SMOOTHING * min(other, self.cores) + (1 - SMOOTHING) * self.other_load
        return self.other_load

    def target_threads(self) -> int:
        """The thread count this share should use now: its part of the cores not busy elsewhere."""
        if self.fixed is not None:
            return self.fixed
        with _lock:
            jobs = max(1, len(_active))
        free = max(0.0, self.cores - self.other_load)
        return max(1, min(self.cores, math.floor(free / jobs + HEADROOM)))

    def rebalance(self, force: bool = False) -> int:
        """Measure the load (at most once per ``interval_s``) and set the calling thread's torch thread
        count to `target_threads`; returns the count in use."""
        measured = self.measure()
        if measured is None and not force:
            return self.threads
        target = self.target_threads()
        if force or target != torch.get_num_threads():
            if target != self.threads:
                log.info("CPU share: %d torch thread(s) (%d cores, %.1f busy elsewhere, %d job(s) here)",
                         target, self.cores, self.other_load, len(_active))
            torch.set_num_threads(target)
        self.threads = target
        return target


__all__ = ["CpuShare", "available_cores"]
