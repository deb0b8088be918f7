"""Fine-tune widget: train a segmentation model on a few painted strokes, then look at the result.

The loop it supports: paint strokes of each class in a Labels layer (0 = unpainted = ignored) ->
Fine-tune -> the current slice is segmented straight away -> paint corrections where it is wrong
-> Fine-tune again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..engine import FinetuneConfig, SegmentConfig, finetune
from ..engine.pseudo_labels import DEFAULT_CONFIDENCE
from ..engine.settings import default_of
from ..models import list_models
from ._base import Job, notify
from ._jobs import JobOutcome
from ._layers import _PALETTE, LayerPicker, image_data, label_colormap, labels_data, painted_classes, same_geometry
from ._live import LivePanel, LiveSources
from ._panels import PathEdit, form_label
from ._results import plan_region, segmentation_job, show_segmentation
from ._training import TrainingWidget

FROM_PRETRAINED = "Pretrained package"
FROM_SCRATCH = "From scratch"
FROM_LAST = "Last fine-tuned model (continue)"


class ClassTable(QTableWidget):
    """Editable class names: row ``i`` is label value ``i + 1`` with its colour."""

    def __init__(self, names: list[str], parent: QWidget | None = None) -> None:
        super().__init__(0, 2, parent)
        self.setHorizontalHeaderLabels(["Label", "Class name"])
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeToContents)
        self.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setMinimumHeight(112)
        self.setMaximumHeight(160)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.set_names(names)

    def set_names(self, names: list[str]) -> None:
        self.setRowCount(0)
        for name in names:
            self.add_class(name)

    def add_class(self, name: str | None = None) -> None:
        row = self.rowCount()
        self.insertRow(row)
        value = QTableWidgetItem(str(row + 1))
        value.setFlags(value.flags() & ~Qt.ItemIsEditable)
        r, g, b = (int(255 * c) for c in _PALETTE[row % len(_PALETTE)])
        value.setBackground(QColor(r, g, b))
        value.setForeground(QColor(0, 0, 0))
        self.setItem(row, 0, value)
        self.setItem(row, 1, QTableWidgetItem(name or f"class {row + 1}"))

    def remove_last(self) -> None:
        if self.rowCount() > 2:
            self.removeRow(self.rowCount() - 1)

    def names(self) -> list[str]:
        names = []
        for row in range(self.rowCount()):
            item = self.item(row, 1)
            text = item.text().strip() if item is not None else ""
            names.append(text or f"class {row + 1}")
        return names


class FinetuneWidget(TrainingWidget):
    """Image + painted Labels layer -> segmentation package (remembered for Segment and Batch)."""

    job_title = "Fine-tuning"
    button_label = "Fine-tune on painted labels"
    run_suffix = "finetune"
    config_class = FinetuneConfig

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        intro = QLabel("Paint a few strokes per class (0 = unpainted, ignored), fine-tune, then paint "
                       "corrections and fine-tune again.")
        intro.setWordWrap(True)
        self.main_layout.addWidget(intro)
        self.labels_picker = LayerPicker(napari_viewer, "labels")
        add_labels = QPushButton("Add labels layer for painting")
        add_labels.setToolTip("An empty Labels layer with the image's shape, ready for the brush")
        add_labels.clicked.connect(self.add_labels_layer)
        self.add_labels_button = add_labels
        self.classes = ClassTable(["class 1", "class 2"])
        self.classes.itemSelectionChanged.connect(self._select_paint_label)
        add_class, remove_class = QPushButton("+ class"), QPushButton("− class")
        add_class.clicked.connect(lambda: self.classes.add_class())
        remove_class.clicked.connect(self.classes.remove_last)
        class_buttons = QWidget()
        row = QHBoxLayout(class_buttons)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(add_class)
        row.addWidget(remove_class)
        self.start_from = QComboBox()
        self.start_from.addItems([FROM_SCRATCH, FROM_PRETRAINED, FROM_LAST])
        self.start_from.setToolTip(f"'{FROM_SCRATCH}' (the default) learns from the strokes and the live "
                                   "preview's confident pixels; on real EM it scored above a start from a package "
                                   f"pretrained on the image (docs/few-strokes.md). '{FROM_LAST}': after painting "
                                   "corrections on its result, train the last segmentation package on (same "
                                   "classes) instead of starting again")
        self.start_from.currentTextChanged.connect(self._start_from_changed)
        self.pretrained = PathEdit("package", placeholder="pretrained.affmae (from the Pretrain widget)")
        self.scratch_model = QComboBox()
        self.scratch_model.addItems(list_models(trainable=True))
        self.scratch_model.setCurrentText(default_of(FinetuneConfig, "model"))
        self.live = LivePanel(napari_viewer, self.state, LiveSources(
            image_layer=self.image_picker.layer, labels_layer=self.labels_picker.layer, package=self.live_package,
            class_names=self.classes.names, output_folder=self.output.path))
        self.teacher = QCheckBox("Also learn from the live preview's confident pixels")
        self.teacher.setToolTip("Train on the strokes and on the pixels of the painted slices that the live "
                                "preview's forest is sure about (probability >= "
                                f"{DEFAULT_CONFIDENCE:.2f}): few strokes then teach a network much more. "
                                "Continuing the last model, it learns again from what the forest gave it "
                                "then, your corrections winning")
        self.teacher.setChecked(default_of(FinetuneConfig, "pseudo_label_confidence") is not None)
        self.segment_after = QCheckBox("Segment the current slice when done")
        self.segment_after.setChecked(True)
        form = self.form()
        form.addRow(form_label("Image"), self.image_picker)
        form.addRow(form_label("Labels"), self.labels_picker)
        form.addRow(self.add_labels_button)
        form.addRow(form_label("Classes"), self.classes)
        form.addRow(class_buttons)
        form.addRow(self.live)
        form.addRow(form_label("Start from"), self.start_from)
        form.addRow(form_label("Package"), self.pretrained)
        form.addRow(form_label("Model"), self.scratch_model)
        self.add_training_rows(form)
        form.addRow(self.teacher)
        form.addRow(self.segment_after)
        self.add_run_section()
        self.labels_picker.currentTextChanged.connect(self._labels_changed)
        self.labels_picker.currentTextChanged.connect(self.live.watch)
        self.image_picker.currentTextChanged.connect(self.live.schedule)
        self.start_from.currentTextChanged.connect(self.live.schedule)
        self.pretrained.follow(self.state.pretrained_changed, self.state.pretrained_package)
        self._start_from_changed(self.start_from.currentText())
        self._labels_changed()
        self._finish = self._finetune_done
        self._image_layer: Any = None
        self.last_finetuned: Path | None = None  # the package this widget's last fine-tuning wrote

    # ------------------------------------------------------------------ form reactions
    def _start_from_changed(self, text: str) -> None:
        self.pretrained.setEnabled(text == FROM_PRETRAINED)
        self.scratch_model.setEnabled(text == FROM_SCRATCH)

    def _labels_changed(self, *_: Any) -> None:
        layer = self.labels_picker.layer()
        names = (layer.metadata or {}).get("class_names") if layer is not None else None
        if names:
            self.classes.set_names([str(n) for n in names])

    def _select_paint_label(self) -> None:
        layer = self.labels_picker.layer()
        rows = self.classes.selectionModel().selectedRows()
        if layer is not None and rows:
            layer.selected_label = rows[0].row() + 1

    @property
    def is_running(self) -> bool:
        """A fine-tuning/segmenting job or a live-preview worker is running."""
        return self.runner.running or self.live.busy

    def live_package(self) -> Path | None:
        """The package whose AFFMAE encoder adds live-preview features: the chosen pretrained package when
        'Start from' is 'Pretrained package' and it exists; otherwise None (filter features only)."""
        if self.start_from.currentText() != FROM_PRETRAINED:
            return None
        path = self.pretrained.path()
        return path if path is not None and path.exists() else None

    # ------------------------------------------------------------------ actions
    def add_labels_layer(self) -> Any | None:
        """Add an empty uint8 Labels layer with the image's shape and placement, ready to paint."""
        try:
            layer = self.image_picker.layer()
            data = image_data(layer)
        except ValueError as err:
            notify("error", f"Add labels layer: {err}")
            return None
        names = self.classes.names()
        labels = self.viewer.add_labels(np.zeros(tuple(int(s) for s in data.shape), np.uint8),
                                        name=f"{layer.name} strokes", colormap=label_colormap(len(names)),
                                        metadata={"class_names": names}, **same_geometry(layer))
        labels.brush_size = max(3, int(min(data.shape[-2:]) // 100))
        labels.selected_label = 1
        labels.mode = "paint"
        self.viewer.layers.selection.active = labels
        self.labels_picker.select(labels.name)
        return labels

    def config(self, num_classes: int) -> FinetuneConfig:
        names = self.classes.names()
        names = (names + [f"class {i + 1}" for i in range(len(names), num_classes)])[:num_classes]
        pretrained = None
        if self.start_from.currentText() == FROM_LAST:
            pretrained = self.last_finetuned  # not a kept Live-preview forest, which is no network to train on
            if pretrained is None or not Path(pretrained).exists():
                raise ValueError(f"no fine-tuned model to continue yet: fine-tune once first, or set Start from to "
                                 f"'{FROM_PRETRAINED}' or '{FROM_SCRATCH}'")
        if self.start_from.currentText() == FROM_PRETRAINED:
            pretrained = self.pretrained.path()
            if pretrained is None:
                raise ValueError("choose a pretrained package (run 'Pretrain on this image' first) or set Start "
                                 "from to 'From scratch'")
            if not pretrained.exists():
                raise ValueError(f"the pretrained package {pretrained} does not exist; run 'Pretrain on this "
                                 "image' first or choose another package")
        folder, _ = self.output_folder()
        steps = int(self.steps.value())
        return FinetuneConfig(
            pretrained=pretrained, model=self.scratch_model.currentText(), class_names=names,
            crop_size=self.crop_size(), batch_size=int(self.batch_size.value()), steps=steps,
            device=self.device.currentText(), output_dir=folder, resume=self.resume.isChecked(),
            checkpoint_every=min(100, max(10, steps // 5)), warmup_steps=min(20, max(steps // 10, 0)),
            pseudo_label_confidence=DEFAULT_CONFIDENCE if self.teacher.isChecked() else None,
        )

    def prepare(self) -> Job:
        layer = self.image_picker.layer()
        data = image_data(layer)
        labels_layer = self.labels_picker.layer()
        labels = labels_data(labels_layer, data.shape, layer.name)  # a copy: painting may go on meanwhile
        painted = painted_classes(labels)
        if not painted:
            raise ValueError(f"labels layer '{labels_layer.name}' has no painted pixels: paint strokes of at least "
                             "two classes (label 0 = unpainted is ignored)")
        if len(painted) < 2:
            raise ValueError(f"only class {painted[0]} is painted in '{labels_layer.name}': at least two classes "
                             "must be painted (e.g. membrane and cytoplasm)")
        config = self.config(max(painted))
        self.prepare_plot()
        self.result_label.setText("")
        self._image_layer = layer
        self._finish = self._finetune_done

        def work(progress, cancel):  # worker thread: no Qt here
            return finetune(data, labels, config, progress=progress, cancel=cancel)

        return f"Fine-tuning on '{layer.name}'", work

    def job_finished(self, outcome: JobOutcome) -> None:
        self._finish(outcome)

    def _finetune_done(self, outcome: JobOutcome) -> None:
        package = self.training_finished(outcome, "segmentation package")
        if package is None:
            return
        self.state.segmentation_package = package
        self.last_finetuned = package
        if outcome.ok and self.segment_after.isChecked():
            self.segment_preview(package)

    def segment_preview(self, package: Path) -> bool:
        """Segment the slice the viewer shows with ``package`` (result in "<image> segmentation")."""
        layer = self._image_layer
        if layer is None or layer not in list(self.viewer.layers):
            layer = self.image_picker.layer()
        try:
            data = image_data(layer)
            part, region, description = plan_region(self.viewer, layer, data, "slice")
            config = SegmentConfig(tile_size=self.crop_size(),  # the size the model was trained on
                                   device=self.device.currentText(), batch_size=int(self.batch_size.value()))
            work = segmentation_job(package, part, config, False, region, description)
            self._image_layer = layer
            self._finish = self._preview_done
            self.runner.start(f"Segmenting {description}", work)
        except (ValueError, RuntimeError, OSError) as err:
            notify("error", f"Segmenting the current slice: {err}")
            return False
        return True

    def _preview_done(self, outcome: JobOutcome) -> None:
        self._finish = self._finetune_done
        if outcome.ok:
            labels_layer = show_segmentation(self.viewer, self._image_layer, outcome.result)
            self.result_label.setText(f"{self.result_label.text()}\nSegmented {outcome.result.description} into "
                                      f"'{labels_layer.name}'. Paint corrections into the strokes layer and "
                                      "fine-tune again.")
            strokes = self.labels_picker.layer()
            if strokes is not None:
                self.viewer.layers.selection.active = strokes
