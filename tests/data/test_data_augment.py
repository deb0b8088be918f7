"""Augmentations: same geometry on image and labels, shape-preserving rotations, intensity formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_affmae.data import AugmentConfig, augment_batch, augment_pair
from napari_affmae.data.augment import AugmentParams, apply_geometry, apply_intensity, draw_params

IDENTITY_INTENSITY = AugmentConfig(gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=(0.0, 0.0))


def test_geometry_identical_on_image_and_labels():
    rng = np.random.default_rng(0)
    labels = np.random.default_rng(1).integers(0, 4, size=(24, 24)).astype(np.int64)
    for _ in range(20):
        image, lab = augment_pair(labels.astype(np.float32), labels, rng, IDENTITY_INTENSITY)
        np.testing.assert_array_equal(image, lab.astype(np.float32))


def test_geometry_matches_numpy_reference():
    x = np.arange(12.0).reshape(3, 4)
    params = AugmentParams(True, False, 2, 1.0, 1.0, 0.0, 0.0)
    np.testing.assert_array_equal(apply_geometry(x, params), np.rot90(x[::-1], 2))
    params = AugmentParams(False, True, 1, 1.0, 1.0, 0.0, 0.0)
    np.testing.assert_array_equal(apply_geometry(x, params), np.rot90(x[:, ::-1], 1))


def test_non_square_crops_keep_their_shape():
    rng = np.random.default_rng(0)
    ks = set()
    for _ in range(50):
        p = draw_params(rng, AugmentConfig(), 16, 40)
        ks.add(p.k_rot90)
    assert ks == {0, 2}
    ks_square = {draw_params(rng, AugmentConfig(), 32, 32).k_rot90 for _ in range(60)}
    assert ks_square == {0, 1, 2, 3}
    image = np.zeros((2, 16, 40), np.float32)
    out, lab = augment_batch(image, np.zeros((2, 16, 40), np.int64), rng, AugmentConfig(allow_transpose=True))
    assert out.shape == (2, 16, 40) and lab.shape == (2, 16, 40)
    transposed = {augment_pair(image[0], None, rng, AugmentConfig(allow_transpose=True))[0].shape for _ in range(40)}
    assert transposed == {(16, 40), (40, 16)}


def test_intensity_formula_and_labels_untouched():
    x = np.linspace(-0.2, 1.2, 50, dtype=np.float32).reshape(5, 10)
    p = AugmentParams(False, False, 0, gamma=1.3, contrast=0.9, brightness=0.05, noise_std=0.0)
    g = np.sign(x.astype(np.float64)) * np.abs(x.astype(np.float64)) ** 1.3
    expected = (g - g.mean()) * 0.9 + g.mean() + 0.05
    np.testing.assert_allclose(apply_intensity(x, p), expected, rtol=1e-5, atol=1e-6)
    labels = np.arange(50).reshape(5, 10)
    rng = np.random.default_rng(3)
    _, lab = augment_pair(x, labels, rng, AugmentConfig(flip=False, rot90=False))
    np.testing.assert_array_equal(lab, labels)


def test_torch_matches_numpy():
    x = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    p = AugmentParams(True, True, 3, gamma=0.8, contrast=1.1, brightness=-0.02, noise_std=0.0)
    out_np = apply_intensity(apply_geometry(x, p), p)
    out_t = apply_intensity(apply_geometry(torch.from_numpy(x), p), p)
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-5, atol=1e-6)


def test_batch_seeded_and_per_sample():
    images = torch.rand(4, 1, 16, 16)
    labels = torch.randint(0, 3, (4, 16, 16))
    a, la = augment_batch(images, labels, np.random.default_rng(5))
    b, lb = augment_batch(images, labels, np.random.default_rng(5))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == images.shape and la.shape == labels.shape
    # samples get different augmentations: not all identical transforms of their inputs
    params = [draw_params(np.random.default_rng(s), AugmentConfig(), 16, 16) for s in range(4)]
    assert len({(p.flip_y, p.flip_x, p.k_rot90) for p in params}) > 1


def test_integer_image_rejected():
    with pytest.raises(ValueError, match="float"):
        augment_pair(np.zeros((8, 8), np.uint8), None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="same H x W"):
        augment_pair(np.zeros((8, 8), np.float32), np.zeros((8, 9)), np.random.default_rng(0))
