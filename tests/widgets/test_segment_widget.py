"""Segment widget in a real viewer: whole stack, current slice, current view and probabilities, each
compared with the engine run directly on the same package and pixels; wrong packages refused."""
from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_affmae.data import CLASS_NAMES
from napari_affmae.engine import SegmentConfig, load_package, segment
from napari_affmae.widgets import SegmentWidget
from napari_affmae.widgets._state import shared_state

from .conftest import CROP, messages, wait_done

pytestmark = pytest.mark.gui


def _configure(widget, scope: str) -> None:
    widget.scope.setCurrentText(scope)
    widget.tile_h.setValue(CROP)
    widget.tile_w.setValue(CROP)
    widget.overlap.setValue(0.25)
    widget.device.setCurrentText("cpu")


def _reference(package, pixels) -> np.ndarray:
    return segment(package, pixels, SegmentConfig(tile_size=(CROP, CROP), overlap=0.25, device="cpu"))


def test_segment_whole_stack_slice_and_view(make_napari_viewer, qtbot, dock, em_stack, packages, notifications):
    viewer = make_napari_viewer()
    image, _ = em_stack
    viewer.add_image(image, name="em")
    shared_state(viewer).segmentation_package = packages.segmentation
    widget = dock(viewer, SegmentWidget)
    assert widget.package.text() == str(packages.segmentation)
    package = load_package(packages.segmentation)
    reference = _reference(package, image)

    # current slice first: only that slice of a new layer is filled
    viewer.dims.set_current_step(0, 1)
    _configure(widget, "Current slice")
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert widget.last_outcome.ok, widget.last_outcome
    layer = viewer.layers["em segmentation"]
    assert layer.data.shape == image.shape
    assert not layer.data[0].any()
    assert np.array_equal(layer.data[1], _reference(package, image[1]))
    assert layer.metadata["class_names"] == list(CLASS_NAMES)
    assert list(layer.features["class"]) == ["unlabelled", *CLASS_NAMES]

    # whole stack: the same layer is updated in place and equals the engine's result
    _configure(widget, "Whole image / stack")
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert [lay.name for lay in viewer.layers].count("em segmentation") == 1
    assert np.array_equal(viewer.layers["em segmentation"].data, reference)
    assert set(np.unique(reference)) <= {1, 2, 3}

    # current view: zoom into part of slice 0; only that part is written
    viewer.layers.remove("em segmentation")
    viewer.dims.set_current_step(0, 0)
    viewer.camera.center = (0.0, 30.0, 40.0)
    viewer.camera.zoom = viewer.canvas.size[0] / 36.0  # about 36 image rows tall
    _configure(widget, "Current view")
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert widget.last_outcome.ok, widget.last_outcome
    region = widget.last_outcome.result.region
    z, rows, cols = region
    assert z == 0 and rows.stop - rows.start < image.shape[1] and cols.stop - cols.start <= image.shape[2]
    assert rows.start <= 30 < rows.stop and cols.start <= 40 < cols.stop
    view = viewer.layers["em segmentation"].data
    assert np.array_equal(view[0, rows, cols], _reference(package, image[0, rows, cols]))
    outside = view.copy()
    outside[0, rows, cols] = 0
    assert not outside.any()
    assert not any(messages(notifications, "error"))


def test_probabilities_layer_matches_the_labels(make_napari_viewer, qtbot, dock, em_stack, packages):
    viewer = make_napari_viewer()
    image, _ = em_stack
    viewer.add_image(image[0], name="flat")  # 2D image
    widget = dock(viewer, SegmentWidget)
    widget.package.set_text(packages.segmentation, by_user=True)
    _configure(widget, "Whole image / stack")
    widget.probabilities.setChecked(True)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert widget.last_outcome.ok, widget.last_outcome
    probs = viewer.layers["flat probabilities"].data
    labels = viewer.layers["flat segmentation"].data
    assert probs.shape == (3, *image.shape[1:]) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(labels, probs.argmax(axis=0) + 1)
    assert np.array_equal(labels, _reference(load_package(packages.segmentation), image[0]))


def test_wrong_package_or_image_gives_a_clear_notification(make_napari_viewer, qtbot, dock, tmp_path, em_stack,
                                                           packages, notifications):
    viewer = make_napari_viewer()
    widget = dock(viewer, SegmentWidget)
    _configure(widget, "Whole image / stack")

    qtbot.mouseClick(widget.button, Qt.LeftButton)
    assert "choose a model package" in messages(notifications, "error")[-1]

    widget.package.set_text(packages.pretrained, by_user=True)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    assert "no image layer" in messages(notifications, "error")[-1]

    viewer.add_image(em_stack[0], name="em")
    qtbot.mouseClick(widget.button, Qt.LeftButton)  # an MAE package: refused by the worker, reported
    wait_done(qtbot, widget)
    assert widget.last_outcome.error is not None
    assert "fine-tune" in messages(notifications, "error")[-1]
    assert "em segmentation" not in viewer.layers
    assert widget.button.text() == "Segment" and not widget.is_running

    not_a_package = tmp_path / "notes.affmae"
    not_a_package.write_text("hello")
    widget.package.set_text(not_a_package, by_user=True)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert "not a model package" in messages(notifications, "error")[-1]
    assert [layer.name for layer in viewer.layers] == ["em"]


def test_remapped_label_values_keep_their_names_and_are_not_wrapped(make_napari_viewer, qtbot, dock, em_stack,
                                                                    tmp_path):
    """A package trained on values {1, 60000}: the layer shows 60000 named as its class, and an existing
    uint8 "segmentation" layer is widened (its other slices kept) instead of wrapping 60000 to 96."""
    import torch

    from napari_affmae.data import compute_stats
    from napari_affmae.engine import ModelPackage, save_package
    from napari_affmae.models import create_model

    image, _ = em_stack
    torch.manual_seed(0)
    # random weights that predict both classes on this slice: the per-cell patch head's do (the fusion
    # head's start near one class everywhere); the test is about label values, not the head
    model = create_model("affmae_tiny", task="segmentation", num_classes=2, seg_head="patch")
    path = save_package(ModelPackage.from_model(model, normalization=compute_stats(image), class_names=["cell", "gap"],
                                                label_values=[1, 60000]), tmp_path / "remapped.affmae")
    package = load_package(path)
    reference = _reference(package, image[1])
    assert reference.dtype == np.uint16 and 60000 in reference  # the weights predict both classes here
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    earlier = np.zeros(image.shape, np.uint8)
    earlier[0] = 7
    viewer.add_labels(earlier, name="em segmentation")
    widget = dock(viewer, SegmentWidget)
    widget.package.set_text(path, by_user=True)
    viewer.dims.set_current_step(0, 1)
    _configure(widget, "Current slice")
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert widget.last_outcome.ok, widget.last_outcome
    layer = viewer.layers["em segmentation"]
    assert [lay.name for lay in viewer.layers] == ["em", "em segmentation"]
    assert np.iinfo(layer.data.dtype).max >= 60000
    assert np.array_equal(layer.data[1], reference)
    assert (layer.data[0] == 7).all() and not layer.data[2:].any()
    names = dict(zip(layer.features["index"], layer.features["class"]))
    assert names == {0: "unlabelled", 1: "cell", 60000: "gap"}
    assert layer.metadata["class_names"] == ["cell", "gap"]
