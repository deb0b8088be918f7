"""State shared by the AFFMAE dock widgets of one viewer: the latest model packages and the running job.

The Pretrain widget stores the package it made; the Fine-tune widget starts from it and stores its
segmentation package; the Segment and Batch widgets use that one. One job runs at a time per viewer
(two trainings on one GPU or on a few CPU cores would only slow each other down).
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from psygnal import Signal


class _PackagePath:
    """A package-path attribute of `SharedState` (a Path or None) that emits its ``signal`` when set."""

    def __init__(self, signal: str) -> None:
        self.signal = signal

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, state: Any, owner: type | None = None) -> Any:
        return self if state is None else getattr(state, self.slot, None)

    def __set__(self, state: Any, path: str | Path | None) -> None:
        value = None if path is None else Path(path)
        setattr(state, self.slot, value)
        getattr(state, self.signal).emit(value)


class SharedState:
    """Latest packages and the name of the job that is running (None when idle)."""

    pretrained_changed = Signal(object)  # Path | None
    segmentation_changed = Signal(object)  # Path | None
    pretrained_package = _PackagePath("pretrained_changed")
    segmentation_package = _PackagePath("segmentation_changed")

    def __init__(self) -> None:
        self.running_job: str | None = None


_STATES: weakref.WeakKeyDictionary[Any, SharedState] = weakref.WeakKeyDictionary()


def shared_state(viewer: Any) -> SharedState:
    """The `SharedState` of ``viewer`` (created on first use, dropped with the viewer)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = SharedState()
    return state
