"""read_image on in-memory arrays and .npy files."""
from __future__ import annotations

import numpy as np
import pytest

from napari_affmae.io import ImageFormatError, read_image


def test_numpy_arrays_get_axes():
    assert read_image(np.zeros((20, 30), np.uint8)).axes == "yx"
    image = read_image(np.zeros((4, 20, 30), np.uint16))
    assert image.axes == "zyx" and image.source is None and not image.is_lazy
    assert read_image(np.zeros((1, 20, 30), np.float32)).axes == "yx"  # a single slice is 2D


def test_rgb_like_array_rejected_unless_axes_given():
    rgb = np.zeros((64, 80, 3), np.uint8)
    with pytest.raises(ImageFormatError, match="RGB"):
        read_image(rgb)
    assert read_image(rgb, axes="zyx").axes == "zyx"


def test_4d_array_needs_axes():
    data = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    with pytest.raises(ImageFormatError, match="axes"):
        read_image(data)
    image = read_image(data, axes="czyx", channel=1)
    np.testing.assert_array_equal(image.array, data[1])


def test_bad_dtype_and_type():
    with pytest.raises(ImageFormatError, match="dtype"):
        read_image(np.zeros((8, 8), bool))
    with pytest.raises(ImageFormatError, match="path or an array"):
        read_image(42)


def test_npy_file_memory_mapped(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, size=(3, 16, 24), dtype=np.uint8)
    np.save(tmp_path / "x.npy", data)
    image = read_image(tmp_path / "x.npy")
    assert isinstance(image.array, np.memmap) and image.axes == "zyx"
    np.testing.assert_array_equal(image.array, data)
