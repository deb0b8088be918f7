"""Fine-tune widget in a real viewer: labels layer for painting, fine-tune from a pretrained package,
the current slice segmented straight away, and bad labels refused with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_affmae.data import CLASS_NAMES, sparse_strokes
from napari_affmae.engine import SegmentConfig, load_package, segment
from napari_affmae.widgets import FinetuneWidget
from napari_affmae.widgets.finetune import FROM_LAST, FROM_PRETRAINED
from napari_affmae.widgets._state import shared_state

from .conftest import CROP, messages, set_training_options

pytestmark = pytest.mark.gui


def test_paint_finetune_and_segment_the_current_slice(make_napari_viewer, qtbot, dock, tmp_path, em_stack,
                                                      packages, notifications):
    viewer = make_napari_viewer()
    image, truth = em_stack
    image_layer = viewer.add_image(image, name="em", scale=(50.0, 4.6, 4.6))
    shared_state(viewer).pretrained_package = packages.pretrained
    widget = dock(viewer, FinetuneWidget)
    assert widget.pretrained.text() == str(packages.pretrained)  # remembered from the Pretrain widget
    widget.start_from.setCurrentText(FROM_PRETRAINED)

    qtbot.mouseClick(widget.add_labels_button, Qt.LeftButton)
    strokes_layer = viewer.layers["em strokes"]
    assert type(strokes_layer).__name__ == "Labels"
    assert strokes_layer.data.shape == image.shape and strokes_layer.data.dtype == np.uint8
    assert not strokes_layer.data.any()
    assert np.allclose(strokes_layer.scale, image_layer.scale)
    assert widget.labels_picker.currentText() == "em strokes"
    assert viewer.layers.selection.active is strokes_layer and strokes_layer.mode == "paint"

    # "paint": a few strokes per class taken from the ground truth, as a user would
    strokes = sparse_strokes(truth, fraction=0.05, seed=1)
    assert set(np.unique(strokes)) == {0, 1, 2, 3}
    painted_pixels = int((strokes > 0).sum())
    strokes_layer.data = strokes.copy()
    widget.classes.set_names(list(CLASS_NAMES))
    widget.classes.selectRow(1)
    assert strokes_layer.selected_label == 2  # picking a class row selects its label for the brush

    viewer.dims.set_current_step(0, 1)  # the user looks at slice 1
    set_training_options(widget, tmp_path / "ft", steps=2)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    assert widget.is_running
    strokes_layer.data[0, :4, :4] = 1  # painting on while it trains does not change the job's labels (a copy)
    qtbot.waitUntil(lambda: "em segmentation" in viewer.layers and not widget.is_running, timeout=300_000)

    package_path = tmp_path / "ft" / "segmentation.affmae"
    package = load_package(package_path, expect_task="segmentation")
    assert package.num_classes == 3 and package.class_names == list(CLASS_NAMES)
    assert package.provenance["pretrained"] == str(packages.pretrained)
    assert package.provenance["steps"] == 2
    added = sum(package.provenance["pseudo_labels"]["added_pixels"].values())  # the default: preview pixels too
    assert added > 0 and package.provenance["labelled_pixels"] == painted_pixels + added
    assert shared_state(viewer).segmentation_package == package_path

    result = viewer.layers["em segmentation"]
    assert result.data.shape == image.shape and np.allclose(result.scale, image_layer.scale)
    assert not result.data[0].any()  # only the current slice was segmented
    expected = segment(package, image[1], SegmentConfig(tile_size=(CROP, CROP), device="cpu"))
    assert np.array_equal(result.data[1], expected)
    assert set(np.unique(result.data[1])) <= {1, 2, 3}
    assert result.metadata["class_names"] == list(CLASS_NAMES)
    assert "fine-tune again" in widget.result_label.text()
    assert viewer.layers.selection.active is strokes_layer  # back to painting corrections
    assert any("Fine-tuning finished" in m for m in messages(notifications, "info"))

    # corrections painted on the result, then training goes on from the model just made
    strokes_layer.data[1, 10:14, 10:30] = 3
    widget.start_from.setCurrentText(FROM_LAST)
    assert not widget.pretrained.isEnabled() and not widget.scratch_model.isEnabled()
    set_training_options(widget, tmp_path / "ft2", steps=1)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.is_running, timeout=300_000)
    again = load_package(tmp_path / "ft2" / "segmentation.affmae", expect_task="segmentation")
    assert again.provenance["continued_from"] == str(package_path) and again.provenance["steps"] == 1
    # it learned again from what the forest taught it on the painted slices, the corrections winning
    assert again.provenance["pseudo_labels"]["taught_slices"] == list(range(len(image)))
    assert "model_slices" not in again.provenance["pseudo_labels"]
    assert again.class_names == list(CLASS_NAMES) and shared_state(viewer).segmentation_package == (
        tmp_path / "ft2" / "segmentation.affmae")


def test_bad_labels_give_a_clear_notification(make_napari_viewer, qtbot, dock, tmp_path, em_stack, packages,
                                              notifications):
    viewer = make_napari_viewer()
    image, truth = em_stack
    viewer.add_image(image, name="em")
    widget = dock(viewer, FinetuneWidget)
    widget.start_from.setCurrentText(FROM_PRETRAINED)
    widget.pretrained.set_text(packages.pretrained, by_user=True)
    set_training_options(widget, tmp_path / "ft", steps=1)

    def click_and_expect(fragment: str) -> None:
        before = len(messages(notifications, "error"))
        qtbot.mouseClick(widget.button, Qt.LeftButton)
        errors = messages(notifications, "error")[before:]
        assert errors and fragment in errors[-1], errors
        assert not widget.is_running and widget.button.text() == "Fine-tune on painted labels"
        assert shared_state(viewer).running_job is None

    click_and_expect("no labels layer")

    viewer.add_labels(np.zeros((2, 40, 40), np.uint8), name="wrong shape")
    widget.labels_picker.setCurrentText("wrong shape")
    click_and_expect("has shape (2, 40, 40) but image 'em' has shape (2, 72, 96)")

    one_class = np.where(truth == 1, 1, 0).astype(np.uint8)
    viewer.add_labels(one_class, name="membrane only")
    widget.labels_picker.setCurrentText("membrane only")
    click_and_expect("only class 1 is painted")

    viewer.add_labels(np.zeros(image.shape, np.uint8), name="empty")
    widget.labels_picker.setCurrentText("empty")
    click_and_expect("no painted pixels")

    widget.labels_picker.setCurrentText("membrane only")
    viewer.layers["membrane only"].data[0, :5, :5] = 3
    widget.pretrained.set_text(tmp_path / "missing.affmae", by_user=True)
    click_and_expect("does not exist")
    widget.start_from.setCurrentText(FROM_LAST)
    shared_state(viewer).segmentation_package = packages.segmentation  # e.g. a kept Live model: not this widget's
    click_and_expect("no fine-tuned model to continue yet: fine-tune once first")

    # nothing lost: the painted labels are untouched and no output was written
    assert np.array_equal(viewer.layers["membrane only"].data[1], one_class[1])
    assert not (tmp_path / "ft").exists()

    # adding a labels layer needs an image layer
    viewer.layers.remove("em")
    before = len(messages(notifications, "error"))
    assert widget.add_labels_layer() is None
    assert "no image layer" in messages(notifications, "error")[before]
