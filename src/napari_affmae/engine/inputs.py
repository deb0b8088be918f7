"""Turn what a caller passes (paths, `ImageData`, numpy/zarr/dask arrays) into checked 2D/3D arrays.

Arrays stay lazy (zarr, dask, memmap): nothing here reads pixels except the small label checks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.normalize import NormalizationStats, compute_stats


@dataclass
class InputImage:
    """A 2D ``[Y, X]`` or 3D ``[Z, Y, X]`` array-like plus what is known about it."""

    array: Any
    source: str | None = None
    pixel_size: dict[str, float] | None = None
    unit: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def as_input_image(item: Any, *, what: str = "image", axes: str | None = None, channel: int | None = None,
                   timepoint: int | None = None) -> InputImage:
    """Open a path or check an array with `napari_affmae.io.read_image` (TIFF, OME-Zarr, .npy, numpy,
    zarr, dask). A 4D+ array needs ``axes`` (and ``channel``/``timepoint``) to say what to keep."""
    from ..io import read_image  # noqa: PLC0415
    from ..io.image import ImageData  # noqa: PLC0415

    if isinstance(item, InputImage):
        return item
    if isinstance(item, ImageData):
        return _from_image_data(item, what)
    if not isinstance(item, (str, os.PathLike)) and not (hasattr(item, "shape") and hasattr(item, "dtype")):
        raise ValueError(f"{what}: expected a path or a numpy/zarr/dask array; got {type(item).__name__}")
    return _from_image_data(read_image(item, **_read_kwargs(axes, channel, timepoint)), what)


def _read_kwargs(axes: str | None, channel: int | None, timepoint: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if axes is not None:
        kwargs["axes"] = axes
    if channel is not None:
        kwargs["channel"] = channel
    if timepoint is not None:
        kwargs["timepoint"] = timepoint
    return kwargs


def _from_image_data(data: Any, what: str) -> InputImage:
    array = data.array
    if len(array.shape) not in (2, 3):
        raise ValueError(f"{what}: expected a 2D or 3D image after reading; got shape {tuple(array.shape)} "
                         f"(axes {data.axes!r})")
    _check_dtype(array, what)
    return InputImage(array=array, source=data.source, pixel_size=data.pixel_size, unit=data.unit)


def _check_dtype(array: Any, what: str) -> None:
    dtype = np.dtype(array.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"{what}: expected integer or float intensities; got dtype {dtype}")


def as_label_array(item: Any, image: InputImage, *, what: str = "labels") -> Any:
    """Open/check a label array: integer, same shape as ``image``."""
    from ..io import read_image  # noqa: PLC0415

    if isinstance(item, (str, os.PathLike)):
        item = read_image(item).array
    elif hasattr(item, "array") and hasattr(item, "axes"):
        item = item.array
    if not hasattr(item, "shape"):
        raise ValueError(f"{what}: expected a path or an integer array; got {type(item).__name__}")
    if tuple(item.shape) != image.shape:
        raise ValueError(f"{what} shape {tuple(item.shape)} does not match the image shape {image.shape}; paint the "
                         "labels on the same image (same Z, Y, X size)")
    dtype = np.dtype(item.dtype)
    if not np.issubdtype(dtype, np.integer):
        if np.issubdtype(dtype, np.floating):
            values = np.asarray(item[...] if not hasattr(item, "compute") else item.compute())
            if np.all(np.mod(values, 1) == 0) and values.min() >= 0:
                return values.astype(np.int64)
        raise ValueError(f"{what}: expected integer labels (0 = unlabelled, classes 1..K); got dtype {dtype}")
    return item


MIN_CROP = 32  # smallest training crop side in pixels


def check_crop_fits(images: list[InputImage], crop_size: tuple[int, int], names: list[str] | None = None) -> None:
    """Refuse images smaller than one training crop (they would train on padding), naming the sizes."""
    h, w = crop_size
    for i, img in enumerate(images):
        name = (names or [])[i] if names and i < len(names) else source_name(img, i)
        ih, iw = img.shape[-2], img.shape[-1]
        if ih < MIN_CROP or iw < MIN_CROP:
            raise ValueError(f"{name}: {ih} x {iw} px is smaller than the minimum training crop of {MIN_CROP} x "
                             f"{MIN_CROP} px; train on an image of at least {MIN_CROP} x {MIN_CROP} px")
        if ih < h or iw < w:
            fit = f"{max(MIN_CROP, ih // 8 * 8)}x{max(MIN_CROP, iw // 8 * 8)}"
            raise ValueError(f"{name}: {ih} x {iw} px is smaller than one {h} x {w} training crop; use --crop-size "
                             f"{fit} or smaller (at least {MIN_CROP}) or a larger image")


def check_has_contrast(stats: NormalizationStats, name: str) -> None:
    """Refuse an image whose sampled pixels are all equal (e.g. all zero): there is nothing to learn."""
    if stats.std == 0 and stats.high <= stats.low:
        raise ValueError(f"{name}: every sampled pixel has the value {stats.low:g} (an empty or constant image); "
                         "check that the right file, channel or time point was given")


def intensity_mismatch(image_stats: NormalizationStats, reference: NormalizationStats) -> str | None:
    """A warning when an image's dtype or intensity range is far from the statistics a model was trained
    with (its normalised intensities would then lie far outside 0..1), else None."""
    span = max(reference.high - reference.low, 1e-12)
    low = (image_stats.low - reference.low) / span  # the image's range in the model's normalised units
    high = (image_stats.high - reference.low) / span
    if not (high < 0.1 or low > 0.9 or (high - low) > 4.0 or (high - low) < 0.125):
        return None
    return (f"this image ({image_stats.dtype}, intensities {image_stats.low:.4g}..{image_stats.high:.4g}) differs from "
            f"the model's training data ({reference.dtype}, {reference.low:.4g}..{reference.high:.4g}); the result may "
            "be wrong (e.g. one class everywhere): convert the image, or use the image's own normalisation "
            "(--normalization image)")


def image_pixel_size(image: InputImage) -> list[float] | None:
    if not image.pixel_size:
        return None
    axes = "zyx"[-image.ndim:]
    return [float(image.pixel_size.get(a, 1.0)) for a in axes]


def combined_stats(images: list[InputImage], seed: int = 0) -> tuple[NormalizationStats, list[NormalizationStats]]:
    """Per-image robust statistics and their average (stored in packages as the reference)."""
    per_image = [compute_stats(img.array, seed=seed) for img in images]
    if len(per_image) == 1:
        return per_image[0], per_image
    first = per_image[0]
    mean = lambda name: float(np.mean([getattr(s, name) for s in per_image]))  # noqa: E731
    merged = NormalizationStats(low=mean("low"), high=mean("high"), mean=mean("mean"), std=mean("std"),
                                low_percentile=first.low_percentile, high_percentile=first.high_percentile,
                                dtype=first.dtype, n_samples=int(sum(s.n_samples for s in per_image)))
    return merged, per_image


def source_name(image: InputImage, index: int) -> str:
    return Path(image.source).name if image.source else f"array{index}"
