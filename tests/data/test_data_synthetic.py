"""Synthetic EM generator: determinism, shapes, class statistics, EM-like contrast, z coherence."""
from __future__ import annotations

import time

import numpy as np
import pytest

from napari_affmae.data import CLASS_NAMES, CYTOPLASM, MEMBRANE, MITOCHONDRION, synthetic_em


@pytest.fixture(scope="module")
def stack():
    return synthetic_em((8, 128, 192), seed=0)


def test_same_seed_identical_and_different_seed_differs(stack):
    image, labels = stack
    image2, labels2 = synthetic_em((8, 128, 192), seed=0)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(labels, labels2)
    image3, labels3 = synthetic_em((8, 128, 192), seed=1)
    assert (image != image3).mean() > 0.5
    assert (labels != labels3).mean() > 0.1


@pytest.mark.parametrize("shape", [(96, 160), (1, 64, 64), (3, 200, 72), (5, 40, 300)])
def test_any_rectangle_2d_or_3d(shape):
    image, labels = synthetic_em(shape, seed=3)
    assert image.shape == shape and labels.shape == shape
    assert image.dtype == np.uint8 and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {MEMBRANE, MITOCHONDRION, CYTOPLASM}


def test_every_pixel_labelled_with_plausible_fractions(stack):
    _, labels = stack
    assert CLASS_NAMES == ("membrane", "mitochondrion", "cytoplasm")
    assert (labels > 0).all()
    fractions = {name: float((labels == i + 1).mean()) for i, name in enumerate(CLASS_NAMES)}
    assert 0.10 <= fractions["membrane"] <= 0.25, fractions
    assert 0.005 <= fractions["mitochondrion"] <= 0.08, fractions
    assert fractions["cytoplasm"] >= 0.6, fractions


def test_em_like_contrast(stack):
    """Membranes darkest, mitochondria dark, cytoplasm light; noise present; full uint8 range used."""
    image, labels = stack
    mean = {c: image[labels == c].mean() for c in (MEMBRANE, MITOCHONDRION, CYTOPLASM)}
    assert mean[MEMBRANE] + 40 < mean[CYTOPLASM]
    assert mean[MITOCHONDRION] + 40 < mean[CYTOPLASM]
    # cristae: mitochondria are textured, not flat
    assert image[labels == MITOCHONDRION].std() > 12
    # noise: neighbouring cytoplasm pixels are not identical
    cyto = labels[:, :, 1:] == CYTOPLASM
    assert np.abs(np.diff(image.astype(int), axis=2))[cyto].mean() > 2


def test_slices_are_coherent_in_z(stack):
    _, labels = stack
    membrane = labels == MEMBRANE

    def overlap(a, b):
        return (a & b).sum() / (a | b).sum()

    neighbours = np.mean([overlap(membrane[z], membrane[z + 1]) for z in range(7)])
    unrelated = overlap(membrane[0], synthetic_em((128, 192), seed=99)[1] == MEMBRANE)
    assert neighbours > 0.45, neighbours
    assert neighbours > 2 * unrelated, (neighbours, unrelated)
    assert (membrane[0] != membrane[7]).any()  # but it does change along z


def test_fast_enough():
    start = time.perf_counter()
    synthetic_em((8, 256, 256), seed=0)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (4, 4)},
        {"shape": (2, 3, 64, 64)},
        {"shape": (64,)},
        {"shape": (64, 64), "cell_size": 2},
        {"shape": (64, 64), "mito_probability": 1.5},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_em(**kwargs)
