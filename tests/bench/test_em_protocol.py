"""The real-EM protocol on synthetic data: splits, simulated strokes, metrics on crafted masks."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_affmae.bench import em_protocol as P
from napari_affmae.data import MITOCHONDRION, synthetic_em


def test_split_of_the_real_stacks_is_written_down() -> None:
    vnc = P.make_split(20)  # VNC stack1: 20 slices
    assert vnc.eval_slices == tuple(range(10, 20))
    assert vnc.labelled(1) == [4]
    assert vnc.labelled(2) == [4, 9]
    assert vnc.labelled(4) == [0, 2, 4, 9]
    assert vnc.labelled("all") == list(range(10))
    isbi = P.make_split(30)
    assert isbi.eval_slices == tuple(range(15, 30))
    assert isbi.labelled(1) == [7]
    assert P.make_split(6).label_order == (1, 0, 2)


@pytest.mark.parametrize("depth", [2, 3, 6, 7, 20, 30])
def test_splits_never_overlap_and_are_nested(depth: int) -> None:
    split = P.make_split(depth)
    pool = set(split.label_order)
    assert len(pool) == len(split.label_order) == depth // 2
    assert pool.isdisjoint(split.eval_slices)
    assert pool | set(split.eval_slices) == set(range(depth))
    previous: set[int] = set()
    for k in range(1, len(pool) + 1):
        chosen = set(split.labelled(k))
        assert len(chosen) == k and previous <= chosen and chosen.isdisjoint(split.eval_slices)
        previous = chosen


def test_bad_split_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2 slices"):
        P.make_split(1)
    with pytest.raises(ValueError, match="between 1 and 3"):
        P.make_split(6).labelled(4)
    with pytest.raises(ValueError, match="positive integer"):
        P.parse_k("two")
    assert P.parse_k("ALL") == "all" and P.parse_k("4") == 4


@pytest.fixture(scope="module")
def synthetic_truth() -> np.ndarray:
    _, classes = synthetic_em((6, 96, 128), seed=3)
    return (classes == MITOCHONDRION).astype(np.uint8)  # [6, 96, 128] binary mitochondria


def test_dense_labels_cover_only_the_chosen_slices(synthetic_truth: np.ndarray) -> None:
    labels = P.training_labels(synthetic_truth, [0, 2], "dense")
    assert labels.dtype == np.uint8 and labels.shape == synthetic_truth.shape
    assert not labels[[1, 3, 4, 5]].any()
    expected = np.where(synthetic_truth[[0, 2]] > 0, 2, 1)
    np.testing.assert_array_equal(labels[[0, 2]], expected)


def test_sparse_strokes_stay_inside_their_class_and_under_5_percent(synthetic_truth: np.ndarray) -> None:
    split = P.make_split(6)
    chosen = split.labelled("all")
    labels = P.training_labels(synthetic_truth, chosen, "sparse", seed=1)
    classes = P.painted_classes(synthetic_truth)
    for z in range(6):
        painted = labels[z] > 0
        if z not in chosen:
            assert not painted.any(), f"slice {z} is not labelled but carries strokes"
            continue
        assert 0 < painted.mean() < 0.05
        np.testing.assert_array_equal(labels[z][painted], classes[z][painted])  # only inside their class
        assert set(np.unique(labels[z][painted])) == {1, 2}  # background strokes too: two classes painted
    assert not labels[list(split.eval_slices)].any()


def test_sparse_strokes_are_deterministic(synthetic_truth: np.ndarray) -> None:
    a = P.training_labels(synthetic_truth, [1], "sparse", seed=5)
    b = P.training_labels(synthetic_truth, [1], "sparse", seed=5)
    c = P.training_labels(synthetic_truth, [1], "sparse", seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # a slice's strokes do not depend on which other slices are labelled
    np.testing.assert_array_equal(P.training_labels(synthetic_truth, [0, 1], "sparse", seed=5)[1], a[1])


def test_iou_and_dice_on_a_crafted_mask() -> None:
    truth = np.zeros((3, 3), np.uint8)
    truth[0, :2] = 1  # 2 structure pixels
    pred = np.zeros((3, 3), np.uint8)
    pred[0, 0] = 1  # 1 of them found, no false positive
    s = P.segmentation_scores(pred, truth, ("background", "mito"))
    # structure: tp 1, fp 0, fn 1 -> IoU 1/2, Dice 2/3; background: tp 7, fp 1, fn 0 -> IoU 7/8, Dice 14/15
    assert s["fg_iou"] == pytest.approx(0.5) and s["fg_dice"] == pytest.approx(2 / 3)
    assert s["iou"]["background"] == pytest.approx(7 / 8) and s["dice"]["background"] == pytest.approx(14 / 15)
    empty = P.segmentation_scores(np.zeros((2, 2)), np.zeros((2, 2)), ("bg", "fg"))
    assert empty["fg_iou"] is None and empty["iou"]["bg"] == 1.0


def test_boundary_f1_on_crafted_lines() -> None:
    truth = np.zeros((5, 7), np.uint8)
    truth[:, 2] = 1  # vertical membrane, 5 px
    pred = np.zeros((5, 7), np.uint8)
    pred[:, 4] = 1  # 2 px away: matched at tolerance 2, not at 1
    pred[4, 6] = 1  # 4 px away: never matched
    two = P.boundary_f1(pred, truth, tolerance=2)
    assert two["precision"] == pytest.approx(5 / 6) and two["recall"] == pytest.approx(1.0)
    assert two["f1"] == pytest.approx(10 / 11)
    assert P.boundary_f1(pred, truth, tolerance=1)["f1"] == 0.0
    short = np.zeros((5, 7), np.uint8)
    short[:3, 3] = 1  # next to rows 0..2 of the truth; rows 3, 4 are sqrt(2) and sqrt(5) away
    one = P.boundary_f1(short, truth, tolerance=1)
    assert one["precision"] == pytest.approx(1.0) and one["recall"] == pytest.approx(3 / 5)
    assert one["f1"] == pytest.approx(0.75)
    assert P.boundary_f1(np.zeros((3, 3)), np.zeros((3, 3)))["f1"] == 1.0
    assert P.boundary_f1(np.zeros((3, 3)), np.eye(3))["f1"] == 0.0
    with pytest.raises(ValueError, match="same shape|one shape"):
        P.boundary_f1(np.zeros((3, 3)), np.zeros((3, 4)))


def test_evaluate_stack_scores_only_the_evaluation_slices() -> None:
    truth = np.zeros((4, 5, 7), np.uint8)
    truth[:, :, 2] = 1
    pred = truth.copy()
    pred[0] = 0  # a wrong slice that is not evaluated
    pred[3, :, 2] = 0
    pred[3, :, 3] = 1  # shifted by 1 px: IoU 0 but boundary F1 1 at tolerance 2
    task = P.TASKS["vnc_membranes"]
    s = P.evaluate_stack(pred, truth, task, [2, 3])
    assert s["eval_slices"] == [2, 3]
    # structure: tp 5 (slice 2), fp 5, fn 5 -> IoU 1/3, Dice 1/2
    assert s["fg_iou"] == pytest.approx(1 / 3) and s["fg_dice"] == pytest.approx(0.5)
    assert s["boundary_f1"] == pytest.approx(1.0)
    assert "boundary_f1" not in P.evaluate_stack(pred, truth, P.TASKS["vnc_mito"], [2, 3])


def test_summarise_mean_and_spread() -> None:
    s = P.summarise([0.5, 0.7, None, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["n"] == 3
    assert P.summarise([0.4])["std"] == 0.0
    assert P.summarise([None])["mean"] is None


def test_load_task_reads_the_layout_and_names_missing_files(tmp_path) -> None:
    image, classes = synthetic_em((4, 32, 40), seed=0)
    (tmp_path / "vnc").mkdir()
    tifffile.imwrite(tmp_path / "vnc" / "stack1_raw.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "vnc" / "stack1_mito.tif", (classes == MITOCHONDRION).astype(np.uint8),
                     photometric="minisblack")
    raw, truth, extra = P.load_task(tmp_path, "vnc_mito")
    assert raw.shape == truth.shape == (4, 32, 40) and set(np.unique(truth)) <= {0, 1}
    assert extra == []  # stack2_raw absent: pretraining uses the stack itself only
    with pytest.raises(FileNotFoundError, match="stack1_membranes.tif"):
        P.load_task(tmp_path, "vnc_membranes")


def _disk_image(dark: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noisy [2, 64, 64] image with a disk of radius 14 (the structure) darker or brighter than the rest."""
    yy, xx = np.mgrid[:64, :64]
    disk = ((yy - 32) ** 2 + (xx - 30) ** 2 < 14**2).astype(np.uint8)
    rng = np.random.default_rng(0)
    inside, outside = (60.0, 160.0) if dark else (160.0, 60.0)
    image = np.where(disk, inside, outside) + rng.normal(0, 25, (2, 64, 64))
    return np.clip(image, 0, 255).astype(np.uint8), np.stack([disk, disk])


