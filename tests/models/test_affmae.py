"""AFFMAE model: masking never leaks, gradients, sizes, API contract, bad input."""
from __future__ import annotations

import pytest
import torch

from napari_affmae.models import create_model, list_models
from napari_affmae.models.masking import blob_mask, random_mask


def _model(task="mae", **kw):
    torch.manual_seed(0)
    if task == "mae":
        return create_model("affmae_tiny", **kw)
    return create_model("affmae_tiny", task=task, num_classes=3, **kw)


def test_registry_lists_and_builds_by_pattern():
    names = list_models("affmae_*")
    assert {"affmae_tiny", "affmae_small", "affmae_base"} <= set(names)
    assert list_models("no_such_*") == []
    pretrainable = list_models(task="mae")
    assert "affmae_tiny" in pretrainable and not any(n.startswith("unet_") for n in pretrainable)
    assert "unet_tiny" in list_models(task="segmentation")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("affmae_huge")
    with pytest.raises(ValueError, match="unknown AFFMAE option"):
        create_model("affmae_tiny", not_an_option=1)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("affmae_tiny", task="segmentation")


@pytest.mark.parametrize("neighborhood", ["token", "cluster"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_masked_pixels_never_reach_visible_tokens(size, neighborhood):
    model = _model(neighborhood=neighborhood).double().eval()
    h, w = size[0] // 8, size[1] // 8
    gen = torch.Generator().manual_seed(1)
    mask = random_mask(2, h, w, 0.5, generator=gen)
    x1 = torch.randn(2, 1, *size, generator=gen, dtype=torch.float64)
    pixel_mask = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]  # [B, 1, H, W]
    x2 = torch.where(pixel_mask, 10 * torch.randn_like(x1), x1)  # only masked pixels change
    assert (x1 != x2).sum() > 0
    with torch.no_grad():
        out1, out2 = model.forward_encoder(x1, mask), model.forward_encoder(x2, mask)
    for s1, s2 in zip(out1, out2):
        assert torch.equal(s1.pos, s2.pos)
        torch.testing.assert_close(s1.tokens, s2.tokens, rtol=0, atol=1e-10)
    # the check can fail: touching one visible pixel changes the visible tokens
    vis = (~pixel_mask).nonzero()[0]
    x3 = x1.clone()
    x3[tuple(vis)] += 5.0
    with torch.no_grad():
        out3 = model.forward_encoder(x3, mask)
    assert not torch.allclose(out1[0].tokens, out3[0].tokens)


def test_encoder_outputs_four_stages_with_integer_positions_of_visible_cells():
    model = _model()
    mask = blob_mask(2, 8, 12, 0.5, generator=torch.Generator().manual_seed(0))
    stages = model.forward_encoder(torch.randn(2, 1, 64, 96), mask)
    assert len(stages) == 4
    n_vis = int((~mask[0]).sum())
    counts = [s.tokens.shape[1] for s in stages]
    assert counts[0] == n_vis
    for prev, nxt in zip(counts, counts[1:]):
        assert nxt == -(-prev * 2 // 5)  # ceil(0.4 * prev)
    for b in range(2):  # res2 tokens sit exactly on the visible cells
        pos = stages[0].pos[b]
        assert pos.dtype == torch.int64
        assert not mask[b, pos[:, 0], pos[:, 1]].any()
        assert len({tuple(p) for p in pos.tolist()}) == n_vis
    for prev, nxt in zip(stages, stages[1:]):  # later stages: subsets of the previous positions
        for b in range(2):
            assert {tuple(p) for p in nxt.pos[b].tolist()} <= {tuple(p) for p in prev.pos[b].tolist()}
    assert [s.tokens.shape[-1] for s in stages] == list(model.config.dims)


def test_mae_forward_contract_and_given_mask():
    model = _model()
    x = torch.randn(3, 1, 48, 72)
    out = model(x)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["pred"].shape == (3, 6 * 9, 64)
    assert out["mask"].shape == (3, 6, 9) and out["mask"].dtype == torch.bool
    assert int((~out["mask"][0]).sum()) == round(54 * 0.5)
    mask = random_mask(3, 6, 9, 0.75, generator=torch.Generator().manual_seed(3))
    out2 = model(x, mask=mask)
    assert torch.equal(out2["mask"], mask)
    # predictions only at masked cells
    assert (out2["pred"][~mask.reshape(3, -1)] == 0).all()
    assert set(out2["losses"]) == {"res2", "res4", "res5"}
    expected = out2["losses"]["res2"] + 0.12 * out2["losses"]["res4"] + 0.05 * out2["losses"]["res5"]
    torch.testing.assert_close(out2["loss"].detach(), expected)
    recon = model.reconstruct(x, out2)
    assert recon.shape == x.shape
    keep = ~mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    torch.testing.assert_close(recon[keep], x[keep])


@pytest.mark.parametrize("neighborhood", ["token", "cluster"])
def test_gradients_reach_every_importance_scorer(neighborhood):
    model = _model(neighborhood=neighborhood)
    model(torch.randn(2, 1, 64, 64))["loss"].backward()
    for merge in model.encoder.merges:
        assert merge.score.weight.grad is not None
        assert merge.score.weight.grad.abs().sum() > 0


def test_parameter_counts_match_design_sizes():
    counts = {}
    for name, target in [("affmae_small", 22e6), ("affmae_base", 66e6)]:
        with torch.device("meta"):
            model = create_model(name)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert abs(counts[name] - target) / target < 0.10, (name, counts[name])
    with torch.device("meta"):
        tiny = sum(p.numel() for p in create_model("affmae_tiny").parameters())
    assert tiny < counts["affmae_small"] / 4


def test_segmentation_logits_and_encoder_transfer():
    mae = _model()
    seg = _model("segmentation")
    x = torch.randn(2, 1, 40, 56)
    logits = seg(x)
    assert logits.shape == (2, 3, 40, 56)
    logits.sum().backward()
    assert seg.fusion.out.weight.grad is not None and seg.fusion.lattice[1].weight.grad.abs().sum() > 0
    assert seg.head is None and seg.refine is None  # the fusion head replaces the per-cell logit patches
    seg.load_encoder_from(mae)
    for (k1, v1), (k2, v2) in zip(mae.encoder.state_dict().items(), seg.encoder.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    other = create_model("affmae_tiny", depths=(1, 1, 2, 1))
    with pytest.raises(ValueError, match="another architecture"):
        seg.load_encoder_from(other)
    patch = _model("segmentation", seg_head="patch")
    assert patch.fusion is None and patch.refine is not None and patch(x).shape == (2, 3, 40, 56)
    plain = _model("segmentation", seg_head="patch", refine=False)
    assert plain.refine is None and plain(x).shape == (2, 3, 40, 56)
    with pytest.raises(ValueError, match="seg_head must be one of"):
        _model("segmentation", seg_head="unet")
    with pytest.raises(ValueError, match="fusion_width and fusion_depth must be >= 1"):
        _model("segmentation", fusion_width=0)
    with pytest.raises(ValueError, match="fusion_width and fusion_depth must be >= 1"):
        _model("segmentation", fusion_depth=0)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(1, 3, 64, 64), "RGB"),
        (torch.randn(64, 64), "4-D"),
        (torch.randn(1, 1, 60, 64), "multiples of the patch size"),
        (torch.full((1, 1, 64, 64), float("nan")), "NaN"),
        (torch.zeros(1, 1, 64, 64, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_input_raises_clear_value_error(x, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        model(x)


def test_bad_mask_raises_clear_value_error():
    model = _model()
    x = torch.randn(2, 1, 64, 64)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        model(x, mask=torch.zeros(2, 4, 4, dtype=torch.bool))
    uneven = torch.zeros(2, 8, 8, dtype=torch.bool)
    uneven[0, :4] = True
    with pytest.raises(ValueError, match="same number of visible"):
        model(x, mask=uneven)
    with pytest.raises(ValueError, match="hide some patches"):
        model(x, mask=torch.zeros(2, 8, 8, dtype=torch.bool))


def test_trivial_reference_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 48, dtype=torch.float64)
    mask = random_mask(2, 4, 6, 0.5, torch.Generator().manual_seed(1))  # [2, 4, 6], True = masked
    weights = {"res2": 1.0, "res4": 0.12, "res5": 0.05}
    # per-patch normalised targets: a flat patch is 0 after normalisation -> mean square of the targets,
    # (p*p - 1) / (p*p) for every non-flat patch (unbiased variance)
    model = create_model("affmae_tiny").double()
    out = model(x, mask=mask)
    assert out["reference_loss"].item() == pytest.approx(63 / 64 * sum(weights.values()), rel=1e-4)  # eps 1e-6
    # raw targets: masked patches predicted at the mean of the sample's visible pixels
    model = create_model("affmae_tiny", norm_pix_loss=False).double()
    out = model(x, mask=mask)
    patches = x.reshape(2, 4, 8, 6, 8).permute(0, 1, 3, 2, 4).reshape(2, 24, 64)  # row-major cells
    flat_mask = mask.reshape(2, 24)
    expected = []
    for b in range(2):
        visible_mean = patches[b][~flat_mask[b]].mean()
        expected.append(((patches[b][flat_mask[b]] - visible_mean) ** 2).mean())
    hand = torch.stack(expected).mean().item() * sum(weights.values())  # same number of masked cells per sample
    assert int(flat_mask[0].sum()) == int(flat_mask[1].sum())
    assert out["reference_loss"].item() == pytest.approx(hand, rel=1e-6)  # the loss is taken in float32
    assert not out["reference_loss"].requires_grad
