"""Live preview engine: cached features, forest head, packages that segment whole stacks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_affmae.data.features import N_FILTER_FEATURES, filter_feature_names, filter_features
from napari_affmae.engine import CancelToken, JobCancelled, SegmentConfig, load_package, save_package, segment
from napari_affmae.engine.live import LiveConfig, LivePreview
from napari_affmae.models import create_model


def _two_class_stack(depth: int = 2, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark disks (class 2) on a bright noisy background (class 1): image uint8 and dense truth 1/2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.ones((depth, size, size), np.uint8)
    for z in range(depth):
        for _ in range(6):
            cy, cx, r = rng.integers(10, size - 10), rng.integers(10, size - 10), rng.integers(5, 9)
            truth[z][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 2
    image = np.where(truth == 2, 70.0, 170.0) + rng.normal(0, 12, truth.shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def _strokes(truth: np.ndarray, z: int, every: int = 9) -> np.ndarray:
    """A few painted pixels of both classes on slice z (a sparse grid inside the truth)."""
    labels = np.zeros_like(truth)
    grid = np.zeros(truth.shape[1:], bool)
    grid[::every, ::every] = True
    labels[z][grid] = truth[z][grid]
    return labels


def test_filter_features_are_the_documented_gaussian_edge_hessian_bank() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 56)).astype(np.float32)
    feats = filter_features(image)
    assert feats.shape == (40, 56, N_FILTER_FEATURES) and feats.dtype == np.float32
    names = filter_feature_names()
    assert len(names) == N_FILTER_FEATURES and names[0] == "gaussian s1" and names[-1] == "hessian2 s16"
    # channel "gaussian s<sigma>" is a Gaussian smoothing of the slice (nearest-edge mode, truncated at 4 sigma)
    for channel in (0, 4, 16):
        sigma = float(names[channel].split(" s")[1])
        reference = ndimage.gaussian_filter(image.astype(np.float64), sigma, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(feats[..., channel], reference, atol=1e-5)
    with pytest.raises(ValueError, match="one 2D slice"):
        filter_features(np.zeros((2, 8, 8)))


def test_preview_learns_from_a_few_painted_pixels_and_generalises_to_another_slice() -> None:
    image, truth = _two_class_stack()
    labels = _strokes(truth, 0)
    preview = LivePreview(image, LiveConfig(trees=30))
    result = preview.update(labels, z=0, probabilities=True)
    assert result.labels.shape == (96, 96) and result.probabilities.shape == (2, 96, 96)
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, atol=1e-5)
    painted = labels[0] > 0
    assert (result.labels[painted] == labels[0][painted]).mean() > 0.98
    other, _ = preview.predict(1)  # an unpainted slice
    fg_pred, fg_true = other == 2, truth[1] == 2
    assert (fg_pred & fg_true).sum() / (fg_pred | fg_true).sum() > 0.8
    assert result.n_painted == int(painted.sum()) and set(result.timings) >= {"fit_s", "predict_s", "total_s"}


def test_bad_labels_get_one_clear_message() -> None:
    image, truth = _two_class_stack()
    preview = LivePreview(image, LiveConfig(trees=5))
    one_class = _strokes(truth, 0)
    one_class[one_class == 2] = 0
    with pytest.raises(ValueError, match=r"only one class \(1\) is painted: at least two classes must be painted"):
        preview.update(one_class, z=0)
    with pytest.raises(ValueError, match="no painted pixels"):
        preview.update(np.zeros_like(truth), z=0)
    with pytest.raises(ValueError, match=r"labels of shape \(1, 96, 96\) do not match the image \(2, 96, 96\)"):
        preview.update(truth[:1], z=0)
    many = np.zeros(truth.shape, np.int32)
    many[0].flat[:300] = np.arange(1, 301)
    with pytest.raises(ValueError, match=r"300 different values \(1, 2, 3, 4, 5, ..., 300\); at most 255"):
        preview.update(many, z=0)
    with pytest.raises(ValueError, match="integers"):
        preview.update(_strokes(truth, 0).astype(np.float32), z=0)
    with pytest.raises(RuntimeError, match="not trained yet"):
        preview.predict(0)
    with pytest.raises(ValueError, match="too small for the live preview"):
        LivePreview(np.zeros((8, 8), np.uint8) + np.eye(8, dtype=np.uint8))
    with pytest.raises(ValueError, match="constant image"):
        LivePreview(np.zeros((32, 32), np.uint8))


def test_cache_is_bounded_freed_and_reused() -> None:
    image, truth = _two_class_stack(depth=3)
    labels = _strokes(truth, 0)
    one_slice = 96 * 96 * N_FILTER_FEATURES * 4  # float32 filter features
    preview = LivePreview(image, LiveConfig(trees=5, max_cache_mb=2.5 * one_slice / 2**20))  # room for 2 slices
    preview.update(labels, z=0)
    assert preview.cache_bytes == one_slice
    labels[0, 50, 2:20] = 1  # a new stroke: refit with all features cached
    assert preview.update(labels, z=0).timings["new_windows"] == 0
    preview.predict(1)
    preview.predict(2)  # a third slice: over the bound, the least recently used one (0) goes
    assert preview.cache_bytes == 2 * one_slice
    labels[0, 60, 2:20] = 1  # another stroke on slice 0: it is needed again for training (recomputed); 2 is cached
    result = preview.update(labels, z=2)
    assert result.timings["new_windows"] == 1
    preview.clear()
    assert preview.cache_bytes == 0
    assert preview.predict(1)[0].shape == (96, 96)  # the forest survives a cleared cache


def test_cancel_stops_an_update() -> None:
    image, truth = _two_class_stack()
    token = CancelToken()
    token.cancel()
    with pytest.raises(JobCancelled):
        LivePreview(image, LiveConfig(trees=5)).update(_strokes(truth, 0), z=0, cancel=token)


def test_large_slices_are_featurised_view_by_view() -> None:
    image, truth = _two_class_stack(depth=1, size=320)
    preview = LivePreview(image[0], LiveConfig(trees=20, max_window_pixels=64 * 64))
    labels = _strokes(truth, 0, every=4)[0]
    labels[60:, :] = 0  # paint only the top-left corner: only a window around it is featurised
    labels[:, 60:] = 0
    result = preview.update(labels, region=(0, 64, 0, 64))
    assert result.labels.shape == (64, 64) and result.region == (0, 64, 0, 64)
    # strokes inside (0..60)^2 and the view (0..64)^2, each with a 64 px context margin
    # cells of 64 px on a fixed grid, each featurised with a 64 px context margin: strokes and view share one
    assert preview.cell_side == (64, 64) and list(preview._cache) == [(0, 0, 128, 0, 128)]
    labels[70:72, 70:90] = 1  # a stroke in the next cell: only that cell's window is new
    assert preview.update(labels, region=(0, 64, 0, 64)).timings["new_windows"] == 1
    assert (0, 0, 192, 0, 192) in preview._cache
    whole, _ = preview.predict(0)  # the whole slice, cell by cell (each cell's window within the bound)
    assert whole.shape == (320, 320)
    np.testing.assert_array_equal(whole[:64, :64], preview.predict(0, (0, 64, 0, 64))[0])  # same cells, same result


def test_kept_model_segments_a_stack_like_the_preview(tmp_path: Path) -> None:
    image, truth = _two_class_stack(depth=2, size=128)
    labels = _strokes(truth, 0)
    preview = LivePreview(image, LiveConfig(trees=30))
    preview.update(labels, z=0)
    path = preview.save(tmp_path / "live.affmae", ["background", "disk"])
    package = load_package(path, expect_task="segmentation")
    assert package.model_name == "feature_forest" and package.class_names == ["background", "disk"]
    assert package.provenance["job"] == "live preview"
    # whole-slice tiles: the package reproduces the preview exactly (the forest is refitted from stored pixels)
    out = segment(path, image, SegmentConfig(tile_size=(128, 128), overlap=0.0))
    for z in range(2):
        np.testing.assert_array_equal(out[z], preview.predict(z)[0])
    # default overlapping tiles: the same labels except near tile borders
    tiled = segment(path, image, SegmentConfig(tile_size=(64, 64)))
    assert (tiled == out).mean() > 0.97


def test_encoder_features_come_from_the_package_and_travel_with_the_kept_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae_path = save_package(create_model("affmae_tiny"), tmp_path / "pre.affmae")
    image, truth = _two_class_stack(depth=2, size=64)
    labels = _strokes(truth, 0, every=5)
    preview = LivePreview(image, LiveConfig(package=mae_path, components=3, trees=20))
    feats = preview.features((0, 0, 64, 0, 64))
    first = N_FILTER_FEATURES  # encoder channels follow the filters
    assert feats.shape == (64, 64, first + 4 * 3)
    assert np.abs(feats[..., first:]).max() > 0  # the encoder channels carry signal
    # the encoder weights are the package's: changing them changes the features
    altered = load_package(mae_path)
    altered.state_dict = {k: (v + 0.5 if k.startswith("encoder.stem") else v) for k, v in altered.state_dict.items()}
    other = LivePreview(image, LiveConfig(package=altered, components=3, trees=20))
    assert not np.allclose(other.features((0, 0, 64, 0, 64))[..., first:], feats[..., first:])
    preview.update(labels, z=0)
    kept = preview.save(tmp_path / "live")
    out = segment(kept, image, SegmentConfig(tile_size=(64, 64), overlap=0.0))
    np.testing.assert_array_equal(out[1], preview.predict(1)[0])
    with pytest.raises(ValueError, match="AFFMAE package"):
        LivePreview(image, LiveConfig(package=save_package(create_model("vit_mae_tiny"), tmp_path / "vit.affmae")))


def test_any_label_values_are_kept_and_an_unchanged_set_of_strokes_is_not_refitted(tmp_path: Path) -> None:
    image, truth = _two_class_stack()
    labels = _strokes(truth, 0).astype(np.uint16)
    labels[labels == 2] = 300  # label values are class numbers of the user's choice, not 1..K
    preview = LivePreview(image, LiveConfig(trees=20))
    first = preview.update(labels, z=0)
    assert first.labels.dtype == np.uint16 and set(np.unique(first.labels)) == {1, 300}
    painted = labels[0] > 0
    assert (first.labels[painted] == labels[0][painted]).mean() > 0.98
    again = preview.update(labels, z=1)  # another slice, the same strokes: predict only
    assert again.timings["fit_s"] < 0.05 and again.n_painted == first.n_painted
    path = preview.save(tmp_path / "values.affmae", ["background", "b", "c"])
    package = load_package(path)
    assert package.label_values == [1, 300] and package.num_classes == 2
    assert package.class_names == ["background", "class 300"]  # names of values 1 and 300 (only 3 given)
    out = segment(path, image, SegmentConfig(tile_size=(96, 96), overlap=0.0))
    np.testing.assert_array_equal(out[1], again.labels)


def test_the_live_model_is_not_offered_for_fine_tuning() -> None:
    from napari_affmae.engine import FinetuneConfig
    from napari_affmae.models import list_models

    assert "feature_forest" in list_models(task="segmentation")
    assert "feature_forest" not in list_models(trainable=True) and "affmae_tiny" in list_models(trainable=True)
    with pytest.raises(ValueError, match="feature_forest is not trained by fine-tuning"):
        FinetuneConfig(model="feature_forest")


def test_each_slice_is_normalised_by_its_own_statistics_and_the_kept_model_does_the_same(tmp_path: Path) -> None:
    image, truth = _two_class_stack(depth=2, size=128)
    image = image.astype(np.float32)
    image[1] = image[0] * 0.45 + 90.0  # slice 1 = slice 0 with another brightness and contrast (disks at ~122)
    truth[1] = truth[0]
    labels = _strokes(truth, 0)
    preview = LivePreview(image, LiveConfig(trees=30))
    preview.update(labels, z=0)
    # reference: each slice's own 0.5 / 99.5 percentiles map both slices onto the same values
    low, high = np.percentile(image[1].astype(np.float64), [0.5, 99.5])
    np.testing.assert_allclose(preview.stats_of(1).apply(image[1]), (image[1] - low) / (high - low), atol=1e-5)
    np.testing.assert_allclose(preview.stats_of(1).apply(image[1]), preview.stats_of(0).apply(image[0]), atol=1e-5)
    on_0, on_1 = preview.predict(0)[0], preview.predict(1)[0]
    assert (on_0 == on_1).mean() > 0.999

    def disk_iou(pred: np.ndarray) -> float:
        fg_pred, fg_true = pred == 2, truth[1] == 2
        return float((fg_pred & fg_true).sum() / max(1, (fg_pred | fg_true).sum()))

    assert disk_iou(on_1) > 0.8
    # the image's statistics (ilastik, LiveConfig.ilastik_style) put slice 1's disks above the learned cut
    plain = LivePreview(image, LiveConfig.ilastik_style(trees=30))
    plain.update(labels, z=0)
    assert disk_iou(plain.predict(1)[0]) < 0.3
    # the kept model normalises each slice the same way when it segments the stack
    path = preview.save(tmp_path / "live.affmae", ["background", "disk"])
    package = load_package(path, expect_task="segmentation")
    assert package.normalization_scope == "slice" and plain.to_package().normalization_scope == "image"
    out = segment(path, image, SegmentConfig(tile_size=(128, 128), overlap=0.0))
    np.testing.assert_array_equal(out[0], on_0)
    np.testing.assert_array_equal(out[1], on_1)
    whole = segment(path, image, SegmentConfig(tile_size=(128, 128), overlap=0.0, normalization="image"))
    assert disk_iou(whole[1]) < disk_iou(out[1]) - 0.2  # asked for the image's statistics, it gets them