@pytest.mark.parametrize("dark", [True, False])
def test_threshold_fitted_on_strokes_recovers_a_disk(dark: bool) -> None:
    image, truth = _disk_image(dark)
    labels = P.training_labels(truth, [0], "sparse", seed=0)  # strokes on slice 0 only
    cut = P.fit_threshold(image, labels)
    assert cut.dark_foreground is dark
    assert 85 < cut.threshold < 135  # between the two grey levels 60 and 160
    scores = P.segmentation_scores(cut.predict(image[1]), truth[1], ["background", "structure"])
    assert scores["fg_iou"] > 0.9  # the unlabelled slice: smoothing removes the noise


def test_threshold_is_the_balanced_accuracy_optimum_on_crafted_values() -> None:
    # structure painted at 10, 20, 30, 35, background at 32, 40, 50. Cuts (structure < cut) in (20, 30] score
    # (2/4 + 3/3) / 2 = 0.75, in (30, 32] (3/4 + 3/3) / 2 = 0.875, in (35, 40] (4/4 + 2/3) / 2 = 0.83: the best
    # cut lies in (30, 32]
    image = np.array([[10, 20, 30, 35, 32, 40, 50]], np.float32)
    labels = np.array([[2, 2, 2, 2, 1, 1, 1]], np.uint8)
    cut = P.fit_threshold(image, labels, sigma=0)
    assert cut.dark_foreground
    assert 30 < cut.threshold <= 32
    assert cut.predict(image).tolist() == [[1, 1, 1, 0, 0, 0, 0]]


