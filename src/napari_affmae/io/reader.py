"""`read_image`: one entry point for TIFF, OME-Zarr, ``.npy`` files and in-memory arrays."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageFormatError, ImageNotFoundError
from .image import ImageData, select_planes
from .omezarr import is_zarr_path, read_ome_zarr
from .tiff import read_tiff

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")


def _guess_array_axes(shape: tuple[int, ...], where: str) -> str:
    """Axes of an array without metadata: 2D -> yx, 3D -> zyx (unless it looks like RGB)."""
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3:
        if shape[-1] in (3, 4) and min(shape[:2]) > 4:
            raise ImageFormatError(
                f"{where}: shape {shape} looks like an RGB/RGBA image (last axis of size {shape[-1]}); EM input "
                "must be single-channel grayscale. Convert it (e.g. skimage.color.rgb2gray), or pass axes='zyx' "
                "if it really is a stack"
            )
        return "zyx"
    raise ImageFormatError(
        f"{where}: {len(shape)}D data (shape {shape}) without axes metadata; pass axes explicitly, "
        "e.g. axes='czyx' or 'tzyx' (CLI: --axes), together with channel=/timepoint="
    )


def _from_array(
    array: Any, axes: str | None, channel: int | None, timepoint: int | None, where: str, source: str | None
) -> ImageData:
    shape = tuple(int(s) for s in array.shape)
    dtype = np.dtype(array.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageFormatError(f"{where}: unsupported dtype {dtype}; expected uint8, uint16 or float")
    axes = axes.lower() if axes else _guess_array_axes(shape, where)
    array, out_axes = select_planes(array, axes, channel=channel, timepoint=timepoint, where=where)
    return ImageData(array=array, axes=out_axes, source=source, metadata={"format": "array"})


def read_image(
    source: str | os.PathLike | np.ndarray | Any,
    *,
    axes: str | None = None,
    channel: int | None = None,
    timepoint: int | None = None,
) -> ImageData:
    """Open an EM image or stack lazily and return `ImageData` with axes ``yx``, ``zyx`` or ``tyx``.

    ``source`` is a path to a TIFF (``.tif``/``.tiff``, memory-mapped or zarr-backed), an OME-Zarr
    image (directory; level 0 as a dask array), a ``.npy`` file (memory-mapped), or an array
    (numpy, dask, zarr; 2D -> ``yx``, 3D -> ``zyx``). ``axes`` overrides the axes of TIFF and
    array inputs; ``channel``/``timepoint`` select one channel / time point.

    Raises ImageNotFoundError for a missing path and ImageFormatError (a ValueError) for corrupt
    files, RGB data, 4D+ data without axes, OME-Zarr without multiscales metadata and unknown formats.
    """
    if not isinstance(source, (str, os.PathLike)):
        if not hasattr(source, "shape") or not hasattr(source, "dtype"):
            raise ImageFormatError(f"expected a file path or an array; got {type(source).__name__}")
        return _from_array(source, axes, channel, timepoint, where="array", source=None)
    path = str(Path(source))
    if not Path(path).exists():
        raise ImageNotFoundError(f"{path}: no such file or directory")
    suffix = Path(path).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return read_tiff(path, axes=axes, channel=channel, timepoint=timepoint)
    if is_zarr_path(path):
        if axes is not None:
            raise ImageFormatError(f"{path}: OME-Zarr axes come from its metadata; do not pass axes")
        return read_ome_zarr(path, channel=channel, timepoint=timepoint)
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as err:
            raise ImageFormatError(f"{path}: not a readable .npy file: {err}") from err
        return _from_array(array, axes, channel, timepoint, where=path, source=path)
    if Path(path).is_dir():
        raise ImageFormatError(
            f"{path}: is a directory but not a zarr/OME-Zarr store (no zarr.json or .zgroup); point to a TIFF file "
            "or an OME-Zarr image"
        )
    raise ImageFormatError(f"{path}: unsupported file type {suffix or '(none)'!r}; use TIFF, OME-Zarr or .npy")
