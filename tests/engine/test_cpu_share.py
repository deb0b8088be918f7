"""CpuShare: jobs size their torch thread pool to their share of the free cores."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from napari_affmae.engine.cpu_share import CpuShare, available_cores


def test_alone_a_job_uses_every_core_and_restores_the_count_after() -> None:
    before = torch.get_num_threads()
    share = CpuShare()
    assert share.target_threads() == available_cores()  # nothing measured busy elsewhere yet
    with share:
        assert torch.get_num_threads() == available_cores()
    assert torch.get_num_threads() == before


def test_jobs_of_one_process_split_the_cores() -> None:
    cores = available_cores()
    with CpuShare() as first, CpuShare() as second:
        assert first.target_threads() == second.target_threads() == max(1, int(cores / 2 + 0.25))
    with CpuShare() as alone:
        assert alone.target_threads() == cores  # the others have ended


def test_fixed_threads_are_kept_and_bad_counts_refused() -> None:
    with CpuShare(threads=1) as share, CpuShare():
        assert share.rebalance(force=True) == 1
        assert torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads must be >= 1"):
        CpuShare(threads=0)


def _settle(share: CpuShare, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
        share.rebalance()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load of other processes is read from /proc/stat")
def test_a_busy_process_next_to_the_job_takes_a_core_away() -> None:
    """A real busy subprocess (one core of pure-Python spinning) must show up as about one more core busy
    elsewhere, and the job must leave that core to it; when it ends, the job takes the core back."""
    cores = available_cores()
    with CpuShare(interval_s=0.3) as share:
        _settle(share, 2.5)
        baseline = share.other_load  # whatever else this machine runs
        if baseline > cores - 1.2:
            pytest.skip(f"{baseline:.1f} of {cores} cores are busy elsewhere: no free core to watch being taken")
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            _settle(share, 3.0)
            busy, threads_busy = share.other_load, share.threads
        finally:
            spin.kill()
            spin.wait()
        _settle(share, 3.0)
        assert busy - baseline >= 0.6, (baseline, busy)
        assert busy - share.other_load >= 0.5, (busy, share.other_load)
        if baseline < 0.2:  # an otherwise idle machine (CI): exact thread counts
            assert threads_busy == max(1, cores - 1)
            assert share.threads == cores


def test_wrap_rebalances_in_the_job_thread_and_forwards_events() -> None:
    events: list[object] = []
    counts: list[int] = []

    def job() -> None:
        with CpuShare(threads=1) as share:
            report = share.wrap(events.append)
            report("step 1")
            counts.append(torch.get_num_threads())

    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    assert events == ["step 1"] and counts == [1]