def test_threshold_needs_both_classes_and_matching_shapes() -> None:
    image = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="both classes"):
        P.fit_threshold(image, np.ones((8, 8), np.uint8))
    with pytest.raises(ValueError, match="must have the image's shape"):
        P.fit_threshold(image, np.ones((8, 9), np.uint8))


def test_correction_strokes_paint_errors_with_their_true_class() -> None:
    truth = np.zeros((200, 200), np.uint8)
    truth[40:120, 40:120] = 1  # one big structure
    pred = np.zeros_like(truth)
    pred[60:120, 40:120] = 1  # misses its top rows (false negatives) ...
    pred[150:190, 10:190] = 1  # ... and calls a big background band structure (false positives)
    pred[5, 5] = 1  # a one-pixel false positive: too small to be worth a stroke
    labels = np.zeros_like(truth)
    labels[100:103, 60:90] = P.FOREGROUND  # an earlier stroke
    new = P.correction_strokes(labels, pred, truth, seed=3)
    assert (new[100:103, 60:90] == P.FOREGROUND).all()  # earlier strokes are kept
    added = (new > 0) & (labels == 0)
    fp, fn = (pred > 0) & (truth == 0), (pred == 0) & (truth > 0)
    assert added.any() and (added <= (fp | fn)).all()  # only where the prediction is wrong
    assert (new[added & fp] == P.BACKGROUND).all() and (new[added & fn] == P.FOREGROUND).all()
    assert (new[added & fp]).size > 0 and (new[added & fn]).size > 0  # both kinds of error get strokes
    assert new[5, 5] == 0
    assert abs(added.sum() - P.CORRECTION_FRACTION * truth.size) <= 0.3 * P.CORRECTION_FRACTION * truth.size
    np.testing.assert_array_equal(new, P.correction_strokes(labels, pred, truth, seed=3))  # deterministic
    np.testing.assert_array_equal(P.correction_strokes(labels, truth, truth), labels)  # nothing wrong: no stroke
    with pytest.raises(ValueError, match="one shape"):
        P.correction_strokes(labels, pred[:10], truth)


def test_data_folder_from_the_option_the_variable_or_a_checkout_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv(P.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=r"--data-dir or set \$AFFMAE_DATA"):
        P.resolve_data_dir()
    with pytest.raises(FileNotFoundError, match="nor is there"):
        P.resolve_data_dir(None, tmp_path / "missing")  # a fallback that does not exist is no answer
    with pytest.raises(FileNotFoundError, match="AFFMAE_DATA"):
        P.default_data_dir()  # nothing relative to the installed package
    assert P.resolve_data_dir(None, tmp_path) == tmp_path
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert P.default_data_dir(tmp_path / "repo") == tmp_path / "shared" / "data"  # beside a checkout
    monkeypatch.setenv(P.DATA_ENV, str(tmp_path / "env"))
    assert P.resolve_data_dir(None, tmp_path) == tmp_path / "env"  # the variable before the fallback
    assert P.resolve_data_dir(tmp_path / "opt", tmp_path) == tmp_path / "opt"  # the option before both
