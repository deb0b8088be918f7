"""Batch OME-Zarr widget in a real viewer: a folder of datasets (one broken), per-dataset status,
labels groups per NGFF next to untouched images, double-click to open, rerun = already complete."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from qtpy.QtCore import Qt

from napari_affmae.data import CLASS_NAMES, synthetic_em
from napari_affmae.engine import SegmentConfig, load_package, segment
from napari_affmae.io import read_image, write_ome_zarr_image
from napari_affmae.io.omezarr import ngff_attrs
from napari_affmae.widgets import BatchWidget
from napari_affmae.widgets._state import shared_state

from .conftest import CROP, messages, wait_done

pytestmark = pytest.mark.gui


def _tree_digest(path: Path) -> str:
    """Hash of every file of an image except its labels/ folder (to prove the image was not written)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "labels" not in p.relative_to(path).parts):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def datasets(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "plates"
    folder.mkdir()
    stack, _ = synthetic_em((2, 72, 96), seed=3)
    flat, _ = synthetic_em((80, 64), seed=4)
    a = Path(write_ome_zarr_image(folder / "a.zarr", stack, "zyx", pixel_size={"z": 50.0, "y": 4.6, "x": 4.6}))
    b = Path(write_ome_zarr_image(folder / "b.zarr", flat, "yx", pixel_size=4.6, levels=2))
    broken = folder / "c.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return {"folder": folder, "a": a, "b": b, "broken": broken}


def test_batch_segments_every_dataset_and_opens_results(make_napari_viewer, qtbot, dock, datasets, packages,
                                                        notifications):
    viewer = make_napari_viewer()
    shared_state(viewer).segmentation_package = packages.segmentation
    widget = dock(viewer, BatchWidget)
    assert widget.package.text() == str(packages.segmentation)
    added = widget.add_paths([datasets["folder"]])
    assert [Path(p).name for p in added] == ["a.zarr", "b.zarr", "c.zarr"]
    assert widget.table.rowCount() == 3 and widget.status(0) == "pending"
    assert widget.add_paths([datasets["a"]]) == []  # no duplicates
    before = {key: _tree_digest(datasets[key]) for key in ("a", "b")}

    widget.label_name.setText("cells")
    widget.tile_h.setValue(CROP)
    widget.tile_w.setValue(CROP)
    widget.device.setCurrentText("cpu")
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert widget.last_outcome.error is None, widget.last_outcome
    assert [widget.status(r).split(":")[0] for r in range(3)] == ["done", "done", "failed"]
    assert "multiscales" in widget.status(2)
    assert any("c.zarr" in m for m in messages(notifications, "warning"))
    assert widget.table.item(0, 2).text() == "labels/cells"

    package = load_package(packages.segmentation)
    for key in ("a", "b"):
        assert _tree_digest(datasets[key]) == before[key]  # image arrays and metadata untouched
        labels_group = zarr.open_group(str(datasets[key] / "labels" / "cells"), mode="r")
        attrs = ngff_attrs(labels_group)
        assert attrs["image-label"]["source"] == {"image": "../../"}
        assert [p["class"] for p in attrs["image-label"]["properties"]] == list(CLASS_NAMES)
        assert "cells" in ngff_attrs(zarr.open_group(str(datasets[key] / "labels"), mode="r"))["labels"]
        image = np.asarray(read_image(datasets[key]).array)
        level0 = np.asarray(labels_group[attrs["multiscales"][0]["datasets"][0]["path"]])
        expected = segment(package, image, SegmentConfig(tile_size=(CROP, CROP), overlap=0.25, device="cpu"))
        assert np.array_equal(level0, expected)

    # double-click opens the image pyramid and its labels (the viewer is not shown: emit the table's signal)
    widget.table.cellDoubleClicked.emit(1, 0)
    assert [layer.name for layer in viewer.layers] == ["b.zarr", "b.zarr cells"]
    image_layer, labels_layer = viewer.layers
    assert image_layer.multiscale and len(image_layer.data) == 2
    assert np.allclose(image_layer.scale, (4.6, 4.6))
    assert labels_layer.multiscale and np.array_equal(np.asarray(labels_layer.data[0]),
                                                      segment(package, read_image(datasets["b"]).array,
                                                              SegmentConfig(tile_size=(CROP, CROP), device="cpu")))
    assert list(labels_layer.features["class"]) == ["unlabelled", *CLASS_NAMES]

    # running again resumes: finished datasets are skipped
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert [widget.status(r).split(":")[0] for r in range(3)] == ["already complete", "already complete", "failed"]


def test_batch_bad_input(make_napari_viewer, qtbot, dock, tmp_path, datasets, packages, notifications):
    viewer = make_napari_viewer()
    widget = dock(viewer, BatchWidget)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    assert "add OME-Zarr datasets first" in messages(notifications, "error")[-1]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert widget.add_paths([empty]) == []
    assert "contains no OME-Zarr datasets" in messages(notifications, "error")[-1]

    widget.add_paths([datasets["a"]])
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    assert "choose a model package" in messages(notifications, "error")[-1]

    widget.package.set_text(packages.segmentation, by_user=True)
    widget.label_name.setText("../escape")
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    assert "plain name" in messages(notifications, "error")[-1]
    assert not widget.is_running and not (datasets["a"] / "labels").exists()

    widget.clear()
    assert widget.table.rowCount() == 0 and widget.datasets == []


def test_cancelled_batch_resumes_where_it_stopped(make_napari_viewer, qtbot, dock, tmp_path, packages):
    viewer = make_napari_viewer()
    stack, _ = synthetic_em((6, 128, 136), seed=5)
    path = Path(write_ome_zarr_image(tmp_path / "big.zarr", stack, "zyx", chunks=(1, 64, 64)))
    widget = dock(viewer, BatchWidget)
    widget.add_paths([path])
    widget.package.set_text(packages.segmentation, by_user=True)
    widget.tile_h.setValue(CROP)
    widget.tile_w.setValue(CROP)
    widget.device.setCurrentText("cpu")
    widget.batch_size.setValue(1)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.status(0).startswith("running:"), timeout=120_000)
    qtbot.mouseClick(widget.button, Qt.LeftButton)  # Cancel
    wait_done(qtbot, widget, timeout_s=60)
    assert widget.last_outcome.cancelled
    assert widget.status(0).startswith("cancelled")
    assert "resume" in widget.result_label.text()
    labels_root = ngff_attrs(zarr.open_group(str(path / "labels"), mode="r"))
    assert "affmae" not in labels_root.get("labels", [])  # unfinished labels are not listed yet

    qtbot.mouseClick(widget.button, Qt.LeftButton)  # run again: resumes
    wait_done(qtbot, widget)
    assert widget.status(0) == "done"
    group = zarr.open_group(str(path / "labels" / "affmae"), mode="r")
    level0 = np.asarray(group[ngff_attrs(group)["multiscales"][0]["datasets"][0]["path"]])
    expected = segment(load_package(packages.segmentation), stack,
                       SegmentConfig(tile_size=(CROP, CROP), overlap=0.25, device="cpu"))
    assert np.array_equal(level0, expected)
