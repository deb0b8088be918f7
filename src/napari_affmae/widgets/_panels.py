"""Small building blocks of the dock widgets: progress panel, live loss plot, path fields, run button."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from qtpy.QtCore import QPointF, QRectF, QSize, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..engine import ProgressEvent


def format_duration(seconds: float | None) -> str:
    """``83.2`` -> ``"1:23"``, ``4000`` -> ``"1:06:40"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe(event: ProgressEvent) -> str:
    """One status line for a progress event, e.g. ``step 12/100 · loss 0.431 · 3.1 img/s · ETA 0:45``."""
    parts = []
    if event.total:
        unit = "tiles" if event.job == "segment" else "datasets" if event.job == "batch" else "step"
        parts.append(f"{unit} {event.step}/{event.total}" if unit == "step" else f"{event.step}/{event.total} {unit}")
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4f}")
    if event.images_per_s:
        parts.append(f"{event.images_per_s:.1f} {'tiles' if event.job == 'segment' else 'img'}/s")
    if event.eta_s is not None and event.total and event.step < event.total:
        parts.append(f"ETA {format_duration(event.eta_s)}")
    text = " · ".join(parts)
    if event.message:
        text = f"{text} — {event.message}" if text else event.message
    return text


class RunButton(QPushButton):
    """The prominent start button that reads "Cancel" while its job runs."""

    def __init__(self, label: str, parent: QWidget | None = None) -> None:
        super().__init__(label, parent)
        self.idle_label = label
        self.setMinimumHeight(36)
        font = self.font()
        font.setBold(True)
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.setFont(font)
        self.set_running(False)

    def set_running(self, running: bool) -> None:
        self.setText("Cancel" if running else self.idle_label)
        self.setToolTip("Stop the job at its next step (training saves a checkpoint and a package first)"
                        if running else "")
        self.setEnabled(True)


