"""The AFFMAE pretext: target variants (pooled, blurred), their flat-patch baselines, and learning on EM."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_affmae.data.synthetic import synthetic_em
from napari_affmae.models import create_model
from napari_affmae.models.affmae import AFFMAEConfig
from napari_affmae.models.common import patch_targets, smooth_image
from napari_affmae.models.masking import random_mask

WEIGHTS = 1.0 + 0.12 + 0.05  # default deep-supervision weights


def _hand_targets(x: torch.Tensor, pool: int, norm: bool) -> torch.Tensor:
    """Loop version: for every 8 x 8 patch (row-major), the means of its pool x pool squares (row-major)."""
    b, _, hh, ww = x.shape
    rows = []
    for i in range(b):
        cells = []
        for py in range(hh // 8):
            for px in range(ww // 8):
                patch = x[i, 0, py * 8:(py + 1) * 8, px * 8:(px + 1) * 8]
                values = torch.stack([patch[y:y + pool, xx:xx + pool].mean()
                                      for y in range(0, 8, pool) for xx in range(0, 8, pool)])
                if norm:
                    values = (values - values.mean()) / (values.var(unbiased=True) + 1e-6).sqrt()
                cells.append(values)
        rows.append(torch.stack(cells))
    return torch.stack(rows)


@pytest.mark.parametrize("pool", [1, 2, 4])
@pytest.mark.parametrize("norm", [True, False])
def test_pooled_targets_match_a_loop_over_patches(pool, norm):
    x = torch.rand(2, 1, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = patch_targets(x, 8, norm, pool=pool)
    assert got.shape == (2, 6, (8 // pool) ** 2)
    torch.testing.assert_close(got, _hand_targets(x, pool, norm))


def test_blurred_targets_are_a_gaussian_filter_of_the_image():
    x = torch.rand(1, 1, 32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = ndimage.gaussian_filter(x[0, 0].numpy(), 1.0, mode="mirror", truncate=3.0)
    np.testing.assert_allclose(smooth_image(x, 1.0)[0, 0].numpy(), want, atol=1e-10)
    assert smooth_image(x, 0.0) is x
    torch.testing.assert_close(patch_targets(x, 8, True, blur=1.0), patch_targets(torch.from_numpy(want)[None, None], 8, True))


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_flat_baseline_of_normalised_pooled_targets_is_the_hand_value(pool):
    """Flat prediction = 0 after per-patch normalisation: loss = mean square of n standardised values =
    (n - 1) / n (unbiased variance), n = (8 / pool)**2 values per patch."""
    x = torch.rand(2, 1, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = random_mask(2, 4, 6, 0.5, torch.Generator().manual_seed(1))
    model = create_model("affmae_tiny", target_pool=pool, norm_pix_loss=True).double()
    out = model(x, mask=mask)
    n = (8 // pool) ** 2
    assert out["pred"].shape == (2, 24, n)
    targets = _hand_targets(x, pool, norm=True)[mask.reshape(2, 24)]  # masked cells, same count per sample
    assert out["reference_loss"].item() == pytest.approx((targets**2).mean().item() * WEIGHTS, rel=1e-5)
    assert out["reference_loss"].item() == pytest.approx((n - 1) / n * WEIGHTS, rel=2e-3)  # eps 1e-6 in the var


@pytest.mark.parametrize("pool", [2, 4])
def test_flat_baseline_of_raw_pooled_targets_is_the_visible_mean_of_the_pooled_image(pool):
    x = torch.rand(2, 1, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = random_mask(2, 4, 6, 0.5, torch.Generator().manual_seed(4))
    model = create_model("affmae_tiny", target_pool=pool, norm_pix_loss=False).double()
    out = model(x, mask=mask)
    targets = _hand_targets(x, pool, norm=False)  # [2, 24, n]
    flat_mask = mask.reshape(2, 24)
    per_sample = []
    for b in range(2):
        visible_mean = targets[b][~flat_mask[b]].mean()
        per_sample.append(((targets[b][flat_mask[b]] - visible_mean) ** 2).mean())
    hand = torch.stack(per_sample).mean().item() * WEIGHTS
    assert out["reference_loss"].item() == pytest.approx(hand, rel=1e-6)


def test_config_rejects_targets_that_cannot_work():
    with pytest.raises(ValueError, match="target_pool"):
        AFFMAEConfig(target_pool=3)
    with pytest.raises(ValueError, match="one value per patch"):
        AFFMAEConfig(target_pool=8, norm_pix_loss=True)
    AFFMAEConfig(target_pool=8, norm_pix_loss=False)  # one mean per patch is fine unnormalised
    with pytest.raises(ValueError, match="target_blur"):
        AFFMAEConfig(target_blur=-1.0)
    with pytest.raises(ValueError, match="blob_cells"):
        AFFMAEConfig(blob_cells=())


def test_reconstruct_fills_masked_patches_from_pooled_predictions():
    model = create_model("affmae_tiny", target_pool=4)
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    recon = model.reconstruct(x, out)
    assert recon.shape == x.shape
    keep = ~out["mask"].repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    torch.testing.assert_close(recon[keep], x[keep])


def test_locality_prior_starts_attention_local_and_is_off_by_default():
    from napari_affmae.models.clustering import relative_features
    from napari_affmae.models.layers import RelativePositionBias

    torch.manual_seed(0)
    rel = torch.tensor([[[[0.0, 1.0], [0.0, 4.0], [3.0, 4.0]]]])  # [1, 1, 3, 2] at distances 1, 4, 5
    feats = relative_features(rel, 1.0)
    plain, local = RelativePositionBias(4), RelativePositionBias(4, locality=True)
    local.mlp.load_state_dict(plain.mlp.state_dict())
    (b_plain,), (b_local,) = plain(feats), local(feats)
    slopes = torch.logspace(1.0, -3.0, 4, base=2.0)  # 2 ... 1/8
    torch.testing.assert_close(b_plain - b_local, slopes[None, :, None, None] * torch.tensor([1.0, 4.0, 5.0]))
    assert plain.slope is None
    assert not create_model("affmae_tiny").config.locality_prior


def test_packages_written_before_the_pretext_options_load_with_their_old_behaviour(tmp_path, package_without_fields):
    from napari_affmae.engine import load_package, save_package
    from napari_affmae.models.affmae import PACKAGE_LEGACY_CONFIG

    model = create_model("affmae_tiny", target_pool=1)
    path = package_without_fields(save_package(model, tmp_path / "new.affmae"), tmp_path / "old.affmae",
                                  PACKAGE_LEGACY_CONFIG)  # without the fields that did not exist yet
    loaded = load_package(path).build_model("cpu")
    assert loaded.config.target_pool == 1 and loaded.heads["res2"][1].out_features == 64
    assert not loaded.config.locality_prior and loaded.config.target_norm_floor == 0.0


def test_default_pretext_leaves_the_flat_floor_on_a_fixed_synthetic_em_batch():
    """A guard that the model can learn at all: on one fixed batch of synthetic EM and a fixed mask the
    loss must fall below 0.9 of the flat-patch predictor's loss within 60 steps. (On real EM with fresh
    crops every step it does not, within 300 steps: docs/pretraining.md, "What kept the loss on the floor".)"""
    torch.set_num_threads(1)
    image, _ = synthetic_em((2, 128, 128), seed=3)
    x = torch.from_numpy(image.astype(np.float32) / 255.0)
    x = torch.stack([x[0, :64, :64], x[0, 64:, 64:], x[1, :64, 64:], x[1, 64:, :64]])[:, None]
    torch.manual_seed(0)
    model = create_model("affmae_tiny")
    mask = model.random_mask(4, 8, 8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    ratios = []
    for _ in range(60):
        out = model(x, mask=mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        ratios.append(float(out["loss"].detach() / out["reference_loss"]))
    assert ratios[0] > 1.0, ratios[0]  # an untrained decoder is worse than flat
    assert min(ratios[-5:]) < 0.9, ratios[-10:]


def test_decoder_can_read_fewer_nearer_clusters_than_the_encoder():
    from napari_affmae.models import clustering

    seen = []
    original = clustering.build_neighborhood

    def spy(queries, keys, k, mode="token"):
        nb = original(queries, keys, k, mode)
        seen.append((k, nb.idx.shape[-1]))
        return nb

    model = create_model("affmae_tiny", decoder_nearest_clusters=2)
    assert model.decoder.cross_clusters == 2 and model.config.nearest_clusters == 8
    import napari_affmae.models.affmae_decoder as dec

    dec.build_neighborhood, saved = spy, dec.build_neighborhood
    try:
        out = model(torch.rand(2, 1, 64, 64))
    finally:
        dec.build_neighborhood = saved
    assert torch.isfinite(out["loss"])
    # one query self-attention neighbourhood with the encoder's k = 8, four cross-attention ones with k = 2
    # (16 tokens where the stage has enough of them)
    assert [k for k, _ in seen] == [8, 2, 2, 2, 2] and (2, 16) in seen, seen
    with pytest.raises(ValueError, match="decoder_nearest_clusters"):
        AFFMAEConfig(decoder_nearest_clusters=0)
