"""Fixtures for the dock-widget tests: a real napari viewer (napari's ``make_napari_viewer``, under
Xvfb), tiny synthetic EM, tiny model packages, captured notifications and an event-loop stall meter.

Run with ``xvfb-run -a python -m pytest tests/widgets``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SHAPE = (2, 72, 96)  # (Z, Y, X): small, non-square
CROP = 64  # training crops / tiles in the tests


@dataclass
class Packages:
    pretrained: Path  # an MAE package (untrained affmae_tiny, written by the engine's package writer)
    segmentation: Path  # a 3-class segmentation package with the image's normalisation statistics


@pytest.fixture(scope="session")
def em_stack() -> tuple[np.ndarray, np.ndarray]:
    """Synthetic EM ``[2, 72, 96]`` uint8 and its dense labels (1 membrane, 2 mitochondrion, 3 cytoplasm)."""
    from napari_affmae.data import synthetic_em

    return synthetic_em(SHAPE, seed=0)


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, em_stack) -> Packages:
    """Model packages made instantly (no training): what the tests check is the widgets' plumbing, and
    every result is compared with the engine run directly on the same package."""
    from napari_affmae.data import CLASS_NAMES, compute_stats
    from napari_affmae.engine import ModelPackage, save_package
    from napari_affmae.models import create_model

    folder = tmp_path_factory.mktemp("packages")
    torch.manual_seed(0)
    mae = create_model("affmae_tiny")
    stats = compute_stats(em_stack[0])
    pretrained = save_package(ModelPackage.from_model(mae, normalization=stats), folder / "pretrained.affmae")
    seg = create_model("affmae_tiny", task="segmentation", num_classes=3)
    segmentation = save_package(ModelPackage.from_model(seg, normalization=stats, class_names=list(CLASS_NAMES)),
                                folder / "segmentation.affmae")
    return Packages(pretrained, segmentation)


@pytest.fixture
def notifications():
    """Every napari notification shown during the test, as (severity, message) pairs."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def record(notification) -> None:
        seen.append((str(notification.severity), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def dock(qtbot):
    """``dock(viewer, WidgetClass)`` -> the widget, docked in the viewer; running jobs are cancelled and
    awaited at the end of the test so no worker outlives its viewer."""
    widgets = []

    def make(viewer, cls):
        widget = cls(viewer)
        viewer.window.add_dock_widget(widget, name=cls.__name__)
        widgets.append(widget)
        return widget

    yield make
    for widget in widgets:
        if widget.is_running:
            widget.runner.cancel()
    for widget in widgets:
        qtbot.waitUntil(lambda w=widget: not w.is_running, timeout=120_000)


def wait_done(qtbot, widget, timeout_s: float = 240.0) -> float:
    """Wait (processing Qt events) until ``widget``'s job has finished; returns the seconds waited."""
    started = time.perf_counter()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=int(timeout_s * 1000))
    return time.perf_counter() - started


class StallMeter:
    """Measures the longest gap between ticks of a QTimer firing every ``interval_ms`` on the GUI thread:
    a blocked event loop (a frozen viewer) shows up as a long gap."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.last: float | None = None
        self.max_gap = 0.0
        self.ticks = 0
        self.started = 0.0
        self.long_gaps: list[tuple[float, float]] = []  # (seconds after start, gap) for gaps > 0.1 s

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            gap = now - self.last
            self.max_gap = max(self.max_gap, gap)
            if gap > 0.1:
                self.long_gaps.append((round(self.last - self.started, 3), round(gap, 3)))
        self.last = now
        self.ticks += 1

    def start(self) -> None:
        self.started = self.last = time.perf_counter()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()
        self._tick()


def messages(seen: list[tuple[str, str]], severity: str | None = None) -> list[str]:
    return [m for s, m in seen if severity is None or s == severity]


def set_training_options(widget, output: Path, steps: int, crop: int = CROP, batch: int = 2) -> None:
    """Tiny, CPU-friendly options for a Pretrain/Fine-tune widget."""
    widget.steps.setValue(steps)
    widget.crop_h.setValue(crop)
    widget.crop_w.setValue(crop)
    widget.batch_size.setValue(batch)
    widget.device.setCurrentText("cpu")
    widget.output.set_text(output, by_user=True)
