"""`ImageData`: an image array (possibly lazy) with its axes, pixel size and source.

Axes are lower-case NGFF letters in array order. After `read_image` an image has axes
``"yx"``, ``"zyx"`` or ``"tyx"`` (one leading axis that tools iterate slice by slice); channel
and time axes are resolved by `select_planes` (singleton axes dropped, a chosen channel/time
point taken, anything else a clear ImageFormatError).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ImageFormatError

SPATIAL_2D = "yx"
SUPPORTED_AXES = ("yx", "zyx", "tyx")

_UNIT_NAMES = {
    "nm": "nanometer",
    "nanometer": "nanometer",
    "nanometers": "nanometer",
    "um": "micrometer",
    "µm": "micrometer",
    "\u03bcm": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometer": "micrometer",
    "micrometers": "micrometer",
    "mm": "millimeter",
    "millimeter": "millimeter",
    "pm": "picometer",
    "angstrom": "angstrom",
    "å": "angstrom",
}


def normalise_unit(unit: str | None) -> str | None:
    """Map common spellings (``"nm"``, ``"micron"``, ``"µm"``) to NGFF unit names; unknown units pass
    through unchanged, empty/pixel units become None."""
    if unit is None:
        return None
    text = str(unit).strip()
    if not text or text.lower() in ("pixel", "pixels", "px", "none"):
        return None
    return _UNIT_NAMES.get(text.lower(), text)


@dataclass
class ImageData:
    """A 2D image or 3D stack and what is known about it.

    Attributes:
        array: numpy array, ``numpy.memmap`` or dask array, shape matching ``axes``.
        axes: lower-case axis letters in array order: ``"yx"``, ``"zyx"`` or ``"tyx"``.
        pixel_size: physical size of one pixel per axis (e.g. ``{"z": 50.0, "y": 4.6, "x": 4.6}``),
            or None when the file does not say.
        unit: unit of ``pixel_size`` (NGFF names: ``"nanometer"``, ``"micrometer"``) or None.
        source: path the image was read from (None for in-memory arrays).
        metadata: format details (e.g. ``{"format": "ome-zarr", "ngff_version": "0.5"}``).
    """

    array: Any
    axes: str
    pixel_size: dict[str, float] | None = None
    unit: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def dtype(self) -> Any:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def is_lazy(self) -> bool:
        """True when pixels are read on demand (memmap, dask or zarr), not held in memory."""
        return isinstance(self.array, np.memmap) or not isinstance(self.array, np.ndarray)


def select_planes(
    array: Any,
    axes: str,
    *,
    channel: int | None = None,
    timepoint: int | None = None,
    where: str = "image",
) -> tuple[Any, str]:
    """Reduce ``array`` with ``axes`` (any of ``tczyx``) to ``yx``, ``zyx`` or ``tyx``.

    Singleton axes are dropped; ``channel``/``timepoint`` index the ``c``/``t`` axes. A remaining
    multi-channel axis, or both ``t`` and ``z``, is an ImageFormatError naming the fix.
    """
    axes = axes.lower()
    if len(axes) != len(array.shape):
        raise ImageFormatError(f"{where}: axes {axes!r} do not match the array shape {tuple(array.shape)}")
    if len(set(axes)) != len(axes) or not set(axes) <= set("tczyx") or not axes.endswith("yx"):
        raise ImageFormatError(
            f"{where}: unsupported axes {axes!r}; expected letters from 'tczyx' ending in 'yx' (e.g. 'zyx')"
        )
    for name, index in (("c", channel), ("t", timepoint)):
        if index is None:
            continue
        if name not in axes:
            if index == 0:
                continue
            raise ImageFormatError(f"{where}: has no {name!r} axis (axes {axes!r}); cannot select index {index}")
        pos = axes.index(name)
        size = array.shape[pos]
        if not 0 <= index < size:
            raise ImageFormatError(f"{where}: {name!r} index {index} is out of range for size {size}")
        array = array[(slice(None),) * pos + (index,)]
        axes = axes[:pos] + axes[pos + 1 :]
    # drop singleton non-spatial axes (and a singleton z)
    for name in "tcz":
        if name in axes and array.shape[axes.index(name)] == 1:
            pos = axes.index(name)
            array = array[(slice(None),) * pos + (0,)]
            axes = axes[:pos] + axes[pos + 1 :]
    if "c" in axes:
        size = array.shape[axes.index("c")]
        raise ImageFormatError(
            f"{where}: has {size} channels (axes {axes!r}, shape {tuple(array.shape)}); EM input must be one "
            "channel: choose one with channel=<index> (CLI: --channel)"
        )
    if "t" in axes and "z" in axes:
        size = array.shape[axes.index("t")]
        raise ImageFormatError(
            f"{where}: has {size} time points of a 3D stack (axes {axes!r}); choose one with "
            "timepoint=<index> (CLI: --timepoint)"
        )
    if axes not in SUPPORTED_AXES:  # pragma: no cover - guarded by the checks above
        raise ImageFormatError(f"{where}: could not reduce axes to one of {SUPPORTED_AXES}; got {axes!r}")
    return array, axes
