"""The common skeleton of the AFFMAE dock widgets: run button <-> Cancel, progress, notifications.

A subclass builds its form, implements `prepare` (check the inputs on the GUI thread and return
the job: a name and a function ``work(progress, cancel)`` for the worker thread) and `job_finished`
(show the result: layers, paths). Every problem reaches the user as a napari notification and
leaves the widget ready for the next try.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QFrame, QLabel, QScrollArea, QSpinBox, QVBoxLayout, QWidget

from ..engine import CancelToken, ProgressEvent
from ..engine.checkpoint import CHECKPOINT_NAME
from ._jobs import JobOutcome, JobRunner
from ._panels import ProgressPanel, RunButton
from ._preload import warm_up_once
from ._state import SharedState, shared_state

log = logging.getLogger(__name__)
Job = tuple[str, Callable[[Callable[[ProgressEvent], None], CancelToken], Any]]


def notify(kind: str, message: str) -> None:
    """Show a napari notification (``kind``: "info" | "warning" | "error")."""
    from napari.utils.notifications import show_error, show_info, show_warning

    {"info": show_info, "warning": show_warning, "error": show_error}[kind](message)


def available_devices() -> list[str]:
    """"auto" plus the torch devices present on this machine."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.insert(1, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.insert(1, "mps")
    return devices


def device_combo() -> QComboBox:
    combo = QComboBox()
    combo.addItems(available_devices())
    combo.setToolTip("auto: CUDA GPU, else Apple MPS, else CPU")
    return combo


def size_spin(value: int, *, minimum: int = 32, maximum: int = 4096, step: int = 8, tooltip: str = "") -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(minimum, maximum)
    spin.setSingleStep(step)
    spin.setValue(value)
    spin.setSuffix(" px")
    spin.setToolTip(tooltip or "pixels; a multiple of 8")
    return spin


def int_spin(value: int, minimum: int, maximum: int, tooltip: str = "") -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(minimum, maximum)
    spin.setValue(value)
    spin.setToolTip(tooltip)
    return spin


def checked_multiple_of_8(spin: QSpinBox, what: str) -> int:
    value = int(spin.value())
    if value % 8:
        raise ValueError(f"{what} must be a multiple of 8 pixels; got {value} (try {value - value % 8 or 8})")
    return value


def run_directory(folder: Path | None, resume: bool) -> tuple[Path, bool]:
    """The output folder of a training run: with ``resume`` it must hold a checkpoint; without, a folder
    that already holds one is left alone and a fresh sibling (``name-2``, ``name-3``, ...) is used.
    Returns (folder, whether it differs from the one asked for)."""
    if folder is None:
        raise ValueError("choose an output folder for the model package and checkpoint")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the output location {folder} is a file; choose a folder")
    if resume:
        if not (folder / CHECKPOINT_NAME).is_file():
            raise ValueError(f"nothing to resume: {folder} holds no {CHECKPOINT_NAME}; untick Resume to start a "
                             "new run, or choose the folder of the run to continue")
        return folder, False
    if not (folder / CHECKPOINT_NAME).exists():
        return folder, False
    n = 2
    while (folder.with_name(f"{folder.name}-{n}") / CHECKPOINT_NAME).exists():
        n += 1
    return folder.with_name(f"{folder.name}-{n}"), True


class JobWidget(QWidget):
    """Base of the dock widgets: owns the run button, the progress panel and the job runner."""

    job_title = "job"  # e.g. "Pretraining"; used in messages
    button_label = "Run"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        warm_up_once()  # the first widget: Triton preload and a job's imports, on the GUI thread (see _preload)
        self.viewer = napari_viewer
        self.state: SharedState = shared_state(napari_viewer)
        self.runner = JobRunner(self.state)  # no Qt parent: it must outlive a closed widget's C++ side
        self.runner.started.connect(self._on_started)
        self.runner.progressed.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.button = RunButton(self.button_label)
        self.button.clicked.connect(self._on_button)
        self.progress = ProgressPanel()
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.last_outcome: JobOutcome | None = None
        token_holder = self.runner
        self.destroyed.connect(lambda *_: token_holder.cancel())  # closing the viewer stops the job
        # the form lives in a scroll area: on a small screen the dock scrolls instead of squeezing rows
        self.content = QWidget()
        self.main_layout = QVBoxLayout(self.content)
        self.main_layout.setContentsMargins(6, 6, 6, 6)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.scroll.setWidget(self.content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)

    # ------------------------------------------------------------------ for subclasses
    def prepare(self) -> Job:  # pragma: no cover - abstract
        raise NotImplementedError

    def job_finished(self, outcome: JobOutcome) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_progress(self, event: ProgressEvent) -> None:
        """Extra progress handling (e.g. the loss curve)."""

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        hint = self.content.sizeHint()
        return QSize(hint.width() + self.scroll.verticalScrollBar().sizeHint().width(), hint.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt API
        """As wide as the form needs (no horizontal clipping), as short as a few rows (it scrolls)."""
        width = self.content.minimumSizeHint().width() + self.scroll.verticalScrollBar().sizeHint().width()
        return QSize(width, 200)

    # ------------------------------------------------------------------ public
    @property
    def is_running(self) -> bool:
        return self.runner.running

    def start(self) -> bool:
        """Check the inputs and start the job; False (and a notification) if it cannot start."""
        if self.runner.running:
            notify("warning", f"{self.job_title} is already running; wait for it to finish or press Cancel")
            return False
        if self.state.running_job is not None:
            notify("warning", f"another AFFMAE job ({self.state.running_job}) is running; wait for it to finish "
                              "or cancel it first")
            return False
        try:
            name, work = self.prepare()
            self.runner.start(name, work)
        except (ValueError, RuntimeError, OSError, KeyError) as err:
            notify("error", f"{self.job_title}: {err}")
            return False
        return True

    def cancel(self) -> None:
        if self.runner.running:
            self.runner.cancel()
            self.button.setText("Cancelling…")
            self.button.setEnabled(False)
            self.progress.status.setText(f"{self.job_title}: stopping after the current step…")

    def form(self) -> QFormLayout:
        """A new form layout added to the widget."""
        layout = QFormLayout()
        layout.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
        self.main_layout.addLayout(layout)
        return layout

    # ------------------------------------------------------------------ slots
    def _on_button(self) -> None:
        if self.runner.running:
            self.cancel()
        else:
            self.start()

    def _on_started(self, name: str) -> None:
        self.button.set_running(True)
        self.progress.begin(name)

    def _on_progress(self, event: ProgressEvent) -> None:
        self.progress.update_event(event)
        self.on_progress(event)

    def _on_finished(self, outcome: JobOutcome) -> None:
        self.last_outcome = outcome
        self.button.set_running(False)
        if outcome.error is not None:
            message = f"{self.job_title} failed: {outcome.error}"
            self.progress.end(message, complete=False)
            notify("error", message)
        elif outcome.cancelled:
            self.progress.end(f"{outcome.name}: cancelled after {outcome.seconds:.1f} s", complete=False)
        else:
            self.progress.end(f"{outcome.name}: finished in {outcome.seconds:.1f} s", complete=True)
        try:
            self.job_finished(outcome)
        except Exception as err:  # noqa: BLE001 - showing the result must never take the widget down
            log.warning("showing the result of %s failed", outcome.name, exc_info=True)
            notify("error", f"{self.job_title}: could not show the result: {err}")
