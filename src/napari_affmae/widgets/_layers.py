"""Layer helpers for the dock widgets: pickers, input checks, slice/view geometry, result layers."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
from qtpy.QtWidgets import QComboBox, QWidget

# RGBA (0..1) per class value 1, 2, 3, ... shared by painted strokes and results (0 = transparent);
# the same palette as the OME-Zarr labels written by napari_affmae.io
_PALETTE = (
    (1.0, 0.78, 0.0), (0.0, 0.78, 1.0), (0.78, 0.24, 1.0), (0.24, 0.86, 0.24),
    (1.0, 0.31, 0.31), (0.31, 0.31, 1.0), (1.0, 0.55, 0.78), (0.63, 0.63, 0.63),
)


class LayerPicker(QComboBox):
    """A combo box listing the viewer's layers of one kind ("image" or "labels"), kept up to date."""

    def __init__(self, viewer: Any, kind: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.kind = kind
        self.setToolTip(f"{kind.capitalize()} layer to use (layers of this viewer)")
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.moved, events.reordered):
            event.connect(self.refresh)
        self.refresh()

    def _layers(self) -> list[Any]:
        """Layers of this kind, except the Live preview's own (a preview is not an input)."""
        return [layer for layer in self.viewer.layers if is_kind(layer, self.kind)
                and not layer.metadata.get("affmae_live_preview")]

    def refresh(self, *_: Any) -> None:
        current = self.currentText()
        names = [layer.name for layer in self._layers()]
        for layer in self._layers():
            layer.events.name.connect(self.refresh)  # a second connect of the same callback is a no-op
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        elif names and self.kind == "image":
            active = self.viewer.layers.selection.active
            self.setCurrentText(active.name if active is not None and active.name in names else names[-1])
        self.blockSignals(False)
        if current != self.currentText():
            self.currentTextChanged.emit(self.currentText())

    def layer(self) -> Any | None:
        """The chosen layer, or None when there is none."""
        name = self.currentText()
        return next((layer for layer in self._layers() if layer.name == name), None)

    def select(self, name: str) -> None:
        self.refresh()
        self.setCurrentText(name)


def is_kind(layer: Any, kind: str) -> bool:
    """True if ``layer`` is a napari Image (``kind="image"``) or Labels (``kind="labels"``) layer."""
    from napari.layers import Image, Labels

    return isinstance(layer, {"image": Image, "labels": Labels}[kind])


def image_data(layer: Any | None, *, what: str = "image") -> Any:
    """Level-0 array ``[Y, X]`` or ``[Z, Y, X]`` of an image layer, or a ValueError that tells the user what to do."""
    if layer is None:
        raise ValueError(f"no {what} layer: open an EM image first (File > Open, or File > Open Sample > "
                         "AFFMAE > Synthetic EM) and pick it in the widget")
    if not is_kind(layer, "image"):
        raise ValueError(f"layer '{layer.name}' is a {type(layer).__name__} layer; pick an image layer")
    if getattr(layer, "rgb", False):
        raise ValueError(f"layer '{layer.name}' is an RGB image; AFFMAE needs a single-channel (grayscale) EM "
                         "image. Convert it to grayscale first (e.g. skimage.color.rgb2gray)")
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(int(s) for s in data.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"layer '{layer.name}' has {len(shape)} dimensions {shape}; AFFMAE takes a 2D [Y, X] "
                         "image or a 3D [Z, Y, X] stack. Split channels / time points into separate layers first")
    dtype = np.dtype(data.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"layer '{layer.name}' has dtype {dtype}; expected integer or float intensities")
    if min(shape[-2:]) < 8:
        raise ValueError(f"layer '{layer.name}' is only {shape[-2]} x {shape[-1]} pixels; AFFMAE needs at least "
                         "8 x 8 (better 64 x 64 or more)")
    return data


def labels_data(layer: Any | None, image_shape: Sequence[int], image_name: str) -> np.ndarray:
    """Level-0 labels of a labels layer, checked against the image shape (a copy: the user may keep painting)."""
    if layer is None:
        raise ValueError("no labels layer: press 'Add labels layer for painting' and paint a few strokes of at "
                         "least two classes")
    data = layer.data[0] if layer.multiscale else layer.data
    if tuple(data.shape) != tuple(image_shape):
        raise ValueError(f"labels layer '{layer.name}' has shape {tuple(data.shape)} but image '{image_name}' has "
                         f"shape {tuple(image_shape)}; paint on a labels layer of the image's shape (press 'Add "
                         "labels layer for painting')")
    return np.array(data, copy=True)


