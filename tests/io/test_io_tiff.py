"""TIFF input: round trips, lazy reading, pixel size from ImageJ/OME metadata, bad files."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile

from napari_affmae.io import ImageFormatError, ImageNotFoundError, read_image


@pytest.fixture()
def stack():
    return np.random.default_rng(0).integers(0, 255, size=(5, 48, 72), dtype=np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_round_trip_memory_mapped(tmp_path, dtype):
    data = (np.random.default_rng(1).random((4, 40, 56)) * 1000).astype(dtype)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    image = read_image(path)
    assert image.axes == "zyx" and image.shape == data.shape and image.dtype == data.dtype
    assert isinstance(image.array, np.memmap) and image.is_lazy
    np.testing.assert_array_equal(np.asarray(image.array), data)
    assert image.source == str(path) and image.pixel_size is None


def test_compressed_tiff_is_read_lazily_through_zarr(tmp_path, stack):
    path = tmp_path / "zlib.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", compression="zlib")
    image = read_image(path)
    assert isinstance(image.array, da.Array) and image.axes == "zyx"
    assert image.array.chunks[0] == (1,) * 5  # one plane per chunk: nothing read until asked
    np.testing.assert_array_equal(image.array[2, 10:20, 30:50].compute(), stack[2, 10:20, 30:50])


def test_2d_tiff(tmp_path, stack):
    path = tmp_path / "plane.tiff"
    tifffile.imwrite(path, stack[0])
    image = read_image(path)
    assert image.axes == "yx" and image.shape == (48, 72)


def test_imagej_pixel_size(tmp_path, stack):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(1 / 4.6, 1 / 4.6), metadata={"spacing": 50.0, "unit": "nm", "axes": "ZYX"}
    )
    image = read_image(path)
    assert image.axes == "zyx" and image.unit == "nanometer"
    assert image.pixel_size == pytest.approx({"z": 50.0, "y": 4.6, "x": 4.6}, rel=1e-4)


def test_ome_tiff_pixel_size(tmp_path, stack):
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(
        path,
        stack,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 4.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 4.0,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 40.0,
            "PhysicalSizeZUnit": "nm",
        },
    )
    image = read_image(path)
    assert image.pixel_size == {"z": 40.0, "y": 4.0, "x": 4.0} and image.unit == "nanometer"


def test_channel_selection_in_hyperstack(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, size=(3, 2, 32, 40), dtype=np.uint8)  # Z C Y X
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ImageFormatError, match="2 channels"):
        read_image(path)
    image = read_image(path, channel=1)
    assert image.axes == "zyx"
    np.testing.assert_array_equal(np.asarray(image.array), data[:, 1])


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such file") as info:
        read_image(tmp_path / "nope.tif")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_corrupt_tiff(tmp_path):
    path = tmp_path / "junk.tif"
    path.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(ImageFormatError, match="not a readable TIFF"):
        read_image(path)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff(tmp_path, stack, compression):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, stack, photometric="minisblack", compression=compression)
    bad = tmp_path / "cut.tif"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageFormatError, match="truncated|corrupt"):
        read_image(bad)


@pytest.mark.parametrize("planar", [False, True])
def test_rgb_tiff_rejected(tmp_path, planar):
    rgb = np.random.default_rng(3).integers(0, 255, size=(3, 32, 40) if planar else (32, 40, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", planarconfig="separate" if planar else "contig")
    with pytest.raises(ImageFormatError, match="RGB"):
        read_image(path)


def test_4d_without_axes_rejected(tmp_path):
    data = np.zeros((2, 3, 16, 16), np.uint8)
    path = tmp_path / "q.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes.startswith("Q")  # tifffile itself does not know the axes
    with pytest.raises(ImageFormatError, match="without axes metadata"):
        read_image(path)
    image = read_image(path, axes="tzyx", timepoint=1)
    assert image.axes == "zyx" and image.shape == (3, 16, 16)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(ImageFormatError, match="unsupported file type"):
        read_image(path)
