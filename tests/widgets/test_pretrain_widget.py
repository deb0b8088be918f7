"""Pretrain widget in a real viewer: train, stay responsive, refuse a second job, cancel, resume, bad input."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_affmae.engine import load_checkpoint, load_package
from napari_affmae.widgets import FinetuneWidget, PretrainWidget
from napari_affmae.widgets._state import shared_state

from .conftest import StallMeter, messages, set_training_options, wait_done

pytestmark = pytest.mark.gui
MAX_STALL_S = 0.5


def test_pretrain_button_trains_writes_a_package_and_keeps_the_viewer_responsive(
        make_napari_viewer, qtbot, dock, tmp_path, em_stack, notifications):
    viewer = make_napari_viewer()
    image, _ = em_stack
    viewer.add_image(image, name="em")
    widget = dock(viewer, PretrainWidget)
    other = dock(viewer, FinetuneWidget)
    assert widget.image_picker.currentText() == "em"
    set_training_options(widget, tmp_path / "pre", steps=5)
    assert widget.button.text() == "Pretrain on this image"

    meter = StallMeter()
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    assert widget.is_running and widget.button.text() == "Cancel"

    # a second start while running: refused with a notification, the running job is untouched
    assert widget.start() is False
    assert any("already running" in m for m in messages(notifications, "warning"))
    # another widget of the same viewer may not start a second job either
    assert other.start() is False
    assert any("another AFFMAE job" in m for m in messages(notifications, "warning"))
    assert widget.is_running

    event_times = []
    widget.runner.progressed.connect(lambda e: event_times.append((round(time.perf_counter() - meter.started, 3), e.step)))
    meter.start()  # from here on the test only waits: every tick comes from the event loop
    wait_done(qtbot, widget)
    meter.stop()
    outcome = widget.last_outcome
    assert outcome is not None and outcome.ok, outcome
    package_path = tmp_path / "pre" / "pretrained.affmae"
    assert outcome.result.package_path == package_path
    package = load_package(package_path, expect_task="mae")
    assert package.model_name == "affmae_tiny" and package.provenance["steps"] == 5
    assert package.provenance["config"]["crop_size"] == [64, 64]
    assert package.provenance["shapes"] == [list(image.shape)]
    model = package.build_model("cpu")
    import torch

    with torch.no_grad():
        loss = model(torch.rand(1, 1, 64, 64))["loss"]
    assert math.isfinite(float(loss))

    # the widget showed the run: full progress bar, the loss curve, the package path
    assert widget.progress.bar.value() == widget.progress.bar.maximum()
    assert widget.loss_plot.steps == [1, 2, 3, 4, 5]
    assert np.allclose(widget.loss_plot.losses, outcome.result.losses)
    # the dashed baseline: the flat-patch predictor's loss, (p*p - 1)/(p*p) x the summed loss weights 1.17
    assert widget.loss_plot.reference == pytest.approx(63 / 64 * 1.17, rel=0.05)
    assert str(package_path) in widget.result_label.text()
    assert widget.button.text() == "Pretrain on this image" and not widget.is_running
    # remembered for the other widgets
    assert shared_state(viewer).pretrained_package == package_path
    assert other.pretrained.text() == str(package_path)
    assert any("Pretraining finished" in m for m in messages(notifications, "info"))
    print(f"longest event-loop stall during pretraining: {meter.max_gap * 1000:.0f} ms over {meter.ticks} ticks; "
          f"gaps > 0.1 s (start s, gap s): {meter.long_gaps}; events {event_times}")
    assert meter.ticks > 5
    assert meter.max_gap < MAX_STALL_S


def test_cancel_stops_within_seconds_leaves_a_checkpoint_and_resume_finishes(
        make_napari_viewer, qtbot, dock, tmp_path, em_stack, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(em_stack[0], name="em")
    widget = dock(viewer, PretrainWidget)
    folder = tmp_path / "run"
    set_training_options(widget, folder, steps=6)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    qtbot.waitUntil(lambda: widget.progress.last_event is not None and widget.progress.last_event.step >= 1,
                    timeout=180_000)
    pressed = time.perf_counter()
    qtbot.mouseClick(widget.button, Qt.LeftButton)  # "Cancel"
    assert widget.button.text() == "Cancelling…"
    wait_done(qtbot, widget, timeout_s=60)
    stop_s = time.perf_counter() - pressed
    print(f"cancel -> stopped in {stop_s:.2f} s")
    assert stop_s < 10.0

    outcome = widget.last_outcome
    assert outcome.cancelled and outcome.error is None
    stopped_at = outcome.result.step
    assert 1 <= stopped_at < 6
    checkpoint = load_checkpoint(folder)
    assert checkpoint.step == stopped_at
    package = load_package(folder / "pretrained.affmae", expect_task="mae")
    assert package.provenance["steps"] == stopped_at
    package.build_model("cpu")
    assert any(f"cancelled at step {stopped_at}/6" in m for m in messages(notifications, "info"))
    assert "Resume" in widget.result_label.text()
    assert widget.button.text() == "Pretrain on this image"
    losses_before = list(outcome.result.losses)

    # Resume continues from the checkpoint to the end of the same schedule
    widget.resume.setChecked(True)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    resumed = widget.last_outcome
    assert resumed.ok, resumed
    assert resumed.result.step == 6 and len(resumed.result.losses) == 6
    assert np.allclose(resumed.result.losses[:stopped_at], losses_before)
    assert load_checkpoint(folder).step == 6
    assert widget.loss_plot.steps == [1, 2, 3, 4, 5, 6]

    # a fresh run into the same folder keeps the finished run and uses a sibling folder
    widget.resume.setChecked(False)
    folder_before = widget.output.text()
    widget.steps.setValue(1)
    qtbot.mouseClick(widget.button, Qt.LeftButton)
    wait_done(qtbot, widget)
    assert widget.output.text() == str(tmp_path / "run-2") != folder_before
    assert load_checkpoint(folder).step == 6 and load_checkpoint(tmp_path / "run-2").step == 1


def test_bad_input_gives_a_notification_and_the_widget_stays_usable(
        make_napari_viewer, qtbot, dock, tmp_path, notifications):
    viewer = make_napari_viewer()
    widget = dock(viewer, PretrainWidget)
    set_training_options(widget, tmp_path / "pre", steps=2)

    def click_and_expect(fragment: str) -> None:
        before = len(messages(notifications, "error"))
        qtbot.mouseClick(widget.button, Qt.LeftButton)
        errors = messages(notifications, "error")[before:]
        assert errors and fragment in errors[-1], errors
        assert not widget.is_running and widget.button.text() == "Pretrain on this image"
        assert shared_state(viewer).running_job is None

    click_and_expect("no image layer")

    rgb = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    viewer.add_image(rgb, name="photo", rgb=True)
    assert widget.image_picker.currentText() == "photo"
    click_and_expect("RGB")

    viewer.add_image(np.zeros((2, 3, 64, 64), np.float32), name="4d")
    widget.image_picker.setCurrentText("4d")
    click_and_expect("2D [Y, X] image or a 3D [Z, Y, X] stack")

    viewer.add_image(np.zeros((64, 64), np.uint8), name="flat")
    widget.image_picker.setCurrentText("flat")
    widget.crop_h.setValue(60)
    click_and_expect("multiple of 8")

    widget.crop_h.setValue(64)
    widget.resume.setChecked(True)
    click_and_expect("nothing to resume")

    # nothing was lost: every layer is still there, unchanged
    assert [layer.name for layer in viewer.layers] == ["photo", "4d", "flat"]
    assert np.array_equal(viewer.layers["photo"].data, rgb)
    assert not (tmp_path / "pre").exists()


def test_loss_plot_draws_the_baseline_where_its_value_lies(qtbot):
    from qtpy.QtGui import QColor

    from napari_affmae.widgets._panels import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(320, 160)
    for step, loss in enumerate([2.0, 1.8, 1.4, 1.2, 1.0], start=1):  # the range is [1.0, 2.0]
        plot.add(step, loss)
    for value in (1.2, 1.3):  # the line sits at their mean, 1.25: a quarter of the range up from the bottom
        plot.add_reference(value)
    assert plot.reference == pytest.approx(1.25)
    image = plot.grab().toImage()
    top, left = plot.MARGIN_TOP, plot.MARGIN_LEFT
    height = plot.height() - top - plot.MARGIN_BOTTOM
    width = plot.width() - left - plot.MARGIN_RIGHT
    background = QColor(image.pixel(left + 2, top + height - 2)).lightness()

    def grey_rows(x0: int, x1: int) -> set[int]:
        """Rows with grey (not the blue / orange curves), clearly lighter than the background, pixels."""
        rows = set()
        for y in range(top + 18, top + height - 2):  # below the labels, above the frame
            for x in range(x0, x1):
                c = QColor(image.pixel(x, y))
                if max(c.red(), c.green(), c.blue()) - min(c.red(), c.green(), c.blue()) < 16 \
                        and c.lightness() > background + 40:
                    rows.add(y)
        return rows

    expected = top + height * 0.75
    rows = grey_rows(left + width // 3, left + width // 3 + 30)  # away from the text label at the top left
    assert rows and all(abs(y - expected) <= 2 for y in rows), (rows, expected)
    plot.clear()
    assert plot.reference is None and plot.steps == []
