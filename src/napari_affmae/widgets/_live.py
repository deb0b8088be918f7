"""Live preview panel of the Fine-tune widget: a fast forest retrained on every stroke change.

While the toggle is on, each change of the painted Labels layer (its ``paint`` and ``data``
events) and each change of the viewed slice restarts a debounce timer; when it fires, the strokes
are copied on the GUI thread and `engine.live.LivePreview.update` runs in a napari thread worker
(features of a slice are cached there, so later updates only refit and repredict). One worker runs
at a time: a change that arrives meanwhile cancels the running job (`CancelToken`) and its result
is discarded; only the newest request is run next. Results land in the Labels layer
"<image> live preview" (and, on request, the Image layer "<image> live probabilities"), which the
panel creates and owns; a user's layers are never replaced. Turning the toggle off stops pending
work and frees the feature cache. "Keep live model" saves the fitted forest as a segmentation
package that the Segment and Batch widgets use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..engine import CancelToken, JobCancelled
from ..engine.live import LiveConfig, LivePreview, LiveResult
from ._base import notify
from ._jobs import JobOutcome, _run_job
from ._layers import current_slice, image_data, is_kind, label_colormap, labels_data, same_geometry, visible_region
from ._jobs import hold_gc_freeze
from ._preload import warm_up_live_imports
from ._state import SharedState

log = logging.getLogger(__name__)
DEBOUNCE_MS = 400  # quiet time after the last stroke change before an update starts
KEEP_NAME = "live-preview"  # kept models: <output folder>/live-preview.affmae, live-preview-2.affmae, ...


@dataclass
class LiveSources:
    """What the panel asks its host widget for (all callables run on the GUI thread)."""

    image_layer: Callable[[], Any]  # the chosen image layer or None
    labels_layer: Callable[[], Any]  # the chosen strokes layer or None
    package: Callable[[], Path | None]  # AFFMAE package whose encoder adds features, or None
    class_names: Callable[[], list[str]]
    output_folder: Callable[[], Path | None]  # where "Keep live model" writes


@dataclass
class _Request:
    image_layer: Any
    image: Any
    labels: np.ndarray
    z: int
    region: tuple[int, int, int, int] | None
    key: tuple[Any, ...]
    config: LiveConfig


def keep_path(folder: Path, stem: str = KEEP_NAME) -> Path:
    """``folder/stem.affmae``, or the first ``stem-N.affmae`` that does not exist yet (never overwrites)."""
    path = folder / f"{stem}.affmae"
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}.affmae"
        n += 1
    return path


class LivePanel(QWidget):
    """Toggle, probabilities option, "Keep live model" button and a status line, plus the update loop."""

    def __init__(self, viewer: Any, state: SharedState, sources: LiveSources, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        warm_up_live_imports()  # now, not in the first update's worker (see _preload)
        self.viewer = viewer
        self.state = state
        self.sources = sources
        self.options: dict[str, Any] = {}  # extra LiveConfig fields (e.g. trees=20 in tests)
        self.toggle = QCheckBox("Live preview")
        self.toggle.setToolTip("Retrain a fast random forest on cached per-slice features after every stroke and "
                               "show its prediction of the current slice (seconds, not minutes)")
        self.probabilities = QCheckBox("probabilities")
        self.probabilities.setToolTip("Also show the class probabilities as an image layer")
        self.encoder_features = QCheckBox("AFFMAE features")
        self.encoder_features.setToolTip("Add the pretrained package's encoder features to the filter features. Off "
                                         "by default: with CPU-pretrained packages they lowered held-out IoU "
                                         "(docs/live-preview.md)")
        self.keep_button = QPushButton("Keep live model")
        self.keep_button.setToolTip("Save the fast model as a segmentation package (Segment and Batch can run it "
                                    "over a whole stack)")
        self.keep_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.toggle)
        row.addWidget(self.probabilities)
        row.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.encoder_features)
        layout.addWidget(self.status)
        layout.addWidget(self.keep_button)

        self.preview: LivePreview | None = None  # created lazily in the worker, dropped when turned off
        self.preview_layer: Any = None
        self.probability_layer: Any = None
        self.last_result: LiveResult | None = None
        self.updates = 0  # results shown
        self.discarded = 0  # results of stale jobs thrown away
        self._key: tuple[Any, ...] | None = None
        self._generation = 0  # bumped by every change; a result is shown only if it is the newest
        self._worker: Any = None
        self._token: CancelToken | None = None
        self._tokens: list[CancelToken] = []  # plain Python: cancelled when the panel is destroyed
        holder = id(self)
        self.destroyed.connect(lambda *_, tokens=self._tokens: ([t.cancel() for t in tokens],
                                                                hold_gc_freeze(holder, False)))
        self._pending = False
        self._keep_request = False
        self._shown: tuple[Any, ...] | None = None  # ([z,] y0, y1, x0, x1) last drawn in the preview layer
        self._probabilities_shown: tuple[Any, ...] | None = None
        self._last_problem = ""
        self._watched: Any = None  # the strokes layer whose events are connected
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._fire)
        self.toggle.toggled.connect(self._toggled)
        self.probabilities.toggled.connect(self.schedule)
        self.encoder_features.toggled.connect(self.schedule)
        self.keep_button.clicked.connect(self.keep)
        viewer.dims.events.current_step.connect(self._view_changed)
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
        camera.events.center.connect(self._view_changed)
        camera.events.zoom.connect(self._view_changed)
        view_events, handler = (viewer.dims.events.current_step, camera.events.center, camera.events.zoom), \
            self._view_changed
        self.destroyed.connect(lambda *_: [event.disconnect(handler) for event in view_events])

    # ------------------------------------------------------------------ public
    @property
    def enabled(self) -> bool:
        return self.toggle.isChecked()

    @property
    def busy(self) -> bool:
        """A worker (update or save) is running."""
        return self._worker is not None

    def watch(self, *_: Any) -> None:
        """(Re)connect to the chosen strokes layer; the host calls this when its labels choice changes."""
        layer = self.sources.labels_layer() if self.enabled else None
        if layer is self._watched:
            return
        if self._watched is not None:
            for event in (self._watched.events.paint, self._watched.events.data):
                event.disconnect(self.schedule)
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self.schedule)
            layer.events.data.connect(self.schedule)
        self.schedule()

    def schedule(self, *_: Any) -> None:
        """Something changed: (re)start the debounce timer; the update starts when it has been quiet."""
        if self.enabled:
            self._generation += 1
            self._timer.start()

    def stop(self) -> None:
        """Cancel pending work, forget the model and free the feature cache (now, or when the worker returns)."""
        self._timer.stop()
        self._pending = False
        self._keep_request = False
        self._generation += 1
        if self._token is not None:
            self._token.cancel()
        if not self.busy:
            self._drop_preview()
        self.keep_button.setEnabled(False)

    def keep(self) -> Path | None:
        """Save the fitted live model as a package (a new file, never an existing one); returns its path
        (written when the running update, if any, has finished)."""
        if self.preview is None or not self.preview.fitted:
            notify("warning", "Keep live model: nothing to keep yet; turn on Live preview and paint strokes of "
                              "two classes first")
            return None
        self._keep_request = True
        if not self.busy:
            return self._start_save()
        self.status.setText("Saving the live model after the running update…")
        return None

    # ------------------------------------------------------------------ reactions
    def _toggled(self, on: bool) -> None:
        hold_gc_freeze(id(self), on)
        if on:
            self._last_problem = ""
            self.watch()
            self._timer.stop()
            self._fire()  # the first update starts at once
        else:
            self.watch()  # disconnects
            self.stop()
            self.status.setText("Live preview off; feature cache freed.")

    def _view_changed(self, *_: Any) -> None:
        """A new slice, or (for slices too large to featurise whole) a new view, needs a new prediction."""
        if not self.enabled or self.last_result is None:
            return
        layer = self.sources.image_layer()
        if layer is None or layer not in list(self.viewer.layers):
            return
        z = current_slice(self.viewer, layer)
        if (z is not None and z != self.last_result.z) or self._region(layer) is not None:
            self.schedule()

    def _problem(self, message: str) -> None:
        """Tell the user once per distinct problem (a stroke later does not repeat the same message)."""
        self.status.setText(f"Live preview: {message}")
        if message != self._last_problem:
            notify("warning", f"Live preview: {message}")
        self._last_problem = message

    # ------------------------------------------------------------------ jobs
    def _fire(self) -> None:
        if not self.enabled:
            return
        if self.busy:
            if self._token is not None:
                self._token.cancel()  # stale: the newest strokes win
            self._pending = True
            return
        self._start_update()

    def _region(self, layer: Any) -> tuple[int, int, int, int] | None:
        data = layer.data[0] if layer.multiscale else layer.data
        limit = LiveConfig(**self.options).max_window_pixels
        if int(data.shape[-2]) * int(data.shape[-1]) <= limit:
            return None
        rows, cols = visible_region(self.viewer, layer)
        return rows.start, rows.stop, cols.start, cols.stop

    def _request(self) -> _Request:
        """The inputs of one update, read on the GUI thread (strokes copied: painting may go on)."""
        layer = self.sources.image_layer()
        image = image_data(layer)
        labels = labels_data(self.sources.labels_layer(), image.shape, layer.name)
        package = self.sources.package() if self.encoder_features.isChecked() else None
        config = LiveConfig(package=package, **self.options)
        key = (id(layer), id(image), str(package), tuple(sorted(self.options.items())))
        z = current_slice(self.viewer, layer)
        return _Request(layer, image, labels, 0 if z is None else z, self._region(layer), key, config)

    def _start_update(self) -> None:
        self._pending = False
        try:
            request = self._request()
        except ValueError as err:
            self._problem(str(err))
            return
        if request.key != self._key:
            self._drop_preview()
            self._key = request.key
        preview, generation, probabilities = self.preview, self._generation, self.probabilities.isChecked()

        def work(progress: Callable[..., None], cancel: CancelToken) -> tuple[LivePreview | None, Any]:
            made = preview
            try:
                if made is None:
                    made = LivePreview(request.image, request.config)
                return made, made.update(request.labels, z=request.z, region=request.region,
                                         probabilities=probabilities, cancel=cancel)
            except JobCancelled as err:
                err.result = (made, None)
                raise
            except ValueError as err:  # bad strokes or image: a message for the user, the features stay cached
                return made, err

        self._start("Live preview", work, lambda outcome: self._update_done(outcome, request, generation))
        self.status.setText(f"Live preview: updating slice {request.z}…" if request.image.ndim == 3
                            else "Live preview: updating…")

    def _start(self, name: str, work: Callable[..., Any], done: Callable[[JobOutcome], None]) -> None:
        from napari.qt.threading import create_worker

        token = CancelToken()
        worker = create_worker(_run_job, name, work, lambda event: None, token, _start_thread=False)
        worker.returned.connect(lambda outcome: self._finished(outcome, done))
        self._worker, self._token = worker, token
        self._tokens[:] = [token]
        worker.start()

    def _finished(self, outcome: JobOutcome, done: Callable[[JobOutcome], None]) -> None:
        self._worker, self._token = None, None
        self._tokens.clear()
        if _deleted(self):  # the viewer was closed meanwhile
            return
        try:
            done(outcome)
        except Exception as err:  # noqa: BLE001 - showing a preview must never take the widget down
            log.warning("showing the live preview failed", exc_info=True)
            notify("error", f"Live preview: could not show the result: {err}")
        if not self.enabled:
            self._drop_preview()
        elif self._keep_request:
            self._start_save()
        elif self._pending:
            self._start_update()

    def _update_done(self, outcome: JobOutcome, request: _Request, generation: int) -> None:
        if outcome.error is not None:
            self._problem(f"the update failed: {outcome.error}")
            return
        made, result = outcome.result if outcome.result is not None else (None, None)
        if made is not None and self.enabled and request.key == self._key:
            self.preview = made  # keeps the cached features even when the result itself is stale
        if outcome.cancelled or generation != self._generation:
            self.discarded += 1  # a newer change is waiting (debounce timer or pending flag)
            return
        if isinstance(result, ValueError):
            self._problem(str(result))
            return
        if request.image_layer not in list(self.viewer.layers):
            return
        self._show(request, result)

    def _start_save(self) -> Path | None:
        self._keep_request = False
        preview = self.preview
        if preview is None or not preview.fitted:
            return None
        folder = self.sources.output_folder() or Path.home() / "affmae-runs"
        path = keep_path(folder)
        names = self.sources.class_names()

        def work(progress: Callable[..., None], cancel: CancelToken) -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            return preview.save(path, names)

        self._start("Keeping the live model", work, self._save_done)
        self.status.setText(f"Saving the live model to {path}…")
        return path

    def _save_done(self, outcome: JobOutcome) -> None:
        if not outcome.ok:
            self._problem(f"could not save the live model: {outcome.error}")
            return
        path = Path(outcome.result)
        self.state.segmentation_package = path  # the Segment and Batch widgets pick it up
        self.status.setText(f"Live model saved: {path}")
        notify("info", f"Live model saved at {path}; the Segment and Batch widgets use it now")

    # ------------------------------------------------------------------ layers
    def _drop_preview(self) -> None:
        if self.preview is not None:
            self.preview.clear()
        self.preview = None
        self._key = None

    def _own_layer(self, layer: Any, kind: str, shape: tuple[int, ...]) -> bool:
        return (layer is not None and layer in list(self.viewer.layers) and is_kind(layer, kind)
                and not layer.multiscale and tuple(layer.data.shape) == shape)

    def _show(self, request: _Request, result: LiveResult) -> None:
        image_layer = request.image_layer
        shape = tuple(int(s) for s in request.image.shape)
        names = self.sources.class_names()
        num = max(len(names), int(result.labels.max()))
        y0, y1, x0, x1 = result.region
        z = request.z if len(shape) == 3 else None
        where = (y0, y1, x0, x1) if z is None else (z, y0, y1, x0, x1)
        layer = self.preview_layer
        if not self._own_layer(layer, "labels", shape) or not np.can_cast(result.labels.dtype, layer.data.dtype):
            if layer is not None and layer in list(self.viewer.layers):  # ours, too small for these label values
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_labels(np.zeros(shape, result.labels.dtype), name=f"{image_layer.name} live preview",
                                           opacity=0.5, colormap=label_colormap(num),
                                           metadata={"affmae_live_preview": True}, **same_geometry(image_layer))
            self.viewer.layers.move(self.viewer.layers.index(layer), self.viewer.layers.index(image_layer) + 1)
            self.preview_layer, self._shown = layer, None
        if self._shown is not None:
            layer.data[_index(self._shown)] = 0
        layer.data[_index(where)] = result.labels
        layer.metadata["class_names"] = names[:num]
        layer.refresh()
        self._shown = where
        if result.probabilities is not None:
            self._show_probabilities(request, result, where, shape)
        strokes = self.sources.labels_layer()
        if strokes is not None and self.viewer.layers.selection.active is layer:
            self.viewer.layers.selection.active = strokes  # keep painting on the strokes, not the preview
        self.last_result = result
        self.updates += 1
        self._last_problem = ""
        self.keep_button.setEnabled(True)
        timings = result.timings
        cache_mb = self.preview.cache_bytes / 2**20 if self.preview is not None else 0.0
        slice_text = f"slice {request.z}, " if z is not None else ""
        self.status.setText(f"Live preview: {slice_text}{result.n_painted} painted px, "
                            f"{timings['total_s']:.1f} s (fit {timings['fit_s']:.1f} s, predict "
                            f"{timings['predict_s']:.1f} s); feature cache {cache_mb:.0f} MB")

    def _show_probabilities(self, request: _Request, result: LiveResult, where: tuple[int, ...],
                            shape: tuple[int, ...]) -> None:
        probs = result.probabilities
        full_shape = (int(probs.shape[0]), *shape)
        layer = self.probability_layer
        if not self._own_layer(layer, "image", full_shape):
            if layer is not None and layer in list(self.viewer.layers):
                self.viewer.layers.remove(layer)  # ours, made for another number of classes
            geometry = same_geometry(request.image_layer)
            geometry["scale"] = (1.0, *geometry["scale"])
            geometry["translate"] = (0.0, *geometry["translate"])
            if "units" in geometry:
                geometry["units"] = ("pixel", *geometry["units"])
            layer = self.viewer.add_image(np.zeros(full_shape, np.float32), name=f"{request.image_layer.name} live "
                                          "probabilities", colormap="magma", contrast_limits=(0.0, 1.0),
                                          opacity=0.6, metadata={"axis 0": "class", "affmae_live_preview": True},
                                          **geometry)
            self.probability_layer, self._probabilities_shown = layer, None
        if self._probabilities_shown is not None:
            layer.data[(slice(None), *_index(self._probabilities_shown))] = 0.0
        layer.data[(slice(None), *_index(where))] = probs
        layer.metadata["class_names"] = self.sources.class_names()[:full_shape[0]]
        layer.refresh()
        self._probabilities_shown = where


def _deleted(widget: QWidget) -> bool:
    """True when the Qt side of ``widget`` is gone (its dock or viewer was closed)."""
    try:
        widget.objectName()
    except RuntimeError:
        return True
    return False


def _index(where: tuple[int, ...]) -> tuple[Any, ...]:
    """(y0, y1, x0, x1) or (z, y0, y1, x0, x1) -> an index into the layer's data."""
    *z, y0, y1, x0, x1 = where
    return (*z, slice(y0, y1), slice(x0, x1))
