"""Image input/output (a leaf package: tifffile, zarr, ome-zarr, dask, numpy).

* `read_image(path | array)` -> `ImageData` (lazy array, axes ``yx``/``zyx``/``tyx``, pixel size).
* `write_ome_zarr_image(path, array, axes, pixel_size)`: an OME-Zarr image pyramid (ome-zarr's writer).
* `write_labels` / `LabelsWriter`: ``labels/<name>`` per NGFF, chunk by chunk, resumable.
* `ImageFormatError` (a ValueError) / `ImageNotFoundError` for bad input.
"""
from .errors import ImageFormatError, ImageNotFoundError
from .image import ImageData, normalise_unit, select_planes
from .labels import LabelsWriter, write_labels
from .omezarr import Multiscales, is_zarr_path, read_multiscales, read_ome_zarr, write_ome_zarr_image
from .reader import read_image
from .tiff import read_tiff

__all__ = [
    "ImageData",
    "ImageFormatError",
    "ImageNotFoundError",
    "LabelsWriter",
    "Multiscales",
    "is_zarr_path",
    "normalise_unit",
    "read_image",
    "read_multiscales",
    "read_ome_zarr",
    "read_tiff",
    "select_planes",
    "write_labels",
    "write_ome_zarr_image",
]
