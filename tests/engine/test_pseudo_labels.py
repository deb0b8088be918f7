"""Fine-tuning on strokes plus the live preview's confident pixels (`engine.pseudo_labels`)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_affmae.data import sparse_strokes
from napari_affmae.engine import FinetuneConfig, finetune, load_package
from napari_affmae.engine.pseudo_labels import add_pseudo_labels


def test_pseudo_labels_add_mostly_correct_pixels_on_painted_slices_only(em_stack):
    image, truth = em_stack  # truth: 1 membrane, 2 mito, 3 cytoplasm
    strokes = sparse_strokes(truth, fraction=0.03, seed=0, slices=[1])
    before = strokes.copy()
    labels, info = add_pseudo_labels(image, strokes, confidence=0.7)
    assert np.array_equal(strokes, before)  # the caller's labels are not touched
    painted = strokes > 0
    assert np.array_equal(labels[painted], strokes[painted])  # strokes keep their class
    added = (labels > 0) & ~painted
    assert not added[[0, 2, 3]].any()  # only slices with strokes get pseudo-labels
    assert added[1].mean() > 5 * painted[1].mean()  # many more pixels than the strokes
    accuracy = float((labels[added] == truth[added]).mean())
    assert accuracy > 0.85, accuracy  # against the ground truth, not the forest's own output
    assert sum(info["added_pixels"].values()) == int(added.sum()) and info["confidence"] == 0.7
    assert len(info["teacher_class_shares"]) == 3
    # a higher bar adds fewer, more accurate pixels
    strict, _ = add_pseudo_labels(image, strokes, confidence=0.95)
    strict_added = (strict > 0) & ~painted
    assert strict_added.sum() < added.sum()
    assert (strict[strict_added] == truth[strict_added]).mean() >= accuracy - 0.01


def test_a_2d_image_gets_pseudo_labels(em_stack):
    image, truth = em_stack
    strokes = sparse_strokes(truth[1:2], fraction=0.03, seed=1)[0]
    labels, _ = add_pseudo_labels(image[1], strokes, confidence=0.8)
    added = (labels > 0) & (strokes == 0)
    assert labels.shape == strokes.shape and added.any()
    assert (labels[added] == truth[1][added]).mean() > 0.8


@pytest.mark.parametrize("bad", [0.3, 1.0, 1.5])
def test_bad_confidence_is_refused_before_anything_runs(tmp_path, bad):
    with pytest.raises(ValueError, match=r"pseudo_label_confidence must be in \[0.5, 1\)"):
        FinetuneConfig(pseudo_label_confidence=bad, output_dir=tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_finetune_with_pseudo_labels_records_them_and_trains(em_stack, tmp_path):
    image, truth = em_stack
    strokes = sparse_strokes(truth, fraction=0.03, seed=0, slices=[1])
    events = []
    result = finetune(image, strokes, FinetuneConfig(
        model="unet_tiny", crop_size=(64, 64), batch_size=2, steps=3, warmup_steps=1, device="cpu",
        output_dir=tmp_path / "ft", checkpoint_every=100, pseudo_label_confidence=0.8), progress=events.append)
    assert "live preview's forest" in events[0].message and events[0].step == 0  # said before the forest runs
    provenance = load_package(result.package_path).provenance
    assert provenance["config"]["pseudo_label_confidence"] == 0.8
    assert provenance["pseudo_labels"]["confidence"] == 0.8 and provenance["pseudo_labels"]["added_pixels"]
    painted = int((strokes > 0).sum())
    assert provenance["labelled_pixels"] > 5 * painted  # it trained on the pseudo-labelled pixels too


def test_cancel_while_labelling_stops_before_any_training(em_stack, tmp_path):
    from napari_affmae.engine import CancelToken, JobCancelled

    image, truth = em_stack
    strokes = sparse_strokes(truth, fraction=0.03, seed=0, slices=[1])
    token = CancelToken()
    token.cancel()
    with pytest.raises(JobCancelled):
        finetune(image, strokes, FinetuneConfig(model="unet_tiny", crop_size=(64, 64), batch_size=2, steps=3,
                                                device="cpu", output_dir=tmp_path / "ft"), cancel=token)
    assert not list((tmp_path / "ft").glob("*.affmae"))  # nothing trained, nothing half-written