def painted_classes(labels: np.ndarray) -> list[int]:
    """Label values > 0 present in ``labels`` (bincount: fast for the usual small label values)."""
    if labels.size == 0:
        return []
    top = int(labels.max())
    if int(labels.min()) < 0:
        raise ValueError("labels must be >= 0 (0 = unpainted, classes 1..K)")
    if top < 1 << 16:
        counts = np.bincount(labels.ravel().astype(np.int64, copy=False), minlength=top + 1)
        return [int(v) for v in np.nonzero(counts)[0] if v > 0]
    return [int(v) for v in np.unique(labels) if v > 0]


def current_slice(viewer: Any, layer: Any) -> int | None:
    """Index of the z slice of ``layer`` that the viewer shows (None for a 2D layer)."""
    if layer.ndim < 3:
        return None
    data = layer.data[0] if layer.multiscale else layer.data
    position = layer.world_to_data(viewer.dims.point)
    return int(np.clip(round(float(position[-3])), 0, data.shape[-3] - 1))


def visible_region(viewer: Any, layer: Any, minimum: int = 32) -> tuple[slice, slice]:
    """Rows and columns of ``layer`` (level 0) visible in the canvas, at least ``minimum`` pixels each way."""
    data = layer.data[0] if layer.multiscale else layer.data
    height, width = int(data.shape[-2]), int(data.shape[-1])
    canvas_h, canvas_w = viewer.canvas.size
    zoom = float(viewer.camera.zoom)
    cy, cx = viewer.camera.center[-2:]
    half_h, half_w = canvas_h / zoom / 2.0, canvas_w / zoom / 2.0
    point = np.array(viewer.dims.point, dtype=float)
    corners = []
    for dy, dx in ((-half_h, -half_w), (half_h, half_w)):
        world = point.copy()
        world[-2:] = (cy + dy, cx + dx)
        corners.append(layer.world_to_data(world)[-2:])
    (y0, x0), (y1, x1) = corners
    rows = _span(min(y0, y1), max(y0, y1), height, minimum)
    cols = _span(min(x0, x1), max(x0, x1), width, minimum)
    return rows, cols


def _span(lo: float, hi: float, size: int, minimum: int) -> slice:
    start, stop = max(0, int(np.floor(lo))), min(size, int(np.ceil(hi)) + 1)
    if stop - start < minimum:
        centre = (start + stop) // 2 if stop > start else int(np.clip((lo + hi) / 2, 0, size))
        start = int(np.clip(centre - minimum // 2, 0, max(size - minimum, 0)))
        stop = min(size, start + minimum)
    return slice(start, stop)


def label_colormap(num_classes: int, values: Sequence[int] | None = None) -> Any:
    """A napari DirectLabelColormap: class ``v`` (1..K) gets palette colour ``v``, 0 is transparent.

    ``values``: further label values to colour, when they are not 1..K (a package trained on e.g.
    {1, 60000}); value ``v`` gets palette colour ``v``, as in the OME-Zarr labels written by io."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[Any, Any] = {None: (0.5, 0.5, 0.5, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
    extra = [int(v) for v in values or () if int(v) > 0]
    for value in [*range(1, max(num_classes, len(_PALETTE)) + 1), *extra]:
        colors[value] = (*_PALETTE[(value - 1) % len(_PALETTE)], 1.0)
    return DirectLabelColormap(color_dict=colors)


def class_features(names_by_value: Mapping[int, str]) -> dict[str, list[Any]]:
    """Labels-layer features from label value -> class name (shown in the status bar when hovering);
    0 is "unlabelled" unless it is a class itself."""
    values = [int(v) for v in names_by_value]
    names = [str(n) for n in names_by_value.values()]
    if 0 not in values:
        values, names = [0, *values], ["unlabelled", *names]
    return {"index": values, "class": names}


def safe_name(text: str) -> str:
    """A file/group-name friendly version of a layer name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return cleaned or "layer"


def same_geometry(layer: Any) -> dict[str, Any]:
    """Keyword arguments that place a new layer exactly on top of ``layer`` (scale, offset and units)."""
    geometry: dict[str, Any] = {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}
    units = getattr(layer, "units", None)  # napari >= 0.6
    if units is not None:
        geometry["units"] = tuple(str(u) for u in units)
    return geometry
