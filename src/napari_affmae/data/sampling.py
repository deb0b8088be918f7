"""Random 2D crops from any number of 2D/3D images, for pretraining and fine-tuning.

Arrays may be numpy arrays, memory maps, zarr arrays or dask arrays of shape ``[Y, X]`` or
``[Z, Y, X]``; only the crops are read. Crops are rectangles ``crop_size = (height, width)``
(an int means square). Sampling is seeded: the same seed gives the same crops.

* `PatchSampler`: uniform random crops; a source is picked with probability proportional to its
  pixel count, then a slice and a position uniformly.
* `LabeledPatchSampler`: crops around painted pixels of a label array (0 = unlabelled), for
  fine-tuning on sparse strokes; optionally class-balanced so thin or rare classes are seen.

An image smaller than the crop is an error unless ``pad=True`` (reflect padding of the image,
0 = unlabelled for labels).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CropLocation:
    """Where a crop comes from: ``source`` index, slice ``z`` (0 for 2D) and top-left ``(y, x)``.
    With padding, ``y``/``x`` may be negative or the crop may reach past the far edge."""

    source: int
    z: int
    y: int
    x: int


def as_crop_shape(crop_size: int | Sequence[int]) -> tuple[int, int]:
    """``128`` -> ``(128, 128)``; ``(96, 160)`` stays; anything else is a ValueError."""
    if isinstance(crop_size, (int, np.integer)):
        shape = (int(crop_size), int(crop_size))
    else:
        shape = tuple(int(s) for s in crop_size)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"crop_size must be a positive int or (height, width); got {crop_size!r}")
    return shape  # type: ignore[return-value]


def _check_array(array: Any, what: str) -> tuple[int, int, int]:
    """Return ``(Z, Y, X)`` of a 2D/3D array or raise a ValueError naming ``what``."""
    shape = tuple(getattr(array, "shape", ()))
    if len(shape) == 2:
        return (1, int(shape[0]), int(shape[1]))
    if len(shape) == 3:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    raise ValueError(
        f"{what} must be 2D [Y, X] or 3D [Z, Y, X]; got shape {shape}. "
        "Select one channel/time point first (see napari_affmae.io.read_image)."
    )


def read_crop(
    array: Any, z: int, y: int, x: int, height: int, width: int, *, pad_mode: str = "reflect"
) -> np.ndarray:
    """Read the ``height x width`` window with top-left ``(y, x)`` of slice ``z`` as a numpy array.

    Parts of the window outside the image are filled with ``np.pad(mode=pad_mode)`` of what is
    inside ("constant" fills 0). Works for numpy, memmap, zarr and dask arrays, 2D or 3D.
    """
    _, rows, cols = _check_array(array, "array")
    y0, y1 = max(y, 0), min(y + height, rows)
    x0, x1 = max(x, 0), min(x + width, cols)
    if y0 >= y1 or x0 >= x1:
        raise ValueError(f"crop at (y={y}, x={x}) of size {height} x {width} lies outside the {rows} x {cols} image")
    index = (z, slice(y0, y1), slice(x0, x1)) if len(array.shape) == 3 else (slice(y0, y1), slice(x0, x1))
    part = array[index]
    if hasattr(part, "compute"):  # dask
        part = part.compute()
    part = np.array(part)  # own the memory (memmap/zarr views)
    pads = ((y0 - y, y + height - y1), (x0 - x, x + width - x1))
    if any(p for pair in pads for p in pair):
        part = np.pad(part, pads, mode=pad_mode)  # type: ignore[call-overload]
    return part


def _too_small_error(index: int, rows: int, cols: int, crop: tuple[int, int], what: str = "image") -> ValueError:
    return ValueError(
        f"{what} {index} has {rows} x {cols} pixels (Y x X), smaller than the crop "
        f"{crop[0]} x {crop[1]}; reduce the crop size (or pass pad=True to pad the {what})"
    )


class PatchSampler:
    """Seeded random 2D crops ``[height, width]`` from a list of 2D/3D arrays.

    Args:
        arrays: one array or a sequence of arrays, each ``[Y, X]`` or ``[Z, Y, X]``.
        crop_size: int or ``(height, width)``.
        seed: seed of the sampler's own ``numpy.random.Generator``.
        pad: allow images smaller than the crop (reflect padding) instead of raising.
    """

    def __init__(
        self, arrays: Any | Sequence[Any], crop_size: int | Sequence[int], *, seed: int = 0, pad: bool = False
    ) -> None:
        self.arrays = list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]
        if not self.arrays:
            raise ValueError("PatchSampler needs at least one image")
        self.crop_shape = as_crop_shape(crop_size)
        self.pad = pad
        self.shapes = [_check_array(a, f"image {i}") for i, a in enumerate(self.arrays)]
        h, w = self.crop_shape
        for i, (_, rows, cols) in enumerate(self.shapes):
            if (rows < h or cols < w) and not pad:
                raise _too_small_error(i, rows, cols, self.crop_shape)
        sizes = np.array([float(z) * y * x for z, y, x in self.shapes])
        self.weights = sizes / sizes.sum()
        self.rng = np.random.default_rng(seed)

    def sample_locations(self, n: int) -> list[CropLocation]:
        """``n`` random crop locations (advances the sampler's random state)."""
        h, w = self.crop_shape
        sources = self.rng.choice(len(self.arrays), size=n, p=self.weights)
        locations = []
        for s in sources:
            depth, rows, cols = self.shapes[int(s)]
            z = int(self.rng.integers(depth))
            y = int(self.rng.integers(max(rows - h, 0) + 1))
            x = int(self.rng.integers(max(cols - w, 0) + 1))
            locations.append(CropLocation(int(s), z, y, x))
        return locations

    def read(self, location: CropLocation) -> np.ndarray:
        """The crop ``[height, width]`` at ``location`` in the source's dtype."""
        h, w = self.crop_shape
        return read_crop(self.arrays[location.source], location.z, location.y, location.x, h, w)

    def sample(self, n: int) -> np.ndarray:
        """``n`` random crops stacked to ``[n, height, width]``."""
        return np.stack([self.read(loc) for loc in self.sample_locations(n)])


class LabeledPatchSampler:
    """Seeded crops around painted pixels: image crops ``[height, width]`` with matching label crops.

    Args:
        images: one array or a sequence, each ``[Y, X]`` or ``[Z, Y, X]``.
        labels: integer arrays of the same shapes; 0 = unlabelled, painted classes > 0.
        crop_size: int or ``(height, width)``.
        seed: random seed.
        pad: allow images smaller than the crop (image reflect-padded, labels padded with 0).
        balance_classes: pick the class uniformly first, then one of its pixels (helps thin or
            rare classes such as membranes); otherwise every painted pixel is equally likely.
        jitter: random shift of the crop centre, as a fraction of the crop size (< 0.5, so the
            chosen painted pixel always stays inside the crop).
        max_points_per_class: painted positions kept per class (a random subset beyond that, so
            dense labels of big stacks stay cheap).
    """

    def __init__(
        self,
        images: Any | Sequence[Any],
        labels: Any | Sequence[Any],
        crop_size: int | Sequence[int],
        *,
        seed: int = 0,
        pad: bool = False,
        balance_classes: bool = True,
        jitter: float = 0.25,
        max_points_per_class: int = 500_000,
    ) -> None:
        self.images = list(images) if isinstance(images, (list, tuple)) else [images]
        self.labels = list(labels) if isinstance(labels, (list, tuple)) else [labels]
        if len(self.images) != len(self.labels):
            raise ValueError(f"got {len(self.images)} images but {len(self.labels)} label arrays; pass one per image")
        if not self.images:
            raise ValueError("LabeledPatchSampler needs at least one image")
        if not 0.0 <= jitter < 0.5:
            raise ValueError(f"jitter must be in [0, 0.5); got {jitter}")
        self.crop_shape = as_crop_shape(crop_size)
        self.pad, self.balance_classes, self.jitter = pad, balance_classes, jitter
        self.rng = np.random.default_rng(seed)
        self.shapes = []
        h, w = self.crop_shape
        for i, (image, label) in enumerate(zip(self.images, self.labels)):
            shape = _check_array(image, f"image {i}")
            if tuple(label.shape) != tuple(image.shape):
                raise ValueError(
                    f"labels {i} have shape {tuple(label.shape)} but image {i} has shape {tuple(image.shape)}; "
                    "they must match pixel for pixel"
                )
            if not np.issubdtype(np.dtype(label.dtype), np.integer):
                raise ValueError(f"labels {i} must be integers (0 = unlabelled); got dtype {label.dtype}")
            if (shape[1] < h or shape[2] < w) and not pad:
                raise _too_small_error(i, shape[1], shape[2], self.crop_shape)
            self.shapes.append(shape)
        self.points = self._find_painted(max_points_per_class)  # class -> [N, 4] (source, z, y, x)
        if not self.points:
            raise ValueError("the labels contain no painted pixels (all 0 = unlabelled); paint a few strokes per class")
        self.classes: list[int] = sorted(self.points)
        counts = np.array([len(self.points[c]) for c in self.classes], dtype=np.float64)
        self.class_weights = (
            np.full(len(self.classes), 1.0 / len(self.classes)) if balance_classes else counts / counts.sum()
        )

    def _find_painted(self, max_points: int) -> dict[int, np.ndarray]:
        """Positions of painted pixels per class, reading the labels one slice at a time."""
        found: dict[int, list[np.ndarray]] = {}
        for s, label in enumerate(self.labels):
            depth = self.shapes[s][0]
            for z in range(depth):
                plane = label[z] if len(label.shape) == 3 else label[...]
                if hasattr(plane, "compute"):
                    plane = plane.compute()
                plane = np.asarray(plane)
                ys, xs = np.nonzero(plane)
                if ys.size == 0:
                    continue
                values = plane[ys, xs]
                for value in np.unique(values):
                    sel = values == value
                    pts = np.stack(
                        [np.full(sel.sum(), s), np.full(sel.sum(), z), ys[sel], xs[sel]], axis=1
                    ).astype(np.int64)
                    found.setdefault(int(value), []).append(pts)
        points: dict[int, np.ndarray] = {}
        for value, parts in found.items():
            allpts = np.concatenate(parts)
            if len(allpts) > max_points:
                keep = np.sort(self.rng.choice(len(allpts), size=max_points, replace=False))
                allpts = allpts[keep]
            points[value] = allpts
        return points

    def sample_locations(self, n: int) -> list[CropLocation]:
        """``n`` crop locations, each containing one randomly chosen painted pixel."""
        h, w = self.crop_shape
        chosen = self.rng.choice(len(self.classes), size=n, p=self.class_weights)
        locations = []
        for k in chosen:
            pts = self.points[self.classes[int(k)]]
            s, z, py, px = (int(v) for v in pts[self.rng.integers(len(pts))])
            _, rows, cols = self.shapes[s]
            dy = int(self.rng.integers(-int(self.jitter * h), int(self.jitter * h) + 1))
            dx = int(self.rng.integers(-int(self.jitter * w), int(self.jitter * w) + 1))
            y, x = py - h // 2 + dy, px - w // 2 + dx
            # stay inside the image where it is big enough; a smaller image is padded around it
            y = int(np.clip(y, 0, rows - h)) if rows >= h else int(np.clip(y, rows - h, 0))
            x = int(np.clip(x, 0, cols - w)) if cols >= w else int(np.clip(x, cols - w, 0))
            locations.append(CropLocation(s, z, y, x))
        return locations

    def read(self, location: CropLocation) -> tuple[np.ndarray, np.ndarray]:
        """Image crop and label crop ``[height, width]`` at ``location``."""
        h, w = self.crop_shape
        s, z, y, x = location.source, location.z, location.y, location.x
        image = read_crop(self.images[s], z, y, x, h, w, pad_mode="reflect")
        label = read_crop(self.labels[s], z, y, x, h, w, pad_mode="constant")
        return image, label

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` crops: images ``[n, height, width]`` and labels ``[n, height, width]``."""
        pairs = [self.read(loc) for loc in self.sample_locations(n)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
