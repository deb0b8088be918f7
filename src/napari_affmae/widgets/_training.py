"""What the Pretrain and Fine-tune widgets share: image picker, training options, output folder with
Resume, the live loss curve and the cancel/resume messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QCheckBox, QFormLayout, QHBoxLayout, QLabel, QWidget

from ..engine import ProgressEvent
from ..engine.settings import TrainingSettings, default_of
from ._base import JobWidget, checked_multiple_of_8, device_combo, int_spin, notify, run_directory, size_spin
from ._jobs import JobOutcome
from ._layers import LayerPicker, safe_name
from ._panels import LossPlot, PathEdit, form_label

RUNS_FOLDER = "affmae-runs"  # under the user's home folder


class TrainingWidget(JobWidget):
    """Base of the Pretrain and Fine-tune widgets."""

    run_suffix = "run"  # default output folder: ~/affmae-runs/<image>-<run_suffix>
    config_class: type = TrainingSettings  # the job's config: the start values of the form come from it

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.image_picker = LayerPicker(napari_viewer, "image")
        crop_h, crop_w = default_of(self.config_class, "crop_size")
        self.crop_h = size_spin(crop_h, maximum=2048, tooltip="crop height in pixels (multiple of 8)")
        self.crop_w = size_spin(crop_w, maximum=2048, tooltip="crop width in pixels (multiple of 8)")
        self.steps = int_spin(default_of(self.config_class, "steps"), 1, 1_000_000,
                              "optimiser steps (one batch of crops per step)")
        self.batch_size = int_spin(default_of(self.config_class, "batch_size"), 1, 1024, "crops per step")
        self.device = device_combo()
        self.output = PathEdit("dir", placeholder="folder for the model package and checkpoint")
        self.resume = QCheckBox("Resume from the checkpoint in this folder")
        self.resume.setToolTip("Continue an interrupted or cancelled run (model, optimiser, schedule, step, random "
                               "state). Unticked, a folder that already holds a run is kept and a new sibling "
                               "folder is used.")
        self.loss_plot = LossPlot(theme=getattr(napari_viewer, "theme", None))
        self.image_picker.currentTextChanged.connect(self._default_output)
        self._default_output()

    def crop_row(self) -> QWidget:
        row = QWidget()
        layout = QHBoxLayout(row)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.crop_h)
        layout.addWidget(QLabel("×"))
        layout.addWidget(self.crop_w)
        return row

    def add_training_rows(self, form: QFormLayout) -> None:
        form.addRow(form_label("Crop (H × W)", "training crop size in pixels"), self.crop_row())
        form.addRow(form_label("Steps"), self.steps)
        form.addRow(form_label("Batch size"), self.batch_size)
        form.addRow(form_label("Device"), self.device)
        form.addRow(form_label("Output folder"), self.output)
        form.addRow(self.resume)

    def add_run_section(self) -> None:
        self.main_layout.addWidget(self.button)
        self.main_layout.addWidget(self.progress)
        self.main_layout.addWidget(self.loss_plot)
        self.main_layout.addWidget(self.result_label)
        self.main_layout.addStretch(1)

    def _default_output(self, *_: Any) -> None:
        if self.output.user_edited:
            return
        layer = self.image_picker.layer()
        stem = safe_name(layer.name) if layer is not None else "image"
        self.output.set_text(Path.home() / RUNS_FOLDER / f"{stem}-{self.run_suffix}")

    def crop_size(self) -> tuple[int, int]:
        return checked_multiple_of_8(self.crop_h, "the crop height"), checked_multiple_of_8(self.crop_w, "the crop width")

    def output_folder(self) -> tuple[Path, bool]:
        """The run folder (see `run_directory`); tells the user when a new sibling folder is used."""
        folder, moved = run_directory(self.output.path(), self.resume.isChecked())
        if moved:
            notify("info", f"{self.output.path()} already holds a run; this run is written to {folder} "
                           "(tick Resume to continue the earlier one)")
            self.output.set_text(folder)
        return folder, moved

    def on_progress(self, event: ProgressEvent) -> None:
        if event.loss is not None:
            self.loss_plot.add(event.step, event.loss)
        if event.extra and "trivial" in event.extra:  # pretraining: below this line it learns more than flat patches
            self.loss_plot.add_reference(event.extra["trivial"])

    def prepare_plot(self) -> None:
        if not self.resume.isChecked():
            self.loss_plot.clear()

    def training_finished(self, outcome: JobOutcome, what: str) -> Path | None:
        """Common reporting for a training job; returns the package path it wrote (None on error)."""
        result = outcome.result
        if outcome.error is not None or result is None:
            if outcome.cancelled:
                notify("info", f"{self.job_title} cancelled before the first step; nothing was saved")
            return None
        self.loss_plot.set_history(result.losses)
        folder = Path(result.package_path).parent
        if outcome.cancelled:
            text = (f"Cancelled at step {result.step}/{result.total_steps}. Checkpoint and {what} saved in "
                    f"{folder}; tick Resume and press the button to continue.")
            notify("info", f"{self.job_title} cancelled at step {result.step}/{result.total_steps}; checkpoint saved "
                           f"at {result.checkpoint_path}")
        else:
            loss = f", final loss {result.final_loss:.4f}" if result.losses else ""
            text = f"Done: {result.step} steps{loss}."
            notify("info", f"{self.job_title} finished: {what} saved at {result.package_path}")
        self.result_label.setText(f"{text}\nPackage: {result.package_path}")
        return Path(result.package_path)
