"""Batch OME-Zarr widget: segment many OME-Zarr datasets into ``<dataset>/labels/<name>``.

The engine's batch job does the work (image arrays are opened read-only; labels are written chunk
by chunk, so a cancelled or interrupted run resumes where it stopped when started again). The
table shows each dataset's status; double-click a row to open the image and its labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..engine import BatchConfig, BatchReport, ProgressEvent, batch_segment, find_datasets
from ._base import Job, notify
from ._jobs import JobOutcome
from ._layers import class_features, label_colormap
from ._panels import form_label
from .segment import SegmentationJobWidget

STATUS_COLORS = {"done": "#4caf50", "already complete": "#4caf50", "failed": "#f44336", "cancelled": "#ff9800"}


class BatchWidget(SegmentationJobWidget):
    """A list of OME-Zarr datasets + a model package -> ``labels/<name>`` in each dataset."""

    job_title = "Batch segmentation"
    button_label = "Segment all datasets"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent, normalization=False)
        self.datasets: list[str] = []
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Dataset", "Status", "Labels"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.Stretch)
        self.table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeToContents)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setMinimumHeight(140)
        self.table.cellDoubleClicked.connect(lambda row, _col: self.open_dataset(row))
        self.table.setToolTip("Double-click a dataset to open its image and labels in the viewer")
        buttons = QWidget()
        row = QHBoxLayout(buttons)
        row.setContentsMargins(0, 0, 0, 0)
        for text, slot in (("Add folder…", self._browse_folder), ("Add .zarr…", self._browse_zarr),
                           ("Remove", self.remove_selected), ("Clear", self.clear)):
            button = QPushButton(text)
            button.clicked.connect(slot)
            row.addWidget(button)
        self.label_name = QLineEdit("affmae")
        self.label_name.setToolTip("labels are written to <dataset>/labels/<name>")
        self.main_layout.addWidget(self.table)
        self.main_layout.addWidget(buttons)
        form = self.form()
        form.addRow(form_label("Model package"), self.package)
        form.addRow(form_label("Label name"), self.label_name)

        self.overwrite = QCheckBox("Recompute labels that are already complete")
        self.add_advanced_and_run(self.overwrite)
        self._running_label = "affmae"

    # ------------------------------------------------------------------ dataset list
    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder with OME-Zarr datasets", str(Path.home()))
        if folder:
            self.add_paths([folder])

    def _browse_zarr(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "An OME-Zarr dataset (.zarr folder)", str(Path.home()))
        if folder:
            self.add_paths([folder])

    def add_paths(self, paths: Sequence[str | Path]) -> list[str]:
        """Add OME-Zarr datasets: a .zarr folder is added as is, another folder adds its .zarr children.
        Returns the datasets added; problems become notifications."""
        added: list[str] = []
        for path in paths:
            try:
                found = find_datasets(str(path))
            except ValueError as err:
                notify("error", f"Batch: {err}")
                continue
            for item in found:
                if item not in self.datasets:
                    self.datasets.append(item)
                    added.append(item)
                    self._add_row(item)
        return added

    def _add_row(self, path: str) -> None:
        row = self.table.rowCount()
        self.table.insertRow(row)
        name = QTableWidgetItem(Path(path).name)
        name.setToolTip(path)
        self.table.setItem(row, 0, name)
        self.table.setItem(row, 1, QTableWidgetItem("pending"))
        self.table.setItem(row, 2, QTableWidgetItem(""))

    def remove_selected(self) -> None:
        if self.is_running:
            notify("warning", "Batch: the dataset list cannot change while the batch runs")
            return
        for row in sorted({index.row() for index in self.table.selectedIndexes()}, reverse=True):
            self.table.removeRow(row)
            del self.datasets[row]

    def clear(self) -> None:
        if self.is_running:
            notify("warning", "Batch: the dataset list cannot change while the batch runs")
            return
        self.table.setRowCount(0)
        self.datasets.clear()

    def status(self, row: int) -> str:
        item = self.table.item(row, 1)
        return item.text() if item is not None else ""

    def set_status(self, row: int, text: str, labels_path: str | None = None) -> None:
        if not 0 <= row < self.table.rowCount():
            return
        item = QTableWidgetItem(text)
        item.setToolTip(text)
        key = text.split(":")[0]
        if key in STATUS_COLORS:
            item.setForeground(QColor(STATUS_COLORS[key]))
        self.table.setItem(row, 1, item)
        if labels_path is not None:
            labels = QTableWidgetItem(f"labels/{Path(labels_path).name}")
            labels.setToolTip(labels_path)
            self.table.setItem(row, 2, labels)

    # ------------------------------------------------------------------ job
    def config(self) -> BatchConfig:
        return BatchConfig(self.tiling.config(), overwrite=self.overwrite.isChecked())

    def prepare(self) -> Job:
        if not self.datasets:
            raise ValueError("add OME-Zarr datasets first ('Add folder…' or 'Add .zarr…')")
        package = self.package_path()
        label_name = self.label_name.text().strip()
        if not label_name or "/" in label_name or "\\" in label_name or label_name.startswith("."):
            raise ValueError(f"the label name must be a plain name like 'affmae' (no '/', not starting with '.'); "
                             f"got {label_name!r}")
        config = self.config()
        datasets = list(self.datasets)
        for row in range(len(datasets)):
            self.set_status(row, "queued")
        self._running_label = label_name
        self.result_label.setText("")

        def work(progress, cancel):  # worker thread: no Qt here
            return batch_segment(datasets, package, config, label_name=label_name, progress=progress, cancel=cancel)

        return f"Batch segmentation of {len(datasets)} dataset(s)", work

    def on_progress(self, event: ProgressEvent) -> None:
        if not self.is_running:  # a progress event that arrives after the job ended: the report has the last word
            return
        message = event.message or ""
        if message.startswith("segmenting "):
            self.set_status(event.step, "running")
            return
        for row, path in enumerate(self.datasets):
            if message.startswith(f"{path}: "):
                self.set_status(row, message[len(path) + 2:])
                return
        if message and event.step < len(self.datasets):
            name = Path(self.datasets[event.step]).name
            self.set_status(event.step, f"running: {message[len(name) + 2:] if message.startswith(name) else message}")

    def job_finished(self, outcome: JobOutcome) -> None:
        report = outcome.result
        if isinstance(report, BatchReport):
            by_path = {r.path: r for r in report.results}
            for row, path in enumerate(self.datasets):
                result = by_path.get(path)
                if result is None:
                    if outcome.cancelled or outcome.error is not None:
                        self.set_status(row, "not started")
                    continue
                text = result.status if result.error is None else f"{result.status}: {result.error}"
                if result.status == "cancelled":
                    text = "cancelled: finished chunks are kept; run again to resume"
                self.set_status(row, text, result.labels_path)
            failed = len(report.failed)
            done = sum(r.status in ("done", "already complete") for r in report.results)
            summary = f"{done} of {len(self.datasets)} dataset(s) segmented into labels/{report.label_name}"
            if failed:
                summary += f"; {failed} failed (see the table)"
                notify("warning", f"Batch: {failed} dataset(s) failed: " +
                       "; ".join(f"{Path(r.path).name}: {r.error}" for r in report.failed))
            if outcome.cancelled:
                summary += ". Cancelled: press the button again to resume"
            self.result_label.setText(summary)
        elif outcome.error is not None:
            for row in range(len(self.datasets)):
                if self.status(row) in ("queued", "running"):
                    self.set_status(row, "not started")

    # ------------------------------------------------------------------ viewing results
    def open_dataset(self, row: int) -> list[Any]:
        """Open dataset ``row``'s image (all pyramid levels) and, if written, its labels in the viewer."""
        if not 0 <= row < len(self.datasets):
            return []
        path = self.datasets[row]
        try:
            return self._open(path, self.label_name.text().strip() or self._running_label)
        except (ValueError, OSError, KeyError) as err:
            notify("error", f"Batch: cannot open {path}: {err}")
            return []

    def _open(self, path: str, label_name: str) -> list[Any]:
        from ..io import read_image, read_multiscales

        layers = []
        name = Path(path).name
        layout = read_multiscales(path)
        axes = layout.axis_names.lower()
        if set(axes) <= set("zyx"):
            levels, scale = _pyramid(layout)
            layers.append(self.viewer.add_image(levels if len(levels) > 1 else levels[0], multiscale=len(levels) > 1,
                                                name=name, scale=scale, colormap="gray", **_units(layout)))
        else:
            image = read_image(path)
            layers.append(self.viewer.add_image(image.array, name=name, colormap="gray"))
        labels_path = Path(layout.path) / "labels" / label_name
        if labels_path.exists():
            labels_layout = read_multiscales(labels_path)
            if set(labels_layout.axis_names.lower()) <= set("zyx"):
                levels, scale = _pyramid(labels_layout)
                from ..io.omezarr import ngff_attrs
                import zarr

                meta = ngff_attrs(zarr.open_group(str(labels_path), mode="r")).get("image-label", {})
                names = {int(p["label-value"]): p.get("class") for p in
                         sorted(meta.get("properties", []), key=lambda p: p["label-value"])}
                extra = {"features": class_features(names)} if names and all(names.values()) else {}
                layers.append(self.viewer.add_labels(levels if len(levels) > 1 else levels[0],
                                                     multiscale=len(levels) > 1, name=f"{name} {label_name}",
                                                     scale=scale, opacity=0.5, **_units(labels_layout),
                                                     colormap=label_colormap(max(len(names), 1), list(names)),
                                                     **extra))
        else:
            notify("info", f"{name} has no labels/{label_name} yet; opened the image only")
        return layers


def _units(layout: Any) -> dict[str, Any]:
    """``{"units": (...)}`` from the OME-Zarr axes when every axis names a unit (napari >= 0.6), else empty."""
    units = [axis.get("unit") for axis in layout.axes]
    return {"units": tuple(units)} if all(units) else {}


def _pyramid(layout: Any) -> tuple[list[Any], tuple[float, ...]]:
    """The arrays of every level (lazy zarr arrays) and the level-0 pixel size of an OME-Zarr multiscale."""
    import zarr

    group = zarr.open_group(layout.path, mode="r")
    levels = [group[ds["path"]] for ds in layout.datasets]
    ndim = len(layout.shapes[0])
    scale = (1.0,) * ndim
    for transform in layout.datasets[0].get("coordinateTransformations", []) or []:
        if transform.get("type") == "scale" and len(transform.get("scale", [])) == ndim:
            scale = tuple(float(v) for v in transform["scale"])
    return levels, scale
