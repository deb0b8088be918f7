"""Segment widget: a fine-tuned package + an image layer -> a Labels layer (and class probabilities)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QWidget

from ..engine import SegmentConfig
from ..engine.segment import NORMALIZATIONS
from ._base import Job, JobWidget, checked_multiple_of_8, device_combo, int_spin, size_spin
from ._jobs import JobOutcome
from ._layers import LayerPicker, image_data
from ._panels import PathEdit, form_label
from ._results import plan_region, segmentation_job, show_segmentation

SCOPE_LABELS = {"Whole image / stack": "whole", "Current slice": "slice", "Current view": "view"}


class TilingControls:
    """The tiling rows of the Segment and Batch widgets' Advanced sections (defaults from `SegmentConfig`):
    tile height and width, overlap, tiles per forward pass, device and, when asked for, normalisation."""

    def __init__(self, *, normalization: bool) -> None:
        defaults = SegmentConfig()
        self.tile_h = size_spin(defaults.tile_size[0], maximum=4096, tooltip="tile height in pixels (multiple of 8)")
        self.tile_w = size_spin(defaults.tile_size[1], maximum=4096, tooltip="tile width in pixels (multiple of 8)")
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.5)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(defaults.overlap)
        self.overlap.setToolTip("overlap between neighbouring tiles, as a fraction of the tile")
        self.batch_size = int_spin(defaults.batch_size, 1, 256, "tiles per forward pass")
        self.device = device_combo()
        self.normalization: QComboBox | None = None
        if normalization:
            self.normalization = QComboBox()
            self.normalization.addItems(list(NORMALIZATIONS))
            self.normalization.setCurrentText(defaults.normalization)
            self.normalization.setToolTip("package: the intensity statistics stored with the model (each "
                                          "slice's own for a model trained that way, e.g. a kept live "
                                          "preview); image: this image's own (for data with a different "
                                          "contrast); slice: each slice's own (brightness drifting along z)")

    def add_rows(self, form: QFormLayout) -> None:
        form.addRow(form_label("Tile height"), self.tile_h)
        form.addRow(form_label("Tile width"), self.tile_w)
        form.addRow(form_label("Overlap"), self.overlap)
        form.addRow(form_label("Batch size"), self.batch_size)
        form.addRow(form_label("Device"), self.device)
        if self.normalization is not None:
            form.addRow(form_label("Normalisation"), self.normalization)

    def config(self) -> SegmentConfig:
        """The controls' `SegmentConfig`; ValueError naming the control when a tile side is not a multiple of 8."""
        tile = (checked_multiple_of_8(self.tile_h, "the tile height"), checked_multiple_of_8(self.tile_w, "the tile width"))
        extra = {} if self.normalization is None else {"normalization": self.normalization.currentText()}
        return SegmentConfig(tile_size=tile, overlap=float(self.overlap.value()), batch_size=int(self.batch_size.value()),
                             device=self.device.currentText(), **extra)


class SegmentationJobWidget(JobWidget):
    """Base of the Segment and Batch widgets: the segmentation package field (it follows the package the
    Fine-tune widget makes until the user edits it) and the tiling controls in an Advanced section."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None, *, normalization: bool) -> None:
        super().__init__(napari_viewer, parent)
        self.package = PathEdit("package", placeholder="segmentation.affmae (from the Fine-tune widget)")
        self.tiling = TilingControls(normalization=normalization)
        self.tile_h, self.tile_w, self.overlap = self.tiling.tile_h, self.tiling.tile_w, self.tiling.overlap
        self.batch_size, self.device = self.tiling.batch_size, self.tiling.device

    def add_advanced_and_run(self, *extra_rows: QWidget) -> None:
        """The Advanced section (tiling rows, then ``extra_rows``), run button, progress and result; then
        start following the shared segmentation package."""
        from superqt import QCollapsible

        self.advanced = QCollapsible("Advanced")
        inner = QWidget()
        advanced_form = QFormLayout(inner)
        self.tiling.add_rows(advanced_form)
        for row in extra_rows:
            advanced_form.addRow(row)
        self.advanced.addWidget(inner)
        for widget in (self.advanced, self.button, self.progress, self.result_label):
            self.main_layout.addWidget(widget)
        self.main_layout.addStretch(1)
        self.package.follow(self.state.segmentation_changed, self.state.segmentation_package)

    def package_path(self) -> Path:
        """The chosen segmentation package; ValueError when none is chosen or it does not exist."""
        package = self.package.path()
        if package is None:
            raise ValueError("choose a model package (a segmentation.affmae made by the Fine-tune widget)")
        if not package.exists():
            raise ValueError(f"the model package {package} does not exist")
        return package


class SegmentWidget(SegmentationJobWidget):
    """Tiled inference over the whole stack, the current slice or the visible part of it."""

    job_title = "Segmentation"
    button_label = "Segment"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent, normalization=True)
        self.image_picker = LayerPicker(napari_viewer, "image")
        self.scope = QComboBox()
        self.scope.addItems(list(SCOPE_LABELS))
        self.scope.setToolTip("Current view: only the part of the current slice visible in the canvas (quick look)")
        self.probabilities = QCheckBox("Also add class probabilities (an image layer, class axis first)")
        form = self.form()
        form.addRow(form_label("Model package"), self.package)
        form.addRow(form_label("Image"), self.image_picker)
        form.addRow(form_label("Segment"), self.scope)
        form.addRow(self.probabilities)

        self.normalization = self.tiling.normalization
        self.add_advanced_and_run()
        self._image_layer: Any = None

    def config(self) -> SegmentConfig:
        return self.tiling.config()

    def prepare(self) -> Job:
        package = self.package_path()
        layer = self.image_picker.layer()
        data = image_data(layer)
        scope = SCOPE_LABELS[self.scope.currentText()]
        part, region, description = plan_region(self.viewer, layer, data, scope)
        work = segmentation_job(package, part, self.config(), self.probabilities.isChecked(), region, description)
        self._image_layer = layer
        self.result_label.setText("")
        return f"Segmenting {description} of '{layer.name}'", work

    def job_finished(self, outcome: JobOutcome) -> None:
        if not outcome.ok:
            return
        labels = show_segmentation(self.viewer, self._image_layer, outcome.result)
        self.result_label.setText(f"Segmented {outcome.result.description} into '{labels.name}' "
                                  f"({outcome.seconds:.1f} s).")
