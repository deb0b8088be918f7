"""Patch samplers: crop shapes and content, seeds, array types, padding and clear errors."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_affmae.data import CropLocation, LabeledPatchSampler, PatchSampler, read_crop


@pytest.fixture()
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    plain = rng.integers(0, 255, size=(70, 90), dtype=np.uint8)  # 2D
    stack = rng.integers(0, 255, size=(4, 64, 80), dtype=np.uint8)
    z = zarr.open_array(tmp_path / "s.zarr", mode="w", shape=stack.shape, chunks=(1, 32, 32), dtype="uint8")
    z[...] = stack
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.uint8, shape=(3, 50, 100))
    mm[...] = rng.integers(0, 255, size=mm.shape, dtype=np.uint8)
    mm.flush()
    memmap = np.load(tmp_path / "m.npy", mmap_mode="r")
    dask_stack = da.from_array(stack[::-1].copy(), chunks=(1, 32, 40))
    return [plain, z, memmap, dask_stack], [plain, stack, np.asarray(memmap), stack[::-1]]


def _reference(array: np.ndarray, loc: CropLocation, h: int, w: int) -> np.ndarray:
    plane = array if array.ndim == 2 else array[loc.z]
    return plane[loc.y : loc.y + h, loc.x : loc.x + w]


def test_crops_match_source_regions_for_every_array_type(arrays):
    lazy, reference = arrays
    sampler = PatchSampler(lazy, (24, 40), seed=0)
    locations = sampler.sample_locations(60)
    assert {loc.source for loc in locations} == {0, 1, 2, 3}
    for loc in locations:
        crop = sampler.read(loc)
        assert crop.shape == (24, 40) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, _reference(reference[loc.source], loc, 24, 40))
    assert sampler.sample(5).shape == (5, 24, 40)


def test_seeded(arrays):
    lazy, _ = arrays
    a = PatchSampler(lazy, 32, seed=7).sample(6)
    b = PatchSampler(lazy, 32, seed=7).sample(6)
    c = PatchSampler(lazy, 32, seed=8).sample(6)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_sources_weighted_by_pixel_count():
    small = np.zeros((1, 40, 40), np.uint8)
    big = np.zeros((3, 40, 40), np.uint8)
    sources = [loc.source for loc in PatchSampler([small, big], 16, seed=0).sample_locations(4000)]
    assert np.mean(np.array(sources) == 1) == pytest.approx(0.75, abs=0.03)


def test_too_small_image_error_and_padding():
    image = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    with pytest.raises(ValueError, match="reduce the crop size"):
        PatchSampler([image], (32, 16))
    sampler = PatchSampler([image], (32, 16), pad=True, seed=0)
    for loc in sampler.sample_locations(10):
        crop = sampler.read(loc)
        assert crop.shape == (32, 16)
        expected = np.pad(image, ((0, 12), (0, 0)), mode="reflect")[:, loc.x : loc.x + 16]
        np.testing.assert_array_equal(crop, expected)


def test_read_crop_pads_outside_parts():
    image = np.arange(36).reshape(6, 6)
    crop = read_crop(image, 0, -2, 3, 5, 5, pad_mode="constant")
    expected = np.pad(image, 4)[4 - 2 : 4 - 2 + 5, 4 + 3 : 4 + 3 + 5]
    np.testing.assert_array_equal(crop, expected)


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 8, 8)), np.zeros(8)])
def test_wrong_rank_error(bad):
    with pytest.raises(ValueError, match="2D"):
        PatchSampler([bad], 4)


def test_bad_crop_size():
    with pytest.raises(ValueError, match="crop_size"):
        PatchSampler([np.zeros((8, 8))], (4, 4, 4))


def _sparse_labels():
    labels = np.zeros((3, 96, 128), np.uint8)
    labels[0, 10:60, 20:24] = 1  # a thin vertical stroke
    labels[2, 70:72, 30:110] = 2  # a thin horizontal stroke
    labels[1, 40, 100] = 3  # one rare painted pixel
    return labels


def test_labeled_crops_contain_painted_pixels_and_match():
    labels = _sparse_labels()
    image = np.random.default_rng(0).integers(0, 255, size=labels.shape, dtype=np.uint8)
    sampler = LabeledPatchSampler([image], [labels], (32, 48), seed=0)
    assert sampler.classes == [1, 2, 3]
    for loc in sampler.sample_locations(100):
        img, lab = sampler.read(loc)
        assert img.shape == lab.shape == (32, 48)
        assert (lab > 0).any()
        np.testing.assert_array_equal(lab, _reference(labels, loc, 32, 48))
        np.testing.assert_array_equal(img, _reference(image, loc, 32, 48))
    images, labs = sampler.sample(4)
    assert images.shape == labs.shape == (4, 32, 48)


def test_class_balanced_sampling_reaches_rare_class():
    labels = _sparse_labels()
    image = np.zeros(labels.shape, np.uint8)
    balanced = LabeledPatchSampler(image, labels, 32, seed=1)
    rare = np.mean([(balanced.read(loc)[1] == 3).any() for loc in balanced.sample_locations(300)])
    assert rare == pytest.approx(1 / 3, abs=0.08)
    proportional = LabeledPatchSampler(image, labels, 32, seed=1, balance_classes=False)
    rare_p = np.mean([(proportional.read(loc)[1] == 3).any() for loc in proportional.sample_locations(300)])
    assert rare_p < 0.05


def test_labeled_padding_fills_labels_with_zero():
    labels = np.zeros((20, 20), np.uint8)
    labels[5, 5] = 1
    image = np.ones((20, 20), np.float32)
    with pytest.raises(ValueError, match="reduce the crop size"):
        LabeledPatchSampler(image, labels, 32)
    sampler = LabeledPatchSampler(image, labels, 32, pad=True, seed=0)
    for loc in sampler.sample_locations(20):
        img, lab = sampler.read(loc)
        assert img.shape == lab.shape == (32, 32)
        assert lab.sum() == 1 and (img == 1).all()


def test_labeled_errors():
    image = np.zeros((32, 32), np.uint8)
    with pytest.raises(ValueError, match="no painted pixels"):
        LabeledPatchSampler(image, np.zeros((32, 32), np.uint8), 16)
    with pytest.raises(ValueError, match="shape"):
        LabeledPatchSampler(image, np.zeros((32, 30), np.uint8), 16)
    with pytest.raises(ValueError, match="integers"):
        LabeledPatchSampler(image, np.ones((32, 32), np.float32), 16)
    with pytest.raises(ValueError, match="one per image"):
        LabeledPatchSampler([image, image], [np.ones((32, 32), np.uint8)], 16)
