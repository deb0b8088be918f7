"""OME-Zarr input: written with ome-zarr, read back lazily with axes and pixel size; bad stores."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from napari_affmae.io import ImageFormatError, ImageNotFoundError, read_image, read_multiscales, write_ome_zarr_image


@pytest.fixture()
def stack():
    return np.random.default_rng(0).integers(0, 255, size=(3, 150, 101), dtype=np.uint8)


def test_write_and_read_back(tmp_path, stack):
    path = write_ome_zarr_image(tmp_path / "img.zarr", stack, "zyx", {"z": 50.0, "y": 4.6, "x": 4.6}, levels=3)
    # independent check with ome-zarr's own reader: a multiscale image with 3 levels, z never downsampled
    nodes = list(Reader(parse_url(path))())
    ms = [n for n in nodes if n.load(Multiscales) is not None][0]
    assert [d.shape for d in ms.data] == [(3, 150, 101), (3, 75, 50), (3, 37, 25)]
    np.testing.assert_array_equal(np.asarray(ms.data[0]), stack)

    image = read_image(path)
    assert image.axes == "zyx" and isinstance(image.array, da.Array)
    assert image.pixel_size == {"z": 50.0, "y": 4.6, "x": 4.6} and image.unit == "nanometer"
    assert image.metadata["ngff_version"] == "0.5" and image.metadata["zarr_format"] == 3
    np.testing.assert_array_equal(image.array.compute(), stack)


def test_ngff_04_zarr_v2(tmp_path, stack):
    path = write_ome_zarr_image(tmp_path / "v04.zarr", stack[0], "yx", (8.0, 8.0), levels=2, ngff_version="0.4")
    assert (tmp_path / "v04.zarr" / ".zattrs").exists()
    image = read_image(path)
    assert image.axes == "yx" and image.metadata["ngff_version"] == "0.4"
    assert image.pixel_size == {"y": 8.0, "x": 8.0}
    np.testing.assert_array_equal(image.array.compute(), stack[0])


def test_layout(tmp_path, stack):
    path = write_ome_zarr_image(tmp_path / "img.zarr", stack, "zyx", levels=2, chunks=(1, 64, 64))
    layout = read_multiscales(path)
    assert layout.axis_names == "zyx" and layout.zarr_format == 3
    assert layout.shapes == [(3, 150, 101), (3, 75, 50)] and layout.chunks[0] == (1, 64, 64)
    written = zarr.open_group(path, mode="r").attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in layout.datasets] == [d["path"] for d in written]


def test_channel_axis(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, size=(2, 4, 32, 48), dtype=np.uint8)
    path = write_ome_zarr_image(tmp_path / "c.zarr", data, "czyx", levels=1)
    with pytest.raises(ImageFormatError, match="2 channels"):
        read_image(path)
    image = read_image(path, channel=1)
    assert image.axes == "zyx"
    np.testing.assert_array_equal(image.array.compute(), data[1])


def test_group_without_multiscales(tmp_path):
    group = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    group.create_array("0", shape=(4, 4), dtype="uint8")
    with pytest.raises(ImageFormatError, match="multiscales"):
        read_image(tmp_path / "plain.zarr")


def test_bare_zarr_array(tmp_path):
    zarr.open_array(tmp_path / "arr.zarr", mode="w", shape=(8, 8), dtype="uint8")
    with pytest.raises(ImageFormatError, match="multiscales"):
        read_image(tmp_path / "arr.zarr")


def test_missing_store(tmp_path):
    with pytest.raises(ImageNotFoundError):
        read_image(tmp_path / "missing.zarr")


def test_directory_that_is_not_zarr(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ImageFormatError, match="not a zarr"):
        read_image(tmp_path / "folder")


def test_refuses_to_overwrite(tmp_path, stack):
    write_ome_zarr_image(tmp_path / "img.zarr", stack, "zyx", levels=1)
    with pytest.raises(FileExistsError):
        write_ome_zarr_image(tmp_path / "img.zarr", stack, "zyx", levels=1)
