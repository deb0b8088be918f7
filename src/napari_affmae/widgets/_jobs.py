"""Run one engine job off the GUI thread, with progress events and cooperative cancellation.

Why a napari thread worker and not a child process: the job reads the layer's array directly
(numpy, dask or zarr; nothing is copied or written to disk first), the engine checks its
`CancelToken` before every training step and every batch of tiles, so Cancel takes effect within
one step, and PyTorch releases the GIL inside its kernels, so the viewer stays responsive (the
widget tests measure the longest event-loop stall during training). See docs/user-guide.md.

The job function runs in the worker thread and must not touch Qt or napari objects; its progress
callback only emits a Qt signal, which Qt delivers on the GUI thread (queued connection).
"""
from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from qtpy.QtCore import QObject, Signal

from ..engine import CancelToken, JobCancelled, ProgressEvent
from ..engine.cpu_share import CpuShare
from ._state import SharedState

log = logging.getLogger(__name__)

JobFunction = Callable[[Callable[[ProgressEvent], None], CancelToken], Any]
_gc_holders: set[int] = set()  # ids of the running jobs and live previews (see `hold_gc_freeze`)


def hold_gc_freeze(holder: int, on: bool) -> None:
    """While any AFFMAE job or live preview runs, the objects that existed when the first one started are left
    out of Python's cyclic garbage collection (`gc.freeze`). A full collection over napari's and PyTorch's
    objects took 0.3-0.5 s on 2 CPU cores; on the GUI thread it froze the viewer that long in the middle of a
    job (measured in the widget tests). When the last one ends they are unfrozen (moved back to the oldest
    generation), so nothing is kept alive for good. Reference counting frees memory as usual."""
    was_on = bool(_gc_holders)
    if on:
        _gc_holders.add(holder)
    else:
        _gc_holders.discard(holder)
    if _gc_holders and not was_on:
        gc.freeze()
    elif was_on and not _gc_holders:
        gc.unfreeze()


@dataclass
class JobOutcome:
    """How a job ended. ``result`` is the job's return value, or on cancel the partial result the
    engine attached to `JobCancelled` (None if it had none)."""

    name: str
    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    seconds: float = 0.0
    details: str = ""  # traceback text of an unexpected error

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled


def _run_job(name: str, work: JobFunction, emit: Callable[[ProgressEvent], None], token: CancelToken) -> JobOutcome:
    """Worker-thread body: never raises, so every ending arrives through ``returned``. The job holds a
    `CpuShare`, so a job next to another (in this viewer, another napari or any busy program) uses its
    share of the cores instead of all of them."""
    started = time.perf_counter()
    try:
        with CpuShare() as share:
            result = work(share.wrap(emit), token)
        return JobOutcome(name, result=result, seconds=time.perf_counter() - started)
    except JobCancelled as err:
        return JobOutcome(name, result=getattr(err, "result", None), cancelled=True, error=None,
                          seconds=time.perf_counter() - started, details=str(err))
    except Exception as err:  # noqa: BLE001 - every failure becomes a notification, never a crash
        log.warning("AFFMAE %s job failed", name, exc_info=True)
        return JobOutcome(name, error=err, seconds=time.perf_counter() - started, details=traceback.format_exc())


class JobRunner(QObject):
    """Starts jobs in a napari thread worker; one at a time per viewer (via `SharedState`).

    Signals (delivered on the GUI thread): ``progressed(ProgressEvent)``, ``started(str)``,
    ``finished(JobOutcome)``.
    """

    progressed = Signal(object)
    started = Signal(str)
    finished = Signal(object)

    def __init__(self, state: SharedState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.token: CancelToken | None = None
        self.worker: Any = None
        self.name: str | None = None
        self.cancel_requested_at: float | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, name: str, work: JobFunction) -> None:
        """Run ``work(progress, cancel)`` in a thread. Raises RuntimeError (with a message for the user)
        if this runner or another AFFMAE job of the same viewer is already running."""
        from napari.qt.threading import create_worker

        if self.running:
            raise RuntimeError(f"{self.name} is already running; wait for it to finish or press Cancel")
        if self.state.running_job is not None:
            raise RuntimeError(f"another AFFMAE job ({self.state.running_job}) is running; wait for it to finish "
                               "or cancel it first")
        token = CancelToken()
        self.token, self.name, self.cancel_requested_at = token, name, None
        self.state.running_job = name
        worker = create_worker(_run_job, name, work, self.progressed.emit, token, _start_thread=False)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)  # only if _run_job itself broke; napari also notifies
        self.worker = worker
        hold_gc_freeze(id(self), True)
        self.started.emit(name)
        worker.start()

    def cancel(self) -> None:
        """Ask the job to stop at its next step (training jobs then save a checkpoint and a package)."""
        if self.token is not None and not self.token.cancelled:
            self.cancel_requested_at = time.perf_counter()
            self.token.cancel()

    def _release(self) -> None:
        hold_gc_freeze(id(self), False)
        self.worker, self.token = None, None
        if self.state.running_job == self.name:
            self.state.running_job = None

    def _on_returned(self, outcome: JobOutcome) -> None:
        self._release()
        self.finished.emit(outcome)

    def _on_errored(self, err: BaseException) -> None:
        name = self.name or "job"
        self._release()
        self.finished.emit(JobOutcome(name, error=err))
