"""Robust intensity normalisation: statistics computed once, stored with the model, applied to every tile.

`compute_stats` reads a bounded subsample of a possibly huge lazy array (numpy, memmap, zarr, dask):
whole arrays up to ``max_samples`` pixels are used entirely, larger ones through a few random crops
from evenly spaced slices, so it costs a handful of chunk reads. The result is a small frozen
dataclass that round-trips through a JSON-ready dict.

`apply_normalization` maps raw values to float32: ``mode="percentile"`` sends the low/high
percentiles to 0/1 (so most pixels land in ~[0, 1]); ``mode="zscore"`` gives zero mean, unit
variance (mean and std from the same subsample).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import numpy as np

NormMode = Literal["percentile", "zscore"]


@dataclass(frozen=True)
class NormalizationStats:
    """Intensity statistics of an image, in raw units of ``dtype``."""

    low: float  # value at ``low_percentile``
    high: float  # value at ``high_percentile``
    mean: float
    std: float
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    dtype: str = "uint8"  # dtype of the data the stats came from
    n_samples: int = 0  # pixels the stats were computed on

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain floats, ints and strings)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalizationStats:
        """Inverse of `to_dict`; unknown keys are an error so a foreign file is not silently accepted."""
        if not isinstance(data, dict):
            raise ValueError(f"normalisation statistics must be a dict; got {type(data).__name__}")
        fields = set(cls.__dataclass_fields__)
        unknown = set(data) - fields
        missing = {"low", "high", "mean", "std"} - set(data)
        if unknown or missing:
            raise ValueError(
                f"not valid normalisation statistics: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
            )
        stats = cls(**data)
        if not all(math.isfinite(v) for v in (stats.low, stats.high, stats.mean, stats.std)):
            raise ValueError(f"normalisation statistics must be finite numbers; got {data}")
        return stats

    def apply(self, array: Any, mode: NormMode = "percentile", clip: bool = False) -> np.ndarray:
        """Shortcut for `apply_normalization` with these statistics."""
        return apply_normalization(array, self, mode=mode, clip=clip)


def _shape_zyx(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    raise ValueError(f"expected a 2D [Y, X] or 3D [Z, Y, X] image; got shape {shape}")


def _read(array: Any, index: tuple[slice | int, ...]) -> np.ndarray:
    """Read ``array[index]`` into memory whatever the array type (numpy, memmap, zarr, dask)."""
    part = array[index]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part)


def sample_pixels(
    array: Any, max_samples: int = 2_000_000, seed: int = 0, crop: int = 256, max_slices: int = 16
) -> np.ndarray:
    """A flat float64 subsample of ``array`` (``[Y, X]`` or ``[Z, Y, X]``) of about ``max_samples``
    pixels (at most ``max(max_samples, max_slices * 16**2)``): the whole array if small enough,
    otherwise random square windows (side <= ``crop``) from up to ``max_slices`` evenly spaced slices
    (contiguous windows keep lazy reads chunk-friendly)."""
    depth, height, width = _shape_zyx(tuple(array.shape))
    volume_view = (lambda z, ys, xs: (z, ys, xs)) if len(array.shape) == 3 else (lambda z, ys, xs: (ys, xs))
    total = depth * height * width
    if total <= max_samples:
        return _read(array, tuple(slice(None) for _ in array.shape)).astype(np.float64).ravel()
    rng = np.random.default_rng(seed)
    slices = np.unique(np.linspace(0, depth - 1, num=min(depth, max_slices)).round().astype(int))
    budget = max(1, max_samples // len(slices))  # pixels per slice
    side = int(np.clip(math.isqrt(budget), 16, crop))
    ch, cw = min(side, height), min(side, width)
    per_slice = max(1, budget // (ch * cw))
    parts = []
    for z in slices:
        if ch * cw * per_slice >= height * width:  # the windows would cover the slice anyway
            parts.append(_read(array, volume_view(int(z), slice(None), slice(None))).ravel())
            continue
        for _ in range(per_slice):
            y0 = int(rng.integers(0, height - ch + 1))
            x0 = int(rng.integers(0, width - cw + 1))
            parts.append(_read(array, volume_view(int(z), slice(y0, y0 + ch), slice(x0, x0 + cw))).ravel())
    return np.concatenate(parts).astype(np.float64)


def compute_stats(
    array: Any,
    low_percentile: float = 0.5,
    high_percentile: float = 99.5,
    *,
    max_samples: int = 2_000_000,
    seed: int = 0,
) -> NormalizationStats:
    """Robust statistics of a 2D/3D image (uint8, uint16 or float; numpy, memmap, zarr or dask).

    Args:
        array: ``[Y, X]`` or ``[Z, Y, X]`` intensities.
        low_percentile, high_percentile: percentiles (0..100) mapped to 0 and 1 by `apply_normalization`.
        max_samples: pixel budget of the subsample (whole array when it is smaller).
        seed: seed of the subsample positions.
    """
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(
            f"need 0 <= low_percentile < high_percentile <= 100; got {low_percentile}, {high_percentile}"
        )
    dtype = np.dtype(array.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) or dtype == np.bool_:
        raise ValueError(f"expected an integer or float image; got dtype {dtype}")
    values = sample_pixels(array, max_samples=max_samples, seed=seed)
    if not np.isfinite(values).all():
        raise ValueError("the image contains NaN or infinite values; fix or mask them before normalising")
    low, high = np.percentile(values, [low_percentile, high_percentile])
    return NormalizationStats(
        low=float(low),
        high=float(high),
        mean=float(values.mean()),
        std=float(values.std()),
        low_percentile=float(low_percentile),
        high_percentile=float(high_percentile),
        dtype=str(dtype),
        n_samples=int(values.size),
    )


def slice_stats(plane: Any, fallback: Callable[[], NormalizationStats]) -> NormalizationStats:
    """Statistics of one slice ``[Y, X]`` for per-slice normalisation; a flat slice (no contrast) takes
    ``fallback()`` (e.g. the image's statistics) instead of being shifted to zero."""
    own = compute_stats(plane)
    return own if own.high > own.low else fallback()

def apply_normalization(
    array: Any, stats: NormalizationStats, mode: NormMode = "percentile", clip: bool = False
) -> np.ndarray:
    """Normalise ``array`` (any shape; read into memory) to float32.

    ``mode="percentile"``: ``(x - low) / (high - low)``, so ~[0, 1]; with ``clip`` exactly [0, 1].
    ``mode="zscore"``: ``(x - mean) / std``; with ``clip`` limited to [-5, 5].
    A constant image (high == low or std == 0) is only shifted, never divided by zero.
    """
    values = _read(array, (...,)).astype(np.float32)
    if mode == "percentile":
        scale = stats.high - stats.low
        out = (values - np.float32(stats.low)) / np.float32(scale if scale > 0 else 1.0)
        return np.clip(out, 0.0, 1.0) if clip else out
    if mode == "zscore":
        out = (values - np.float32(stats.mean)) / np.float32(stats.std if stats.std > 0 else 1.0)
        return np.clip(out, -5.0, 5.0) if clip else out
    raise ValueError(f"mode must be 'percentile' or 'zscore'; got {mode!r}")
