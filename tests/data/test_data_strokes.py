"""Sparse scribbles drawn from dense labels: inside their class, sparse, deterministic, stroke-shaped."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_affmae.data import sparse_strokes, synthetic_em


@pytest.fixture(scope="module")
def labels():
    return synthetic_em((6, 160, 224), seed=5)[1]


def test_strokes_lie_inside_their_class_and_are_sparse(labels):
    strokes = sparse_strokes(labels, fraction=0.02, seed=0)
    assert strokes.shape == labels.shape and strokes.dtype == labels.dtype
    painted = strokes > 0
    np.testing.assert_array_equal(strokes[painted], labels[painted])
    assert 0.005 < painted.mean() < 0.05
    for value in (1, 2, 3):
        assert (strokes == value).sum() > 50, value


def test_deterministic(labels):
    np.testing.assert_array_equal(sparse_strokes(labels, seed=3), sparse_strokes(labels, seed=3))
    assert (sparse_strokes(labels, seed=3) != sparse_strokes(labels, seed=4)).any()


def test_strokes_are_connected_scribbles_not_scattered_pixels(labels):
    strokes = sparse_strokes(labels[0], fraction=0.03, seed=1)
    for value in (1, 3):
        comps, count = ndimage.label(strokes == value, structure=np.ones((3, 3)))
        assert count > 0
        assert (strokes == value).sum() / count >= 15, (value, count)


def test_only_requested_slices_and_classes(labels):
    strokes = sparse_strokes(labels, fraction=0.02, slices=[1, 4], classes=[1, 2])
    assert not strokes[[0, 2, 3, 5]].any()
    assert strokes[1].any() and strokes[4].any()
    assert set(np.unique(strokes)) == {0, 1, 2}


def test_labels_with_unlabelled_pixels():
    dense = np.zeros((64, 96), np.uint8)
    dense[10:50, 10:40] = 2
    dense[20:30, 60:90] = 5
    strokes = sparse_strokes(dense, fraction=0.04, seed=2)
    painted = strokes > 0
    np.testing.assert_array_equal(strokes[painted], dense[painted])
    assert set(np.unique(strokes)) == {0, 2, 5}


@pytest.mark.parametrize(
    "kwargs",
    [{"fraction": 0.0}, {"fraction": 1.5}, {"classes": [0, 1]}, {"slices": [9]}, {"stroke_width": 0}],
)
def test_bad_arguments(labels, kwargs):
    with pytest.raises(ValueError):
        sparse_strokes(labels, **kwargs)


def test_float_labels_rejected():
    with pytest.raises(ValueError, match="integer"):
        sparse_strokes(np.zeros((8, 8), np.float32))
