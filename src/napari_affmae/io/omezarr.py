"""OME-Zarr images: read with ome-zarr's Reader (level 0 as a dask array), write with ome-zarr's writer.

Both NGFF 0.4 (zarr format 2, metadata at the top of ``.zattrs``) and 0.5 (zarr format 3,
metadata under ``attributes.ome`` of ``zarr.json``) are read. `write_ome_zarr_image` writes what
ome-zarr writes by default (currently NGFF 0.5 / zarr 3); ``ngff_version="0.4"`` gives zarr 2.
`read_multiscales` exposes the pyramid layout (axes, dataset paths, transforms, level shapes) that
the labels writer mirrors.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import ImageFormatError, ImageNotFoundError
from .image import ImageData, normalise_unit, select_planes

LOGGER = logging.getLogger(__name__)


def is_zarr_path(path: str | os.PathLike) -> bool:
    """True for a directory that is a zarr v2/v3 group or array (or is named ``*.zarr``)."""
    p = Path(path)
    if p.suffix.lower() == ".zarr":
        return True
    return p.is_dir() and any((p / name).exists() for name in ("zarr.json", ".zgroup", ".zarray"))


def ngff_attrs(group: zarr.Group) -> dict[str, Any]:
    """The NGFF metadata of ``group``: ``attributes["ome"]`` for zarr 3, the plain attributes for zarr 2."""
    attrs = dict(group.attrs)
    if group.metadata.zarr_format == 3:
        return dict(attrs.get("ome", {}))
    return attrs


@dataclass(frozen=True)
class Multiscales:
    """Layout of an OME-Zarr multiscale image (what `write_labels` mirrors).

    Attributes:
        path: the image group's directory.
        zarr_format: 2 or 3.
        ngff_version: ``"0.4"`` or ``"0.5"`` (as found; ``"0.4"`` when a zarr 2 file does not say).
        axes: NGFF axes dicts (``{"name": "z", "type": "space", "unit": ...}``), array order.
        datasets: NGFF dataset dicts (``path`` and ``coordinateTransformations``), level 0 first.
        shapes: array shape of every level.
        chunks: chunk shape of every level.
        dtype: dtype of level 0.
    """

    path: str
    zarr_format: int
    ngff_version: str
    axes: list[dict[str, Any]]
    datasets: list[dict[str, Any]]
    shapes: list[tuple[int, ...]]
    chunks: list[tuple[int, ...]]
    dtype: str

    @property
    def axis_names(self) -> str:
        return "".join(a["name"] if isinstance(a, dict) else str(a) for a in self.axes)


def _open_image_group(path: str) -> tuple[str, zarr.Group, dict[str, Any]]:
    """Open ``path`` read-only, follow a bioformats2raw layout to its first image, check for multiscales."""
    if not Path(path).exists():
        raise ImageNotFoundError(f"{path}: no such file or directory")
    try:
        node = zarr.open(path, mode="r")
    except Exception as err:
        raise ImageFormatError(f"{path}: not a readable zarr/OME-Zarr store: {err}") from err
    if isinstance(node, zarr.Array):
        raise ImageFormatError(
            f"{path}: is a bare zarr array without OME-Zarr 'multiscales' metadata; write it as OME-Zarr "
            "(napari_affmae.io.write_ome_zarr_image) or open the array with zarr and pass it as numpy/dask"
        )
    attrs = ngff_attrs(node)
    if "multiscales" not in attrs and "bioformats2raw.layout" in attrs and "0" in node:
        path = str(Path(path) / "0")
        node = zarr.open_group(path, mode="r")
        attrs = ngff_attrs(node)
    if "plate" in attrs or "well" in attrs:
        raise ImageFormatError(
            f"{path}: is an HCS plate/well, not a single image; point to one image inside it (e.g. {path}/A/1/0)"
        )
    if "multiscales" not in attrs or not attrs["multiscales"]:
        raise ImageFormatError(
            f"{path}: zarr group without OME-Zarr 'multiscales' metadata, so its image arrays and axes are "
            "unknown; convert it to OME-Zarr (e.g. with ome-zarr or bioformats2raw) or point to the image group"
        )
    return path, node, attrs


def read_multiscales(path: str | os.PathLike) -> Multiscales:
    """The pyramid layout of the OME-Zarr image at ``path`` (metadata and array headers only)."""
    path, group, attrs = _open_image_group(str(path))
    ms = attrs["multiscales"][0]
    zarr_format = int(group.metadata.zarr_format)
    version = str(attrs.get("version") or ms.get("version") or ("0.5" if zarr_format == 3 else "0.4"))
    datasets = list(ms.get("datasets", []))
    if not datasets:
        raise ImageFormatError(f"{path}: 'multiscales' lists no datasets")
    axes = ms.get("axes")
    shapes, chunks = [], []
    dtype = None
    for ds in datasets:
        try:
            arr = group[ds["path"]]
        except KeyError as err:
            raise ImageFormatError(f"{path}: multiscales dataset {ds.get('path')!r} is missing") from err
        shapes.append(tuple(int(s) for s in arr.shape))
        chunks.append(tuple(int(c) for c in arr.chunks))
        dtype = dtype or str(arr.dtype)
    if axes is None:  # NGFF <= 0.3: implicit tczyx suffix
        axes = [{"name": n} for n in "tczyx"[-len(shapes[0]) :]]
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in axes]
    if len(axes) != len(shapes[0]):
        raise ImageFormatError(f"{path}: {len(axes)} axes in the metadata but level 0 has shape {shapes[0]}")
    return Multiscales(
        path=path,
        zarr_format=zarr_format,
        ngff_version=version,
        axes=axes,
        datasets=datasets,
        shapes=shapes,
        chunks=chunks,
        dtype=str(dtype),
    )


def _scale_of(dataset: dict[str, Any], ndim: int) -> list[float] | None:
    for transform in dataset.get("coordinateTransformations", []) or []:
        if transform.get("type") == "scale" and len(transform.get("scale", [])) == ndim:
            return [float(v) for v in transform["scale"]]
    return None


def read_ome_zarr(
    path: str | os.PathLike, *, channel: int | None = None, timepoint: int | None = None
) -> ImageData:
    """Open level 0 of an OME-Zarr image lazily (dask) with axes and pixel size from its metadata."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr.reader import Multiscales as MultiscalesSpec

    layout = read_multiscales(path)  # validates and resolves bioformats2raw
    location = parse_url(layout.path, mode="r")
    if location is None:
        raise ImageFormatError(f"{layout.path}: ome-zarr could not open this location")
    target = os.path.abspath(layout.path)
    chosen = None
    for node in Reader(location)():
        if node.load(MultiscalesSpec) is None:
            continue
        if os.path.abspath(str(node.zarr.path)).rstrip("/") == target.rstrip("/"):
            chosen = node
            break
        if chosen is None and node.load(Label) is None:
            chosen = node
    if chosen is None or not chosen.data:
        raise ImageFormatError(f"{layout.path}: ome-zarr found no image data in this OME-Zarr")
    array = chosen.data[0]  # level 0, dask
    axes = layout.axis_names.lower()
    ndim = len(axes)
    scale = _scale_of(layout.datasets[0], ndim)
    units = {normalise_unit(a.get("unit")) for a in layout.axes if a.get("type") == "space" and a.get("unit")}
    array, out_axes = select_planes(array, axes, channel=channel, timepoint=timepoint, where=layout.path)
    pixel_size = None
    if scale is not None:
        pixel_size = {a: s for a, s in zip(axes, scale) if a in out_axes and a in "zyx"} or None
    meta = {
        "format": "ome-zarr",
        "ngff_version": layout.ngff_version,
        "zarr_format": layout.zarr_format,
        "levels": [list(s) for s in layout.shapes],
        "file_axes": axes,
    }
    return ImageData(
        array=array,
        axes=out_axes,
        pixel_size=pixel_size,
        unit=units.pop() if len(units) == 1 else None,
        source=layout.path,
        metadata=meta,
    )


