"""Segmentation jobs shared by the Segment and Fine-tune widgets, and putting their results into layers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..engine import CancelToken, ProgressEvent, SegmentConfig, load_package, segment
from ..engine.segment import output_labels, predicted_labels_to_names
from ._layers import class_features, current_slice, label_colormap, same_geometry, visible_region

SCOPES = ("whole", "slice", "view")


@dataclass
class SegmentationResult:
    """What a segmentation job hands back to the GUI thread.

    ``labels``: integer array of the segmented part (the whole image, one slice ``[Y, X]`` or one
    view ``[h, w]``); ``probabilities``: float32 ``[K, ...]`` of the same part, or None; ``region``:
    where the part sits in the level-0 image (None = the whole image); ``names_by_value``: label value
    written -> class name, in class order (the package's ``label_values``, e.g. {1, 60000}).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    region: tuple[Any, ...] | None
    names_by_value: dict[int, str]
    package_path: Path
    description: str

    @property
    def class_names(self) -> list[str]:
        """Class names in class order (the probability channels' order)."""
        return list(self.names_by_value.values())


def plan_region(viewer: Any, layer: Any, data: Any, scope: str) -> tuple[Any, tuple[Any, ...] | None, str]:
    """The part of ``data`` to segment for ``scope`` ("whole" | "slice" | "view"):
    (array to segment, its region in ``data`` or None for all of it, a description)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    if scope == "whole":
        what = f"{data.shape[0]} slices" if data.ndim == 3 else "the image"
        return data, None, what
    z = current_slice(viewer, layer)
    if scope == "slice":
        if z is None:
            return data, None, "the image"
        return data[z], (z,), f"slice {z}"
    rows, cols = visible_region(viewer, layer)
    region = (rows, cols) if z is None else (z, rows, cols)
    where = f"rows {rows.start}-{rows.stop}, columns {cols.start}-{cols.stop}"
    return data[region], region, (where if z is None else f"slice {z}, {where}")


def segmentation_job(package_path: Path, part: Any, config: SegmentConfig, with_probabilities: bool,
                     region: tuple[Any, ...] | None, description: str
                     ) -> Callable[[Callable[[ProgressEvent], None], CancelToken], SegmentationResult]:
    """A worker-thread function that segments ``part`` (and, if asked, keeps the class probabilities)."""

    def work(progress: Callable[[ProgressEvent], None], cancel: CancelToken) -> SegmentationResult:
        package = load_package(package_path)
        if package.task != "segmentation":
            raise ValueError(f"{package_path} is a pretraining (MAE) package; segmenting needs a fine-tuned "
                             "package: fine-tune first (Fine-tune widget), then use its segmentation.affmae")
        probabilities = None
        if with_probabilities:
            cfg = dataclasses.replace(config, output="probabilities")
            probabilities = segment(package, part, cfg, progress=progress, cancel=cancel)  # [K, ...]
            labels = output_labels(package)[0][probabilities.argmax(axis=0)]  # the values trained on
        else:
            labels = segment(package, part, config, progress=progress, cancel=cancel)
        return SegmentationResult(np.asarray(labels), probabilities, region, predicted_labels_to_names(package),
                                  Path(package_path), description)

    return work


def show_segmentation(viewer: Any, image_layer: Any, result: SegmentationResult) -> Any:
    """Put ``result`` into the Labels layer "<image> segmentation" (created with the image's shape and
    placement if needed; an existing one of the right shape is updated in place, so segmenting slice
    by slice fills one layer; one whose dtype cannot hold the label values is recreated with a wider
    dtype, its other content kept). Adds/updates "<image> probabilities" too when there are any.
    Returns the Labels layer."""
    data = image_layer.data[0] if image_layer.multiscale else image_layer.data
    shape = tuple(int(s) for s in data.shape)
    name = f"{image_layer.name} segmentation"
    target = _existing(viewer, name, "labels", shape)
    values = list(result.names_by_value)
    look = {"colormap": label_colormap(len(values), values), "features": class_features(result.names_by_value)}
    meta = {"class_names": result.class_names, "package": str(result.package_path)}
    if target is not None and not _holds(target.data.dtype, max([0, *values])):
        wider = np.result_type(target.data.dtype, result.labels.dtype)
        earlier, index = np.asarray(target.data).astype(wider), viewer.layers.index(target)
        viewer.layers.remove(target)
        target = _add_labels(viewer, image_layer, earlier, name, look, {**target.metadata, **meta}, index)
    if target is None:
        full = result.labels if result.region is None else np.zeros(shape, result.labels.dtype)
        if result.region is not None:
            full[result.region] = result.labels
        target = _add_labels(viewer, image_layer, full, name, look, meta, None)
    else:
        region = result.region if result.region is not None else (slice(None),) * len(shape)
        target.data[region] = result.labels.astype(target.data.dtype, copy=False)
        target.metadata.update(meta)
        target.features = look["features"]
        target.colormap = look["colormap"]
        target.refresh()
    if result.probabilities is not None:
        _show_probabilities(viewer, image_layer, shape, result)
    return target


def _show_probabilities(viewer: Any, image_layer: Any, shape: tuple[int, ...], result: SegmentationResult) -> None:
    probs = result.probabilities
    k = probs.shape[0]
    name = f"{image_layer.name} probabilities"
    full_shape = (k, *shape)
    layer = _existing(viewer, name, "image", full_shape)
    region = (slice(None),) + (result.region if result.region is not None else (slice(None),) * len(shape))
    if layer is None:
        full = probs if result.region is None else np.zeros(full_shape, np.float32)
        if result.region is not None:
            full[region] = probs
        geometry = same_geometry(image_layer)
        geometry["scale"] = (1.0, *geometry["scale"])
        geometry["translate"] = (0.0, *geometry["translate"])
        if "units" in geometry:
            geometry["units"] = ("pixel", *geometry["units"])
        viewer.add_image(full, name=name, colormap="magma", contrast_limits=(0.0, 1.0), visible=False,
                         metadata={"class_names": result.class_names, "axis 0": "class"}, **geometry)
    else:
        layer.data[region] = probs
        layer.refresh()


def _holds(dtype: np.dtype, value: int) -> bool:
    """Whether an integer array of ``dtype`` can store label ``value`` (a non-integer one never can)."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max >= value


def _add_labels(viewer: Any, image_layer: Any, data: np.ndarray, name: str, look: dict[str, Any],
                metadata: dict[str, Any], index: int | None) -> Any:
    """A new segmentation Labels layer placed on the image; at ``index``, or just above the image."""
    layer = viewer.add_labels(data, name=name, opacity=0.5, metadata=metadata, **look, **same_geometry(image_layer))
    if index is None and image_layer in list(viewer.layers):  # just above the image: painted strokes stay on top
        index = viewer.layers.index(image_layer) + 1
    if index is not None:
        viewer.layers.move(viewer.layers.index(layer), index)
    return layer


def _existing(viewer: Any, name: str, kind: str, shape: tuple[int, ...]) -> Any | None:
    from ._layers import is_kind

    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    if not is_kind(layer, kind) or layer.multiscale or tuple(layer.data.shape) != shape:
        return None
    return layer
