"""Taught labels kept beside a package: read back for the same image, classes and package only, 2D and 3D."""
from __future__ import annotations

import numpy as np

from napari_affmae.engine.taught_labels import (add_taught_labels, load_taught_labels, save_taught_labels,
                                                taught_labels_path, teacher_only)


def test_taught_labels_come_back_only_for_unchanged_slices(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, 16, 20), dtype=np.uint8)
    strokes = np.zeros((3, 16, 20), np.uint16)
    strokes[0, 2:4, 2:9] = 1
    strokes[2, 5, 5:15] = 2
    labelled = strokes.copy()
    labelled[0, 8:, :] = 2  # a teacher's pixels
    labelled[2, :4, :] = 1
    taught = teacher_only(strokes, labelled, [0, 2])
    assert taught[0][2, 3] == 0 and taught[0][9, 0] == 2 and taught[2][0, 0] == 1 and 1 not in taught
    package = tmp_path / "segmentation.affmae"  # beside it: segmentation.taught_labels.npz
    assert save_taught_labels(package, image, taught, num_classes=2) == tmp_path / "segmentation.taught_labels.npz"
    kept = load_taught_labels(package, image, [0, 1, 2], num_classes=2)
    assert sorted(kept) == [0, 2]
    np.testing.assert_array_equal(kept[2], taught[2])
    assert sorted(load_taught_labels(package, image, [2], num_classes=2)) == [2]  # only the slices asked for
    changed = image.copy()
    changed[2, 0, 0] ^= 1  # one pixel of slice 2 differs: its labels are not about this image
    assert sorted(load_taught_labels(package, changed, [0, 2], num_classes=2)) == [0]
    assert load_taught_labels(package, image[:, :8], [0, 2], num_classes=2) == {}  # another slice shape
    assert load_taught_labels(package, image, [0, 2], num_classes=3) == {}  # other classes
    assert load_taught_labels(tmp_path / "renamed.affmae", image, [0, 2], num_classes=2) == {}
    # now the person erases a stroke on slice 0 and paints a correction over a teacher pixel
    now = strokes.copy()
    now[0, 2:4, 2:9] = 0
    now[0, 9, 0] = 1
    out, missing = add_taught_labels(now, kept, [0, 1])
    assert missing == [1]
    assert out[0, 9, 0] == 1 and out[0, 10, 0] == 2  # the stroke wins, the teacher's pixel stays
    assert not out[0, 2:4, 2:9].any()  # an erased stroke does not come back
    assert not out[1].any()
    assert save_taught_labels(package, image, {}, num_classes=2) is None  # nothing taught: no file left
    assert not taught_labels_path(package).exists()


def test_a_2d_image_and_a_damaged_file(tmp_path):
    image = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    package = tmp_path / "x.affmae"
    taught = {None: np.zeros((12, 10), np.uint16)}
    taught[None][3:6] = 2
    save_taught_labels(package, image, taught, num_classes=2)
    kept = load_taught_labels(package, image, [None], num_classes=2)
    assert list(kept) == [None] and kept[None][4, 4] == 2
    assert load_taught_labels(package, np.stack([image, image]), [0, 1], num_classes=2) == {}  # not this image
    taught_labels_path(package).write_bytes(b"not a numpy file")
    assert load_taught_labels(package, image, [None], num_classes=2) == {}  # logged; the model is asked instead
    assert load_taught_labels(None, image, [None], num_classes=2) == {}