def _pixel_size_dict(pixel_size: Any, axes: str) -> dict[str, float]:
    if pixel_size is None:
        return dict.fromkeys(axes, 1.0)
    if isinstance(pixel_size, Mapping):
        unknown = set(pixel_size) - set(axes)
        if unknown:
            raise ValueError(f"pixel_size has axes {sorted(unknown)} that are not in axes {axes!r}")
        return {a: float(pixel_size.get(a, 1.0)) for a in axes}
    if isinstance(pixel_size, (int, float)):
        return {a: (float(pixel_size) if a in "yx" else 1.0) for a in axes}
    values = [float(v) for v in pixel_size]
    if len(values) != len(axes):
        raise ValueError(f"pixel_size {values} must have one value per axis of {axes!r}")
    return dict(zip(axes, values))


def write_ome_zarr_image(
    path: str | os.PathLike,
    array: Any,
    axes: str = "zyx",
    pixel_size: Mapping[str, float] | Sequence[float] | float | None = None,
    *,
    unit: str | None = "nanometer",
    levels: int | None = None,
    chunks: Sequence[int] | None = None,
    ngff_version: str | None = None,
    name: str = "image",
    overwrite: bool = False,
) -> str:
    """Write ``array`` (numpy or dask, axes like ``"zyx"`` or ``"yx"``) as an OME-Zarr image pyramid.

    Args:
        path: directory to create (``*.zarr``).
        axes: one letter per array axis from ``tczyx``.
        pixel_size: physical size per axis (dict, sequence in ``axes`` order, or one in-plane float).
        unit: unit of the spatial axes (NGFF name); None to leave it out.
        levels: pyramid levels including level 0; default halves y/x while both stay >= 64 px (max 5).
        chunks: chunk shape of the arrays; default one plane per chunk, at most 512 x 512 in y/x.
        ngff_version: None for ome-zarr's default (NGFF 0.5, zarr 3) or ``"0.4"`` (zarr 2).
        overwrite: replace an existing store; otherwise an existing path is an error.

    Returns the path written. The image pyramid uses ome-zarr's default resampling; z is never
    downsampled.
    """
    from ome_zarr.format import format_from_version
    from ome_zarr.writer import write_image

    path = str(Path(path))
    axes = axes.lower()
    shape = tuple(int(s) for s in array.shape)
    if len(axes) != len(shape) or not axes.endswith("yx") or not set(axes) <= set("tczyx"):
        raise ValueError(
            f"axes {axes!r} must name every axis of shape {shape} with letters from 'tczyx', ending in 'yx'"
        )
    if Path(path).exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True")
        import shutil

        shutil.rmtree(path)
    if levels is None:
        levels = 1
        while levels < 5 and min(shape[-2:]) // (2**levels) >= 64:
            levels += 1
    if levels < 1:
        raise ValueError(f"levels must be >= 1; got {levels}")
    if chunks is None:
        chunks = tuple(1 if a in "tcz" else min(n, 512) for a, n in zip(axes, shape))
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape):
        raise ValueError(f"chunks {chunks} must have one entry per axis of {axes!r}")
    fmt = format_from_version(ngff_version) if ngff_version else None
    axes_units = {a: unit for a in axes if a in "zyx"} if unit else None
    group = zarr.open_group(path, mode="w", **({"zarr_format": fmt.zarr_format} if fmt else {}))
    write_image(
        np.asarray(array) if not hasattr(array, "dask") else array,
        group,
        scale_factors=[2**k for k in range(1, levels)],
        axes=list(axes),
        scale=_pixel_size_dict(pixel_size, axes),
        axes_units=axes_units,
        storage_options={"chunks": chunks},
        name=name,
        **({"fmt": fmt} if fmt else {}),
    )
    LOGGER.debug("wrote OME-Zarr image %s shape %s levels %d", path, shape, levels)
    return path


def level_factors(shapes: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-level, per-axis downsampling factor relative to level 0 (``N0 / Nk``)."""
    base = shapes[0]
    return [[b / max(s, 1) for b, s in zip(base, shape)] for shape in shapes]


def nearest_index(size0: int, size_k: int) -> np.ndarray:
    """Indices into an axis of length ``size0`` that nearest-neighbour downsample it to ``size_k``:
    ``floor(i * size0 / size_k)`` (equals ``[::f]`` for an integer factor ``f``)."""
    return np.minimum((np.arange(size_k) * (size0 / size_k)).astype(np.int64), size0 - 1)


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """Number of chunks along each axis."""
    return tuple(math.ceil(s / c) for s, c in zip(shape, chunks))
