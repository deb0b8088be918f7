"""napari writer contributions: Labels layers as OME-Zarr ``labels/<name>`` groups (NGFF image-label).

* `write_labels_layer` — one Labels layer saved *into an existing OME-Zarr image* (choose the image's
  ``.zarr`` folder): it becomes ``<image>.zarr/labels/<layer name>``, with a nearest-neighbour pyramid
  that mirrors the image's levels. The image arrays are never written.
* `write_image_with_labels` — one Image layer plus one or more Labels layers saved together to a
  *new* ``.zarr``: an OME-Zarr image pyramid with every Labels layer under ``labels/``.

Called by napari through the npe2 manifest (``napari.yaml``); imports nothing from napari.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]


class OmeZarrSaveError(RuntimeError):
    """The layers cannot be saved there; the message says why and what to do.

    Not a ValueError on purpose: napari takes a ValueError from a writer to mean "this writer does
    not apply", hides the message and only warns that no writer was found.
    """
STATE_KEY = "affmae_labels"  # set on labels groups written by napari-affmae (see napari_affmae.io.labels)


def labels_group_name(layer_name: str) -> str:
    """A valid ``labels/<name>`` for a layer name: letters, digits, ``._-``; other runs become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(layer_name).strip()).strip("._")
    return name or "labels"


def _level0(data: Any, meta: dict[str, Any]) -> Any:
    if meta.get("multiscale") or isinstance(data, (list, tuple)):
        return data[0]
    return data


def _labels_dtype(array: Any) -> np.dtype:
    """The array's dtype when it is an unsigned integer of at most 32 bits, else the smallest one that fits."""
    dtype = np.dtype(array.dtype)
    if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise ValueError(f"labels must be integers; this layer has dtype {dtype}")
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(dtype, np.unsignedinteger) and dtype.itemsize <= 4:
        return dtype
    low, high = np.min(array), np.max(array)
    low, high = int(getattr(low, "compute", lambda: low)()), int(getattr(high, "compute", lambda: high)())
    if low < 0:
        raise ValueError(f"labels must be >= 0 to be saved as OME-Zarr labels; this layer has values down to {low}")
    for candidate in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    raise ValueError(f"label values up to {high} do not fit in uint32")


def _check_not_foreign(image_path: Path, name: str) -> None:
    """Refuse to replace ``labels/<name>`` that another tool wrote (ours are replaced on a new save)."""
    import zarr

    group_path = image_path / "labels" / name
    if not group_path.exists():
        return
    try:
        group = zarr.open_group(str(group_path), mode="r")
        ours = STATE_KEY in dict(group.attrs)
    except Exception:  # noqa: BLE001 - unreadable -> treat as foreign
        ours = False
    if not ours:
        raise FileExistsError(f"{group_path} already exists and was not written by napari-affmae; rename the "
                              "Labels layer to save under another name")


def write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Save one Labels layer into the existing OME-Zarr image at ``path`` as ``labels/<layer name>``.

    The labels must have the image's level-0 shape (a channel axis of the image may be missing).
    Returns ``[labels group path]``. Raises `OmeZarrSaveError` (with what to do) for a path that is
    not an OME-Zarr image or labels of another shape, FileExistsError for a foreign labels group.
    """
    try:
        return _write_labels_layer(path, data, meta)
    except ValueError as err:
        raise OmeZarrSaveError(str(err)) from err


def _write_labels_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    from .io import read_multiscales, write_labels
    from .io.errors import ImageFormatError, ImageNotFoundError

    target = Path(path)
    if not target.exists():
        raise ValueError(
            f"{target} does not exist. Labels are stored inside an OME-Zarr image as labels/<name>: save the "
            "Labels layer into the image's existing .zarr folder, or select the Image layer together with the "
            "Labels layer(s) and save both to a new .zarr")
    try:
        layout = read_multiscales(target)
    except (ImageFormatError, ImageNotFoundError) as err:
        raise ValueError(f"cannot save labels into {target}: {err}") from err
    labels = _level0(data, meta)
    name = labels_group_name(meta.get("name") or "labels")
    _check_not_foreign(Path(layout.path), name)
    class_names = (meta.get("metadata") or {}).get("class_names")
    written = write_labels(
        layout.path, name, labels, class_names=[str(c) for c in class_names] if class_names else None,
        dtype=_labels_dtype(labels), overwrite=True,
        provenance={"written_by": "napari-affmae writer", "layer": str(meta.get("name", ""))},
    )
    return [written]


def write_image_with_labels(path: str, layer_data: list[LayerData]) -> list[str]:
    """Save one Image layer and its Labels layers to a new OME-Zarr at ``path`` (image pyramid + ``labels/``).

    Returns ``[path]``. Raises `OmeZarrSaveError` for anything but exactly one 2D/3D grayscale image,
    for an existing ``path`` and for labels of another shape.
    """
    try:
        return _write_image_with_labels(path, layer_data)
    except ValueError as err:
        raise OmeZarrSaveError(str(err)) from err


def _write_image_with_labels(path: str, layer_data: list[LayerData]) -> list[str]:
    from .io import write_ome_zarr_image

    images = [(d, m) for d, m, kind in layer_data if kind == "image"]
    labels = [(d, m) for d, m, kind in layer_data if kind == "labels"]
    if len(images) != 1 or not labels:
        raise ValueError(f"select exactly one Image layer and at least one Labels layer to save as OME-Zarr; got "
                         f"{len(images)} image(s) and {len(labels)} labels layer(s)")
    target = Path(path)
    if target.exists():
        raise ValueError(f"{target} already exists; choose a new name (to add labels to an existing OME-Zarr image, "
                         "save only the Labels layer into it)")
    image, image_meta = images[0]
    level0 = _level0(image, image_meta)
    if image_meta.get("rgb"):
        raise ValueError("the image layer is RGB; OME-Zarr EM images here are single-channel")
    ndim = len(level0.shape)
    if ndim not in (2, 3):
        raise ValueError(f"the image layer has {ndim} dimensions; 2D [Y, X] or 3D [Z, Y, X] can be saved")
    for data, meta in labels:
        shape = tuple(_level0(data, meta).shape)
        if shape != tuple(level0.shape):
            raise ValueError(f"labels layer '{meta.get('name')}' has shape {shape} but the image has shape "
                             f"{tuple(level0.shape)}; they must cover the image pixel for pixel")
    axes = "zyx"[-ndim:]
    scale = image_meta.get("scale")
    pixel_size = [float(s) for s in scale][-ndim:] if scale is not None else None
    unit = _unit(image_meta)
    array = level0 if hasattr(level0, "dask") else np.asarray(level0)
    write_ome_zarr_image(target, array, axes, pixel_size=pixel_size, unit=unit, name=image_meta.get("name") or "image")
    for data, meta in labels:
        _write_labels_layer(str(target), data, meta)
    return [str(target)]


def _unit(meta: dict[str, Any]) -> str | None:
    """The spatial unit of a layer as an NGFF unit name, or None when unknown / pixels."""
    units = meta.get("units")
    if not units:
        return None
    text = str(units[-1])
    known = {"nm": "nanometer", "nanometer": "nanometer", "um": "micrometer", "µm": "micrometer",
             "micrometer": "micrometer", "micron": "micrometer", "mm": "millimeter", "millimeter": "millimeter",
             "angstrom": "angstrom"}
    return known.get(text.lower())
