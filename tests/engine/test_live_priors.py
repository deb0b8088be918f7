"""Live preview additions to ilastik's forest: texture features and the prior correction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_affmae.data.features import N_TEXTURE_FEATURES, texture_feature_names, texture_features
from napari_affmae.engine import load_package
from napari_affmae.engine.live import LiveConfig, LivePreview
from napari_affmae.models.feature_forest import estimate_class_shares


def test_texture_features_are_local_std_and_differences_of_gaussians() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(48, 40))
    feats = texture_features(image)
    names = texture_feature_names()
    assert feats.shape == (48, 40, N_TEXTURE_FEATURES) == (48, 40, len(names)) and feats.dtype == np.float32
    assert names[0] == "local std s1" and names[-1] == "DoG s8-16"
    # local std of white noise with unit variance, far from the border, at a wide window: close to 1
    wide = names.index("local std s4")
    assert abs(float(np.median(feats[16:32, 16:24, wide])) - 1.0) < 0.15
    # by hand at one pixel: Gaussian-weighted variance around (24, 20) with sigma 2, reflected border
    from scipy import ndimage
    delta = np.zeros_like(image)
    delta[24, 20] = 1.0
    weights = ndimage.gaussian_filter(delta, 2.0, mode="reflect")  # symmetric kernel = the window at (24, 20)
    mean = (weights * image).sum()
    np.testing.assert_allclose(feats[24, 20, names.index("local std s2")],
                               np.sqrt((weights * image**2).sum() - mean**2), rtol=1e-4)
    # a constant image has no texture; a linear ramp has no difference of Gaussians away from the border
    assert np.abs(texture_features(np.full((32, 32), 3.0))).max() < 1e-5
    ramp = np.add.outer(np.arange(64.0), np.arange(64.0)) / 10
    assert np.abs(texture_features(ramp)[20:44, 20:44, 5:7]).max() < 1e-4  # DoG s1-2, s2-4: windows inside
    with pytest.raises(ValueError, match="one 2D slice"):
        texture_features(np.zeros((2, 8, 8)))


def test_class_shares_are_recovered_from_posteriors_under_other_training_shares() -> None:
    """Samples of two Gaussians with true shares 0.1 / 0.9; exact posteriors computed as if the shares were
    0.5 / 0.5 (what a classifier fitted on balanced strokes reports). The EM fixed point finds 0.1 / 0.9."""
    rng = np.random.default_rng(1)
    n = 40_000
    cls = rng.random(n) < 0.1
    x = np.where(cls, rng.normal(1.5, 1.0, n), rng.normal(-1.5, 1.0, n))
    lik = np.stack([np.exp(-0.5 * (x + 1.5) ** 2), np.exp(-0.5 * (x - 1.5) ** 2)], 1)  # [N, 2]
    balanced = lik / lik.sum(1, keepdims=True)
    shares = estimate_class_shares(balanced, np.array([0.5, 0.5]))
    np.testing.assert_allclose(shares, [0.9, 0.1], atol=0.01)
    assert abs(shares.sum() - 1) < 1e-9
    # one step is the mean posterior (what the Live preview uses by default: it cannot run away)
    np.testing.assert_allclose(estimate_class_shares(balanced, np.array([0.5, 0.5]), iterations=1), balanced.mean(0))
    # three classes, unequal training shares
    lik3 = np.stack([lik[:, 0], lik[:, 1], np.full(n, 1e-9)], 1)
    train = np.array([0.2, 0.5, 0.3])
    posteriors = lik3 * train
    posteriors /= posteriors.sum(1, keepdims=True)
    np.testing.assert_allclose(estimate_class_shares(posteriors, train), [0.9, 0.1, 0.0], atol=0.01)


def _rare_structure(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Small dark disks (about 4 % of the slice) among dark lines (background) on bright noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    truth = np.ones((size, size), np.uint8)
    for _ in range(8):
        cy, cx = rng.integers(8, size - 8, 2)
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 2
    lines = (np.abs(yy % 32 - 16) < 2) & (truth == 1)
    image = np.where(truth == 2, 80.0, np.where(lines, 95.0, 170.0)) + rng.normal(0, 25, truth.shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_prior_correction_moves_the_predicted_share_toward_the_true_share(tmp_path: Path) -> None:
    image, truth = _rare_structure()
    labels = np.zeros_like(truth)
    rng = np.random.default_rng(2)
    for value in (1, 2):  # as many painted pixels of each class: the painted shares are 50 / 50
        rows = rng.choice(np.flatnonzero(truth.ravel() == value), 60, replace=False)
        labels.ravel()[rows] = value
    share = {}
    for exponent in (0.0, 0.5, 1.0):
        preview = LivePreview(image, LiveConfig(trees=30, prior_exponent=exponent, prior_iterations=50))
        pred, _ = preview.predict(0) if preview.update(labels) else (None, None)
        share[exponent] = float((pred == 2).mean())
        if exponent == 0.0:
            assert preview.model.config.class_weights == []
        else:
            estimated = preview.class_shares
            assert 0.0 < estimated[1] < 0.25  # the structure is estimated rare (truth about 4 %)
            weights = preview.model.config.class_weights
            assert weights[1] < weights[0]
    true_share = float((truth == 2).mean())
    assert share[0.0] > share[0.5] > share[1.0] >= 0.0
    assert abs(share[0.5] - true_share) < abs(share[0.0] - true_share)
    # the kept package predicts what the preview showed: the weights travel with it
    path = preview.save(tmp_path / "live.affmae", ["background", "disk"])
    package = load_package(path)
    assert package.config["class_weights"] == pytest.approx(preview.model.config.class_weights)
    assert package.provenance["estimated_class_shares"][1] == pytest.approx(float(preview.class_shares[1]), abs=1e-4)


def test_ilastik_style_is_the_plain_forest_and_bad_exponents_are_refused() -> None:
    plain = LiveConfig.ilastik_style(trees=5)
    assert (plain.package, plain.texture, plain.prior_exponent, plain.slice_normalization, plain.trees) == (
        None, False, 0.0, False, 5)
    default = LiveConfig()  # the widget's: per-slice normalisation and the class-share correction
    assert (default.package, default.prior_exponent, default.slice_normalization) == (None, 1.0, True)
    image, truth = _rare_structure(64)
    labels = np.where(np.random.default_rng(0).random(truth.shape) < 0.05, truth, 0).astype(np.uint8)
    preview = LivePreview(image, plain)
    preview.update(labels)
    assert preview.model.config.n_features == 20 and preview.model.config.class_weights == []
    assert LivePreview(image, LiveConfig(trees=5)).model.config.n_features == 20  # the widget's default
    assert LivePreview(image, LiveConfig(trees=5, texture=True)).model.config.n_features == 20 + N_TEXTURE_FEATURES
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="prior_exponent must be between 0"):
            LiveConfig(prior_exponent=bad).validate()
    with pytest.raises(ValueError, match="prior_samples"):
        LiveConfig(prior_samples=-1).validate()
    with pytest.raises(ValueError, match="prior_iterations"):
        LiveConfig(prior_iterations=0).validate()
