"""Progress reporting and cooperative cancellation shared by every engine job.

A job takes ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``. It calls
``progress(ProgressEvent(...))`` after every step and checks ``cancel.cancelled`` at least once
per step; on cancellation it leaves its outputs valid (e.g. writes a checkpoint) and raises
`JobCancelled`.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class ProgressEvent:
    """One progress report. Times in seconds; ``total`` may be None when unknown."""

    job: str
    step: int
    total: int | None = None
    loss: float | None = None
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.step / self.total)


ProgressCallback = Callable[[ProgressEvent], None]


class JobCancelled(RuntimeError):
    """Raised by a job that stopped because its CancelToken was set.

    ``result`` is the job's partial result when it has one: training jobs attach their result
    object (``cancelled=True``, with the checkpoint and package paths they wrote before raising),
    batch attaches its report so far; None otherwise.
    """

    result: object | None = None


class CancelToken:
    """Thread-safe cancel flag; optionally also set by the existence of a file.

    The file form lets another process (a widget that runs the job in a child process, or a
    cluster script) ask for a clean stop: ``CancelToken(stop_file=path)``.
    """

    def __init__(self, stop_file: str | os.PathLike | None = None) -> None:
        self._event = threading.Event()
        self.stop_file = Path(stop_file) if stop_file is not None else None

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self.stop_file is not None and self.stop_file.exists():
            self._event.set()
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelled("job cancelled")
