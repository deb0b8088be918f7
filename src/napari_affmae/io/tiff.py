"""TIFF reading (tifffile): lazy where possible, axes and pixel size from ImageJ/OME metadata.

Uncompressed contiguous data is memory-mapped (``numpy.memmap``); anything else (compressed,
tiled, strip-scattered) is opened through tifffile's zarr store as a dask array with one chunk
per plane, so no pixels are read until a crop or slice is requested.
"""
from __future__ import annotations

import logging
import os
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import tifffile

from .errors import ImageFormatError
from .image import ImageData, normalise_unit, select_planes

LOGGER = logging.getLogger(__name__)

_RGB_PHOTOMETRIC = {
    int(tifffile.PHOTOMETRIC.RGB),
    int(tifffile.PHOTOMETRIC.YCBCR),
    int(tifffile.PHOTOMETRIC.SEPARATED),
    int(tifffile.PHOTOMETRIC.CIELAB),
}
_KNOWN_LETTERS = {"Y": "y", "X": "x", "Z": "z", "C": "c", "T": "t", "S": "c"}
_UNKNOWN_LETTERS = set("IQ")  # tifffile's "image sequence" / "unknown" axes


class _TiffProblems(logging.Handler):
    """Collects tifffile's log errors that mean a damaged file (tifffile logs them and carries on)."""

    SIGNS = ("invalid page offset", "failed to reshape", "truncat", "corrupt")

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(sign in message.lower() for sign in self.SIGNS):
            self.messages.append(message)  # reported in our own one-line error
        else:
            LOGGER.debug("tifffile: %s", message)


def _tiff_axes(path: str, series: tifffile.TiffPageSeries, photometric: int) -> str:
    """Lower-case axes for ``series`` or an ImageFormatError (RGB, or unknown axes in 4D+ data)."""
    letters = series.axes
    shape = series.shape
    has_samples = "S" in letters and shape[letters.index("S")] > 1
    if photometric in _RGB_PHOTOMETRIC or (has_samples and letters.endswith("S")):
        raise ImageFormatError(
            f"{path}: is an RGB/RGBA colour image (shape {shape}, axes {letters!r}); EM input must be a "
            "single-channel grayscale image or stack. Convert it to grayscale (e.g. skimage.color.rgb2gray) "
            "and save it again."
        )
    unknown = [a for a, n in zip(letters, shape) if a in _UNKNOWN_LETTERS and n > 1]
    known_extra = [a for a, n in zip(letters, shape) if a in "ZCTS" and n > 1]
    if len(unknown) + len(known_extra) > 1 and unknown:
        raise ImageFormatError(
            f"{path}: {len(shape)}D data (shape {shape}) without axes metadata (tifffile reports {letters!r}); "
            "save it as an ImageJ hyperstack or OME-TIFF with axes, or pass axes explicitly, e.g. axes='czyx' "
            "(CLI: --axes)"
        )
    out = []
    for letter, size in zip(letters, shape):
        if letter in _KNOWN_LETTERS:
            out.append(_KNOWN_LETTERS[letter])
        elif letter in _UNKNOWN_LETTERS:
            out.append("z" if size > 1 else "t")  # a singleton unknown axis is dropped later anyway
        else:
            raise ImageFormatError(
                f"{path}: unsupported TIFF axis {letter!r} in {letters!r} (shape {shape}); pass axes explicitly"
            )
    axes = "".join(out)
    if len(set(axes)) != len(axes):
        raise ImageFormatError(f"{path}: ambiguous TIFF axes {letters!r} (shape {shape}); pass axes explicitly")
    return axes


def _ome_pixel_size(xml: str) -> tuple[dict[str, float] | None, str | None]:
    """PhysicalSize{X,Y,Z} (+ units) from OME-XML; None when absent."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None, None
    sizes: dict[str, float] = {}
    units: set[str | None] = set()
    for axis in "zyx":
        value = pixels.get(f"PhysicalSize{axis.upper()}")
        if value is not None:
            sizes[axis] = float(value)
            units.add(normalise_unit(pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm")))
    if not sizes:
        return None, None
    return sizes, (units.pop() if len(units) == 1 else None)


def _imagej_pixel_size(tif: tifffile.TiffFile) -> tuple[dict[str, float] | None, str | None]:
    """Pixel size from ImageJ metadata (``unit``, ``spacing``) and the X/YResolution tags."""
    meta = tif.imagej_metadata or {}
    unit = normalise_unit(meta.get("unit"))
    if unit is None:
        return None, None
    page = tif.pages.first
    res_x, res_y = page.resolution  # pixels per unit, (x, y)
    sizes: dict[str, float] = {}
    if res_y > 0:
        sizes["y"] = 1.0 / res_y
    if res_x > 0:
        sizes["x"] = 1.0 / res_x
    if "spacing" in meta:
        sizes["z"] = float(meta["spacing"])
    return (sizes or None), unit


def _check_complete(path: str, tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> None:
    """Raise if any plane's data lies beyond the end of the file (a truncated download/copy)."""
    file_size = os.path.getsize(path)
    truncated = series.dataoffset is not None and series.dataoffset + series.nbytes > file_size
    truncated = truncated or any(page is None for page in series.pages)
    if truncated:
        raise ImageFormatError(
            f"{path}: the TIFF is truncated or corrupt (its {series.shape} pixels do not fit in the "
            f"{file_size}-byte file); copy or export it again"
        )
    for page in series.pages:
        if page is None:
            continue
        offsets, counts = page.dataoffsets, page.databytecounts
        if any(o + c > file_size for o, c in zip(offsets, counts)):
            raise ImageFormatError(
                f"{path}: the TIFF is truncated (pixel data reaches past the end of the {file_size}-byte file); "
                "copy or export it again"
            )


