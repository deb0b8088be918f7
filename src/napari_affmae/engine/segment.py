"""Tiled inference over any 2D image or 3D stack (slice by slice), with bounded memory.

Each slice is covered by overlapping tiles of ``tile_size`` (multiples of 8). The slice is
reflect-padded by half the overlap (rounded to the 8-pixel patch grid, so every tile sees the
image's own patch grid) so that no image pixel sits on a tile border; the far edges are padded
up to a whole number of tile strides, so any image size works, including sizes that are not
multiples of 8 and images smaller than one tile. Tile logits are weighted by a smooth cosine window and
accumulated; the blended logits are softmax-ed (probabilities) or arg-maxed (labels).

Memory stays bounded whatever the image size: tiles are processed one row of tiles at a time,
the accumulator holds only ``K x tile_height x width`` floats, and every finished strip of rows
is written into the output (numpy array, zarr array or anything with numpy-style slice
assignment) before the next row of tiles is read. Input slices are read strip by strip too, so
a lazily read zarr/dask stack is never loaded whole.

Output: ``"labels"`` -> integer labels with the image's shape (the label value the package stores
for the arg-max class: the values painted for training; 1..K for sparse-label models by default); ``"probabilities"`` -> float32 ``[K, *shape]``
(class axis first).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.normalize import NormalizationStats, compute_stats, slice_stats
from ..data.sampling import as_crop_shape, read_crop
from .device import autocast, resolve_device, resolve_precision
from .settings import DeviceSettings, parse_int_list, parse_size, setting
from .inputs import InputImage, as_input_image, intensity_mismatch
from .package import ModelPackage, load_package
from .progress import CancelToken, JobCancelled, ProgressCallback, ProgressEvent
from .training import emit

log = logging.getLogger(__name__)
OUTPUTS = ("labels", "probabilities")
NORMALIZATIONS = ("package", "image", "slice")
PredictFn = Callable[[torch.Tensor], torch.Tensor]  # [B, 1, th, tw] -> logits [B, K, th, tw]


@dataclass
class SegmentConfig(DeviceSettings):
    """Options of tiled inference. Sizes in pixels; ``overlap`` is a fraction of the tile (0 .. 0.5)."""

    tile_size: tuple[int, int] = setting((256, 256), "tile HxW, multiples of 8", parse=parse_size)
    overlap: float = setting(0.25, "tile overlap as a fraction of the tile")
    batch_size: int = setting(4, "tiles per forward pass")
    output: str = "labels"
    normalization: str = setting("package", "intensity statistics: the package's (its training image; each "
                                 "slice's own for a package trained that way), this image's own, or each slice's "
                                 "own (for stacks whose brightness drifts from slice to slice)",
                                 choices=NORMALIZATIONS)
    slices: Sequence[int] | None = setting(None, "only these z indices (others stay 0)", parse=parse_int_list)

    def __post_init__(self) -> None:
        self.tile_size = as_crop_shape(self.tile_size)
        self.validate()

    def validate(self) -> None:
        th, tw = self.tile_size
        if th % 8 or tw % 8 or th < 32 or tw < 32:
            raise ValueError(f"tile_size must be multiples of 8 and at least 32 x 32; got {th} x {tw}")
        if not 0.0 <= self.overlap <= 0.5:
            raise ValueError(f"overlap is a fraction of the tile between 0 and 0.5; got {self.overlap}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size (tiles per forward pass) must be >= 1; got {self.batch_size}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}; got {self.output!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {self.normalization!r}")


def _aligned_margin(tile: int, overlap: float) -> int:
    """Half the overlap in pixels, rounded down to a multiple of the patch size 8."""
    return 8 * int(tile * overlap / 2 // 8)


def cosine_window(height: int, width: int, floor: float = 1e-3) -> np.ndarray:
    """Separable raised-cosine weights ``[height, width]``, largest in the centre, > 0 everywhere."""
    def one(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        return 0.5 - 0.5 * np.cos(2.0 * np.pi * (i + 0.5) / n)

    return (np.outer(one(height), one(width)) + floor).astype(np.float32)


def output_labels(package: ModelPackage) -> tuple[np.ndarray, np.dtype]:
    """Lookup table class index -> label value written, and the smallest unsigned dtype holding them."""
    values = package.output_values
    dtype = labels_dtype(max(values) if values else 0)
    return np.asarray(values, dtype=dtype), dtype


def labels_dtype(max_label: int) -> np.dtype:
    return np.dtype(np.uint8) if max_label < 256 else np.dtype(np.uint16) if max_label < 65536 else np.dtype(np.uint32)


class TiledPredictor:
    """Blend tile predictions of ``predict`` over slices; writes finished strips through a callback.

    Args:
        predict: ``[B, 1, th, tw]`` float tensor -> logits ``[B, K, th, tw]`` (same device).
        num_classes: K.
        tile_size, overlap, batch_size: as in `SegmentConfig`.
        normalize: raw crop ``[h, w]`` -> float32 normalised crop.
        device: where ``predict`` runs.
    """

    def __init__(self, predict: PredictFn, num_classes: int, tile_size: tuple[int, int], overlap: float,
                 batch_size: int, normalize: Callable[[np.ndarray], np.ndarray], device: torch.device,
                 cancel: CancelToken | None = None, on_batch: Callable[[int], None] | None = None) -> None:
        self.predict = predict
        self.num_classes = num_classes
        self.tile = tile_size
        self.overlap = overlap
        self.batch_size = batch_size
        self.normalize = normalize
        self.device = device
        self.cancel = cancel
        self.on_batch = on_batch
        self.window = cosine_window(*tile_size)  # [th, tw]

    def layout(self, height: int, width: int) -> tuple[int, int, list[int], list[int], int, int]:
        """Margins, tile starts on the padded canvas and the canvas size for a ``height x width`` slice.

        Margins and strides are multiples of the patch size 8, so every tile sees the image's own
        8 x 8 patch grid (a patch model is not equivariant to shifts by a fraction of a patch)."""
        th, tw = self.tile
        margin_y, margin_x = _aligned_margin(th, self.overlap), _aligned_margin(tw, self.overlap)
        stride_y, stride_x = th - 2 * margin_y, tw - 2 * margin_x
        n_y = max(1, math.ceil((height + 2 * margin_y - th) / stride_y) + 1)
        n_x = max(1, math.ceil((width + 2 * margin_x - tw) / stride_x) + 1)
        ys = [i * stride_y for i in range(n_y)]
        xs = [i * stride_x for i in range(n_x)]
        return margin_y, margin_x, ys, xs, ys[-1] + th, xs[-1] + tw

    def tiles_per_slice(self, height: int, width: int) -> int:
        _, _, ys, xs, _, _ = self.layout(height, width)
        return len(ys) * len(xs)

    def run_slice(self, array: Any, z: int, write: Callable[[int, int, np.ndarray], None],
                  row_range: tuple[int, int] | None = None) -> None:
        """Predict slice ``z`` of ``array`` (``[Y, X]`` or ``[Z, Y, X]``); calls ``write(row0, row1, logits)``
        with blended logits ``[K, row1 - row0, X]`` for consecutive strips covering every row (or only
        the image rows ``row_range = (first, stop)``: the same values as a full run, fewer tiles)."""
        height, width = int(array.shape[-2]), int(array.shape[-1])
        th, tw = self.tile
        margin_y, margin_x, ys, xs, canvas_h, canvas_w = self.layout(height, width)
        first_row, stop_row = (0, height) if row_range is None else (max(0, row_range[0]), min(height, row_range[1]))
        if first_row >= stop_row:
            return
        lo, hi = first_row + margin_y, stop_row + margin_y  # wanted canvas rows [lo, hi)
        tile_rows = [i for i, y0 in enumerate(ys) if y0 < hi and y0 + th > lo]
        k = self.num_classes
        acc = np.zeros((k, 0, canvas_w), np.float32)  # rows [buf_start, buf_start + acc.shape[1]) of the canvas
        weight = np.zeros((0, canvas_w), np.float32)
        buf_start = ys[tile_rows[0]]
        for n_row, i in enumerate(tile_rows):
            y0 = ys[i]
            need = y0 + th - buf_start
            if need > acc.shape[1]:
                grow = need - acc.shape[1]
                acc = np.concatenate([acc, np.zeros((k, grow, canvas_w), np.float32)], axis=1)
                weight = np.concatenate([weight, np.zeros((grow, canvas_w), np.float32)], axis=0)
            # canvas rows [y0, y0 + th) = image rows [y0 - margin_y, ...): reflect-padded outside the image
            strip = read_crop(array, z, y0 - margin_y, -margin_x, th, canvas_w, pad_mode="reflect")
            strip = self.normalize(strip)  # [th, canvas_w] float32
            row = y0 - buf_start
            for b0 in range(0, len(xs), self.batch_size):
                if self.cancel is not None and self.cancel.cancelled:
                    raise JobCancelled("segmentation cancelled")
                starts = xs[b0:b0 + self.batch_size]
                batch = np.stack([strip[:, x0:x0 + tw] for x0 in starts])[:, None]  # [b, 1, th, tw]
                logits = self.predict(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
                logits = logits.float().cpu().numpy()  # [b, K, th, tw]
                for x0, tile_logits in zip(starts, logits):
                    acc[:, row:row + th, x0:x0 + tw] += tile_logits * self.window
                    weight[row:row + th, x0:x0 + tw] += self.window
                if self.on_batch is not None:
                    self.on_batch(len(starts))
            last = n_row + 1 == len(tile_rows)
            final_end = canvas_h if last else ys[tile_rows[n_row + 1]]  # rows above are final
            n = final_end - buf_start
            # map canvas rows [buf_start, final_end) to image rows; emit the part that was asked for
            top, bottom = max(buf_start, lo), min(final_end, hi)
            if bottom > top:
                rows = slice(top - buf_start, bottom - buf_start)
                cols = slice(margin_x, margin_x + width)
                blended = acc[:, rows, cols] / weight[None, rows, cols]
                write(top - margin_y, bottom - margin_y, blended)
            acc, weight = acc[:, n:], weight[n:]
            buf_start = final_end

    def tiles_for_rows(self, height: int, width: int, first_row: int, stop_row: int) -> int:
        """Number of tiles `run_slice` evaluates for image rows ``[first_row, stop_row)``."""
        margin_y, _, ys, xs, _, _ = self.layout(height, width)
        lo, hi = first_row + margin_y, stop_row + margin_y
        return sum(1 for y0 in ys if y0 < hi and y0 + self.tile[0] > lo) * len(xs)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    expo = np.exp(shifted)
    return expo / expo.sum(axis=0, keepdims=True)


def _prepare_out(out: Any, shape: tuple[int, ...], config: SegmentConfig, package: ModelPackage) -> Any:
    k = int(package.num_classes)
    if config.output == "labels":
        want_shape, dtype = shape, output_labels(package)[1]
    else:
        want_shape, dtype = (k, *shape), np.dtype(np.float32)
    if out is None:
        return np.zeros(want_shape, dtype)
    if tuple(out.shape) != tuple(want_shape):
        raise ValueError(f"the output array has shape {tuple(out.shape)}; {config.output} of this image need "
                         f"shape {want_shape}")
    if config.output == "labels" and not np.issubdtype(np.dtype(out.dtype), np.integer):
        raise ValueError(f"the output array for labels must have an integer dtype; got {out.dtype}")
    return out


def resolve_package(package: ModelPackage | str | Path) -> ModelPackage:
    if isinstance(package, ModelPackage):
        pkg = package
    else:
        pkg = load_package(package, expect_task="segmentation")
    if pkg.task != "segmentation" or not pkg.num_classes:
        raise ValueError(f"segmentation needs a fine-tuned (segmentation) package; "
                         f"{pkg.path or 'the given package'} is a {pkg.task} package — fine-tune it first")
    return pkg


def model_predictor(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> PredictFn:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return model(x)

    return predict


def segment(package: ModelPackage | str | Path, image: Any, config: SegmentConfig | None = None,
            progress: ProgressCallback | None = None, cancel: CancelToken | None = None, out: Any = None) -> Any:
    """Segment a 2D image ``[Y, X]`` or 3D stack ``[Z, Y, X]`` with a segmentation package.

    Args:
        package: path of a package or a loaded `ModelPackage` (task "segmentation").
        image: path, `ImageData` or array-like (numpy, zarr, dask; read strip by strip).
        config: `SegmentConfig`.
        progress: `ProgressEvent` (job "segment") after every batch of tiles; ``step`` counts tiles.
        cancel: checked before every batch; on cancel `JobCancelled` is raised (the slices already
            finished are in ``out``).
        out: optional array to write into (numpy or zarr, e.g. a labels array on disk); shape
            ``image.shape`` for labels, ``(K, *image.shape)`` for probabilities.

    Returns ``out`` (a new numpy array when none was given).
    """
    config = config or SegmentConfig()
    config.validate()
    started = time.perf_counter()
    pkg = resolve_package(package)
    img = as_input_image(image, what="image")
    shape = img.shape
    device = resolve_device(config.device)
    dtype = resolve_precision(device, config.precision)
    model = pkg.build_model(device)
    normalizer = SliceNormalizer(pkg, img, config.normalization)
    depth = shape[0] if img.ndim == 3 else 1
    z_list = slice_list(config.slices, depth, img.ndim)
    result = _prepare_out(out, shape, config, pkg)
    total_tiles = 0
    done = [0]

    def on_batch(n: int) -> None:
        done[0] += n
        elapsed = time.perf_counter() - started
        rate = done[0] / max(elapsed, 1e-9)
        emit(progress, ProgressEvent("segment", done[0], total_tiles, images_per_s=rate,
                                     eta_s=(total_tiles - done[0]) / max(rate, 1e-9)))

    predictor = TiledPredictor(model_predictor(model, device, dtype), int(pkg.num_classes), config.tile_size,
                               config.overlap, config.batch_size, normalizer.for_slice(z_list[0]), device,
                               cancel=cancel, on_batch=on_batch)
    total_tiles = predictor.tiles_per_slice(shape[-2], shape[-1]) * len(z_list)
    emit(progress, ProgressEvent("segment", 0, total_tiles, message=f"segmenting {len(z_list)} slice(s) of "
                                 f"{shape[-2]} x {shape[-1]} px on {device.type}"))
    warning = intensity_warning(pkg, img, config.normalization)
    if warning:
        log.warning("%s", warning)
        emit(progress, ProgressEvent("segment", 0, total_tiles, message=f"warning: {warning}"))
    lut = output_labels(pkg)[0]
    for z in z_list:
        predictor.normalize = normalizer.for_slice(z)
        predictor.run_slice(img.array, z, _writer(result, z, img.ndim, config.output, lut))
    return result


def intensity_warning(pkg: ModelPackage, img: InputImage, normalization: str) -> str | None:
    """A warning when the image's intensities are far from the package's normalisation statistics (none when
    each slice is normalised by its own)."""
    if normalization != "package" or pkg.stats is None or pkg.normalization_scope == "slice":
        return None
    return intensity_mismatch(compute_stats(img.array), pkg.stats)


class SliceNormalizer:
    """The intensity normalisation of each slice for ``normalization`` (see `SegmentConfig`): the package's
    statistics, the image's, or each slice's own — the last for ``"slice"`` and for ``"package"`` with a
    package trained on per-slice statistics (``normalization_scope == "slice"``)."""

    def __init__(self, pkg: ModelPackage, img: InputImage, normalization: str) -> None:
        self.img, self.pkg = img, pkg
        per_slice = normalization == "slice" or (normalization == "package" and pkg.normalization_scope == "slice")
        self.stats: NormalizationStats | None = None  # the one set for every slice (None: per slice)
        if not per_slice:
            use_image = normalization == "image" or pkg.stats is None
            self.stats = compute_stats(img.array) if use_image else pkg.stats
        self._last: tuple[int, NormalizationStats] | None = None  # the slice asked for last (asked per band)

    def stats_of(self, z: int) -> NormalizationStats:
        """The statistics slice ``z`` is normalised with (per slice: a flat slice takes the package's, else the
        image's, as the live preview does)."""
        if self.stats is not None:
            return self.stats
        if self._last is None or self._last[0] != z:
            plane = self.img.array[z] if self.img.ndim == 3 else self.img.array
            self._last = z, slice_stats(plane, lambda: self.pkg.stats or compute_stats(self.img.array))
        return self._last[1]

    def for_slice(self, z: int) -> Callable[[np.ndarray], np.ndarray]:
        """Raw crop ``[h, w]`` of slice ``z`` -> float32 normalised crop."""
        stats = self.stats_of(z)
        return lambda crop: stats.apply(crop)


def slice_list(slices: Sequence[int] | None, depth: int, ndim: int) -> list[int]:
    """The z indices to segment, checked against the stack depth (all of them when ``slices`` is None)."""
    if slices is None:
        return list(range(depth))
    if ndim == 2:
        if list(slices) not in ([], [0]):
            raise ValueError("slices only apply to 3D stacks; this image is 2D")
        return [0]
    z_list = sorted({int(z) for z in slices})
    bad = [z for z in z_list if not 0 <= z < depth]
    if bad:
        raise ValueError(f"slice indices {bad} are outside the stack of {depth} slices")
    return z_list


def _writer(out: Any, z: int, ndim: int, output: str, lut: np.ndarray) -> Callable[[int, int, np.ndarray], None]:
    def write(row0: int, row1: int, logits: np.ndarray) -> None:
        if output == "labels":
            labels = lut[logits.argmax(axis=0)].astype(out.dtype)  # [rows, X]
            if ndim == 3:
                out[z, row0:row1] = labels
            else:
                out[row0:row1] = labels
        else:
            probs = _softmax(logits).astype(np.float32)  # [K, rows, X]
            if ndim == 3:
                out[:, z, row0:row1] = probs
            else:
                out[:, row0:row1] = probs

    return write


def predicted_labels_to_names(pkg: ModelPackage) -> dict[int, str]:
    """Label value -> class name for a package (for legends and reports)."""
    values = pkg.output_values
    names = pkg.class_names or [f"class {v}" for v in values]
    return dict(zip(values, names))