class ProgressPanel(QWidget):
    """A progress bar, a status line with ETA, and a matching entry in napari's activity dock."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        self._activity: Any = None
        self.description = ""
        self.last_event: ProgressEvent | None = None

    def begin(self, description: str) -> None:
        self.description = description
        self.last_event = None
        self.bar.setRange(0, 0)  # busy until the first event with a total arrives
        self.status.setText(f"{description}: starting…")
        self._close_activity()

    def update_event(self, event: ProgressEvent) -> None:
        self.last_event = event
        if event.total:
            total = int(event.total)
            if self.bar.maximum() != total:
                self.bar.setRange(0, total)
            self.bar.setValue(min(int(event.step), total))
            self._update_activity(event)
        self.status.setText(describe(event))

    def end(self, text: str, *, complete: bool) -> None:
        if complete:
            self.bar.setRange(0, 1)
            self.bar.setValue(1)
        elif self.bar.maximum() == 0:
            self.bar.setRange(0, 1)
            self.bar.setValue(0)
        self.status.setText(text)
        self._close_activity()

    def _update_activity(self, event: ProgressEvent) -> None:
        from napari.utils import progress

        if self._activity is None:
            self._activity = progress(total=int(event.total), desc=f"AFFMAE {self.description}")
        activity = self._activity
        if activity.total != int(event.total):
            activity.total = int(event.total)
        step = min(int(event.step), int(event.total))
        if step != activity.n:
            activity.update(step - activity.n)

    def _close_activity(self) -> None:
        if self._activity is not None:
            self._activity.close()
            self._activity = None


class LossPlot(QWidget):
    """A live loss curve drawn with QPainter (per-step loss and its moving average).

    Painting a polyline costs well under a millisecond, so updating it after every step never
    stalls the viewer (a matplotlib canvas took up to ~0.9 s per redraw on a busy 2-core machine).
    """

    MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 46, 10, 18, 22

    def __init__(self, parent: QWidget | None = None, *, title: str = "training loss", theme: Any = None) -> None:
        super().__init__(parent)
        self.title = title
        background, foreground = _theme_colors(theme)
        self.background, self.foreground = QColor(background), QColor(foreground)
        self.raw_color, self.smooth_color = QColor("#4fa3ff"), QColor("#ffb000")
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.reference_color = QColor("#9aa0a6")
        self.reference_values: list[float] = []  # a baseline loss per step (e.g. the flat-patch predictor's)
        self.reference_label = "flat-patch loss"
        self.setMinimumHeight(130)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt API
        return QSize(300, 140)

    def set_history(self, losses: Sequence[float]) -> None:
        """Replace the curve with ``losses`` (one per step from step 1)."""
        self.losses = [float(v) for v in losses]
        self.steps = list(range(1, len(self.losses) + 1))
        self.update()

    @property
    def reference(self) -> float | None:
        """Mean of the last 50 baseline values: drawn as a dashed line (None: no line)."""
        recent = [v for v in self.reference_values[-50:] if math.isfinite(v)]
        return sum(recent) / len(recent) if recent else None

    def add_reference(self, value: float) -> None:
        """A baseline loss of the current step, e.g. what predicting flat patches would score."""
        self.reference_values.append(float(value))
        self.update()

    def clear(self) -> None:
        self.steps, self.losses, self.reference_values = [], [], []
        self.update()

    def add(self, step: int, loss: float) -> None:
        if self.steps and step <= self.steps[-1]:  # a resumed run restarts the count: keep the curve monotone
            keep = [i for i, s in enumerate(self.steps) if s < step]
            self.steps = [self.steps[i] for i in keep]
            self.losses = [self.losses[i] for i in keep]
        self.steps.append(int(step))
        self.losses.append(float(loss))
        self.update()

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        painter = QPainter(self)
        try:
            self._paint(painter)
        finally:
            painter.end()

    def _paint(self, painter: QPainter) -> None:
        painter.setRenderHint(QPainter.Antialiasing, True)
        painter.fillRect(self.rect(), self.background)
        font = painter.font()
        font.setPointSizeF(max(font.pointSizeF() * 0.8, 6.0))
        painter.setFont(font)
        left, top = self.MARGIN_LEFT, self.MARGIN_TOP
        width = max(self.width() - left - self.MARGIN_RIGHT, 10)
        height = max(self.height() - top - self.MARGIN_BOTTOM, 10)
        box = QRectF(left, top, width, height)
        painter.setPen(QPen(self.foreground, 1))
        painter.drawRect(box)
        painter.drawText(QRectF(0, 0, self.width(), top), Qt.AlignCenter, self.title)
        points = [(s, v) for s, v in zip(self.steps, self.losses) if math.isfinite(v)]
        if not points:
            painter.drawText(box, Qt.AlignCenter, "the loss curve appears here while training")
            return
        reference = self.reference
        values = [v for _, v in points] + ([] if reference is None else [reference])
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 0.5 * max(abs(low), 1e-3), high + 0.5 * max(abs(high), 1e-3)
        last_step = max(points[-1][0], 2)

        def to_xy(step: float, value: float) -> QPointF:
            return QPointF(left + width * step / last_step, top + height * (1.0 - (value - low) / (high - low)))

        for value in (low, high):
            y = to_xy(0, value).y()
            painter.drawText(QRectF(0, y - 8, left - 4, 16), Qt.AlignRight | Qt.AlignVCenter, f"{value:.3g}")
        painter.drawText(QRectF(left, top + height + 2, width, self.MARGIN_BOTTOM - 2), Qt.AlignRight,
                         f"step {points[-1][0]}")
        painter.drawText(QRectF(left, top + height + 2, width, self.MARGIN_BOTTOM - 2), Qt.AlignLeft, "0")
        painter.setClipRect(box)
        smoothed = _ema([v for _, v in points])
        for color, values, pen_width in ((self.raw_color, [v for _, v in points], 1.0),
                                         (self.smooth_color, smoothed, 2.0)):
            painter.setPen(QPen(color, pen_width))
            polygon = QPolygonF([to_xy(step, value) for (step, _), value in zip(points, values)])
            painter.drawPolyline(polygon)
        if reference is not None:
            y = to_xy(0, reference).y()
            painter.setPen(QPen(self.reference_color, 1.5, Qt.DashLine))
            painter.drawLine(QPointF(left, y), QPointF(left + width, y))
        painter.setClipping(False)
        if reference is not None:
            painter.setPen(QPen(self.reference_color, 1))
            painter.drawText(QRectF(left + 4, top + 2, width - 8, 14), Qt.AlignLeft,
                             f"{self.reference_label} {reference:.3g}")
        painter.setPen(QPen(self.raw_color, 1))
        painter.drawText(QRectF(left + 4, top + 2, width - 8, 14), Qt.AlignRight, "per step")
        painter.setPen(QPen(self.smooth_color, 1))
        painter.drawText(QRectF(left + 4, top + 14, width - 8, 14), Qt.AlignRight, "smoothed")


def _ema(values: Sequence[float], alpha: float = 0.15) -> list[float]:
    out, current = [], None
    for value in values:
        current = value if current is None else (1 - alpha) * current + alpha * value
        out.append(current)
    return out


def _theme_colors(theme: Any) -> tuple[str, str]:
    """(background, foreground) hex colours of the napari theme, dark defaults otherwise."""
    try:
        from napari.utils.theme import get_theme

        palette = get_theme(theme or "dark")
        return palette.background.as_hex(), palette.text.as_hex()
    except Exception:  # noqa: BLE001 - cosmetic only
        return "#262930", "#f0f1f2"


class PathEdit(QWidget):
    """A line edit with a Browse button. ``mode``: "dir" (a folder) or "package" (a .affmae file or folder)."""

    changed = Signal(str)

    def __init__(self, mode: str, text: str = "", placeholder: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.mode = mode
        self.edit = QLineEdit(text)
        self.edit.setPlaceholderText(placeholder)
        self.edit.textChanged.connect(self.changed.emit)
        self.user_edited = False
        self.edit.textEdited.connect(self._mark_edited)
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.setToolTip("Browse")
        browse.clicked.connect(self.browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(browse)

    def _mark_edited(self, *_: Any) -> None:
        self.user_edited = True

    def text(self) -> str:
        return self.edit.text().strip()

    def path(self) -> Path | None:
        text = self.text()
        return Path(text).expanduser() if text else None

    def set_text(self, text: str | Path, *, by_user: bool = False) -> None:
        self.edit.setText(str(text))
        self.user_edited = self.user_edited or by_user

    def follow(self, signal: Any, current: Path | None) -> None:
        """Show ``current`` and every path ``signal`` emits later, until the user edits the field."""
        signal.connect(self._follow)
        self._follow(current)

    def _follow(self, path: Path | None) -> None:
        if path is not None and not self.user_edited:
            self.set_text(path)

    def browse(self) -> None:
        start = self.text() or str(Path.home())
        if self.mode == "dir":
            chosen = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, "Choose a model package", start,
                                                    "AFFMAE model package (*.affmae);;All files (*)")
        if chosen:
            self.set_text(chosen, by_user=True)


def form_label(text: str, tooltip: str = "") -> QLabel:
    label = QLabel(text)
    if tooltip:
        label.setToolTip(tooltip)
    return label