def read_tiff(
    path: str | os.PathLike,
    *,
    axes: str | None = None,
    channel: int | None = None,
    timepoint: int | None = None,
) -> ImageData:
    """Open a TIFF lazily as `ImageData` with axes ``yx``, ``zyx`` or ``tyx``.

    ``axes`` overrides what the file says (letters from ``tczyx``, e.g. ``"czyx"``); ``channel``
    and ``timepoint`` pick one plane set from multi-channel or time-lapse data.
    """
    path = str(Path(path))
    problems = _TiffProblems()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(problems)
    propagate, tiff_logger.propagate = tiff_logger.propagate, False  # its lines would precede our error
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # tifffile raises TiffFileError/ValueError/struct errors on junk
        tiff_logger.removeHandler(problems)
        tiff_logger.propagate = propagate
        raise ImageFormatError(f"{path}: not a readable TIFF file (corrupt or not a TIFF): {err}") from err
    try:
        if not tif.pages or not tif.series:
            raise ImageFormatError(f"{path}: the TIFF contains no images (corrupt or empty file)")
        series = tif.series[0]
        if problems.messages:
            raise ImageFormatError(
                f"{path}: the TIFF is truncated or corrupt ({problems.messages[0]}); copy or export it again"
            )
        photometric = int(series.keyframe.photometric)
        file_axes = _tiff_axes(path, series, photometric) if axes is None else axes.lower()
        if len(file_axes) != len(series.shape):
            raise ImageFormatError(
                f"{path}: axes {file_axes!r} have {len(file_axes)} letters but the data has shape {series.shape}"
            )
        _check_complete(path, tif, series)
        if tif.is_ome and tif.ome_metadata:
            pixel_size, unit = _ome_pixel_size(tif.ome_metadata)
        elif tif.is_imagej:
            pixel_size, unit = _imagej_pixel_size(tif)
        else:
            pixel_size, unit = None, None
        meta = {"format": "tiff", "tiff_axes": series.axes, "dtype": str(series.dtype)}
    except ImageFormatError:
        tif.close()
        raise
    except Exception as err:
        tif.close()
        raise ImageFormatError(f"{path}: could not read the TIFF structure (corrupt file?): {err}") from err
    finally:
        tiff_logger.removeHandler(problems)
        tiff_logger.propagate = propagate
    tif.close()

    array = _open_lazy(path, series_shape=tuple(series.shape))
    array, out_axes = select_planes(array, file_axes, channel=channel, timepoint=timepoint, where=path)
    if pixel_size is not None:
        pixel_size = {a: v for a, v in pixel_size.items() if a in out_axes} or None
    return ImageData(array=array, axes=out_axes, pixel_size=pixel_size, unit=unit, source=path, metadata=meta)


def _open_lazy(path: str, series_shape: tuple[int, ...]) -> Any:
    """A memmap when the data is contiguous and uncompressed, else a dask array over tifffile's zarr store."""
    try:
        array = tifffile.memmap(path, mode="r")
        if tuple(array.shape) == series_shape:
            return array
        LOGGER.debug("memmap shape %s != series shape %s; using the zarr store", array.shape, series_shape)
    except Exception as err:  # not memory-mappable (compressed, tiled, non-contiguous)
        LOGGER.debug("%s is not memory-mappable (%s); using the zarr store", path, err)
    import dask.array as da
    import zarr

    try:
        store = tifffile.imread(path, aszarr=True, series=0)
        weakref.finalize(store, store.close)  # the store keeps the file open while the array lives
        zarray = zarr.open_array(store, mode="r")
    except Exception as err:
        raise ImageFormatError(f"{path}: could not open the TIFF pixel data lazily: {err}") from err
    plane_chunks = (1,) * (len(series_shape) - 2) + tuple(series_shape[-2:])  # one chunk per plane
    try:
        return da.from_zarr(zarray, chunks=plane_chunks)
    except Exception as err:
        raise ImageFormatError(f"{path}: could not open the TIFF pixel data lazily: {err}") from err
