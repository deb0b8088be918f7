"""Peak memory of one call, above what was allocated before it.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the call (tensor memory of the caching allocator).
* CPU on Linux: the process's peak resident set size (``VmHWM`` in ``/proc/self/status``), reset
  before the call through ``/proc/self/clear_refs`` (Linux >= 4.0), minus the resident size before
  it; freed heap memory is first handed back to the OS (``gc.collect`` + glibc ``malloc_trim``) so
  pages cached from earlier calls do not hide the call's own allocations. Exact (the kernel keeps
  the high-water mark), no sampling. Counts everything the process touches: tensors, kernel
  workspaces, allocator overhead.
* CPU elsewhere: the resident set size sampled every millisecond by a thread (psutil), which can
  miss peaks shorter than the interval.

`tracemalloc` is no use here: torch allocates outside Python's allocator.

On CPU the peak resident size also counts the heap's fragmentation, which depends on what the process
ran before (glibc serves blocks below its dynamic mmap threshold, up to 32 MiB, from the heap; a heap
left full of holes by an earlier training step makes a later call touch fresh pages for blocks that
would otherwise be reused). `allocator_peak` gives the history-independent figure, the CPU analogue of
``torch.cuda.max_memory_allocated``: the highest total of bytes allocated through torch's allocator.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PeakMemory:
    """Peak bytes above the level before the call, and how they were measured."""

    bytes: int
    method: str


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc only; no-op elsewhere)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def hwm_reset_available() -> bool:
    """True when the kernel lets this process reset its peak-RSS mark (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def cpu_method() -> str:
    """Name of the CPU method this machine supports (for reports)."""
    if hwm_reset_available():
        return "peak RSS (VmHWM reset via /proc/self/clear_refs, after gc + malloc_trim)"
    return "RSS sampled every 1 ms by a thread (psutil)"


class _RssSampler:
    """Polls the resident set size in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.001) -> None:
        import psutil  # noqa: PLC0415  (fallback path only)

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure_peak(fn: Callable[[], T], device: torch.device) -> tuple[T, PeakMemory]:
    """Run ``fn()`` once and return its result with the peak memory it added on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        release_freed_memory()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return result, PeakMemory(max(0, peak), "torch.cuda.max_memory_allocated - memory_allocated before")
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on 'cpu' or 'cuda' devices; got {device.type!r}")
    release_freed_memory()
    if hwm_reset_available():
        _CLEAR_REFS.write_text("5")
        before = _status_bytes("VmRSS")
        result = fn()
        peak = _status_bytes("VmHWM") - before
        return result, PeakMemory(max(0, peak), cpu_method())
    with contextlib.ExitStack() as stack:
        sampler = stack.enter_context(_RssSampler())
        before = sampler.peak
        result = fn()
    return result, PeakMemory(max(0, sampler.peak - before), cpu_method())


def allocator_peak(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn()`` once under ``torch.profiler`` and return its result with the highest total of bytes live in
    torch's allocator on ``device`` (every tensor, also those an op frees before it returns; not the
    allocator's fragmentation). Slow (the profiler records every allocation with its stack); uses the
    profiler's memory timeline (``torch.profiler._memory_profiler``, a private API of torch 2.x)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        result = fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device(device))
    return result, max((sum(s) for s in sizes), default=0)
