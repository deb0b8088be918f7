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


class SharedState:
    """Latest packages and the name of the job that is running (None when idle)."""

    pretrained_changed = Signal(object)  # Path | None
    segmentation_changed = Signal(object)  # Path | None

    def __init__(self) -> None:
        self._pretrained: Path | None = None
        self._segmentation: Path | None = None
        self.running_job: str | None = None

    @property
    def pretrained_package(self) -> Path | None:
        return self._pretrained

    @pretrained_package.setter
    def pretrained_package(self, path: str | Path | None) -> None:
        self._pretrained = None if path is None else Path(path)
        self.pretrained_changed.emit(self._pretrained)

    @property
    def segmentation_package(self) -> Path | None:
        return self._segmentation

    @segmentation_package.setter
    def segmentation_package(self, path: str | Path | None) -> None:
        self._segmentation = None if path is None else Path(path)
        self.segmentation_changed.emit(self._segmentation)


_STATES: weakref.WeakKeyDictionary[Any, SharedState] = weakref.WeakKeyDictionary()


def shared_state(viewer: Any) -> SharedState:
    """The `SharedState` of ``viewer`` (created on first use, dropped with the viewer)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = SharedState()
    return state
