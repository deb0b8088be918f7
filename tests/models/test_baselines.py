"""Baselines (ViT-MAE, UM-MAE, GreenMIM): registry, output contract, loss against an independent
reference, masked pixels never reach the encoder, training reduces the loss on synthetic EM,
segmentation variants, encoder transfer, parameter counts vs AFFMAE, bad input."""
from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

from napari_affmae.data.synthetic import synthetic_em
from napari_affmae.models import create_model, list_models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin contention on small shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAMILIES = ("vit_mae", "um_mae", "greenmim")
SIZES = ("tiny", "small", "base")
H, W = 64, 96  # non-square on purpose; 8 x 12 patch lattice


def _mae(family: str, **overrides):
    torch.manual_seed(0)
    return create_model(f"{family}_tiny", **overrides)


@functools.lru_cache(maxsize=None)
def _shared(family: str, task: str) -> torch.nn.Module:
    """One model per family and task for read-only checks (building costs seconds on a busy CPU)."""
    torch.manual_seed(0)
    if task == "mae":
        return create_model(f"{family}_tiny")
    return create_model(f"{family}_tiny", task=task, num_classes=2)


def _count(name: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = create_model(name)
    return sum(p.numel() for p in model.parameters())


def _pixel_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]  # [B, 1, H, W]


def _reference_targets(x: torch.Tensor) -> torch.Tensor:
    """Per-patch standardised 8x8 patches in row-major order, via unfold (independent of patchify)."""
    patches = torch.nn.functional.unfold(x, kernel_size=8, stride=8).transpose(1, 2)  # [B, h*w, 64]
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True)
    return (patches - mean) / torch.sqrt(var + 1e-6)


def test_every_family_registers_three_sizes():
    for family in FAMILIES:
        assert list_models(f"{family}_*") == sorted(f"{family}_{s}" for s in SIZES)


@pytest.mark.parametrize("family", FAMILIES)
def test_mae_contract_and_loss_equals_reference_on_masked_patches(family):
    model = _mae(family)
    x = torch.randn(2, 1, H, W, generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert model.patch_size == 8
    assert dataclasses.asdict(model.config)
    assert out["pred"].shape == (2, 8 * 12, 64)
    assert out["mask"].shape == (2, 8, 12) and out["mask"].dtype == torch.bool
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    masked = out["mask"].reshape(2, -1)
    assert 0 < int(masked[0].sum()) < 96
    want = ((out["pred"] - _reference_targets(x)) ** 2)[masked].mean()
    torch.testing.assert_close(out["loss"], want)
    # a given mask is used as is
    mask = model.random_mask(2, 8, 12, generator=torch.Generator().manual_seed(5))
    assert torch.equal(model(x, mask=mask)["mask"], mask)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_pixels_never_reach_the_encoder(family):
    model = _mae(family).double().eval()
    gen = torch.Generator().manual_seed(2)
    mask = model.random_mask(2, 8, 12, generator=gen)
    x1 = torch.randn(2, 1, H, W, generator=gen, dtype=torch.float64)
    pix = _pixel_mask(mask)
    x2 = torch.where(pix, 10 * torch.randn_like(x1), x1)  # only masked pixels change

    def run(x):
        torch.manual_seed(3)  # same secondary mask for UM-MAE
        with torch.no_grad():
            return model(x, mask=mask)

    out1, out2 = run(x1), run(x2)
    # predictions depend on visible pixels only; the loss changes because its targets did
    torch.testing.assert_close(out1["pred"], out2["pred"], rtol=0, atol=1e-10)
    assert not torch.isclose(out1["loss"], out2["loss"])
    # the check can fail: touching one pixel of a visible patch changes the predictions
    if family == "um_mae":  # pick a visible patch that secondary masking did not hide
        from napari_affmae.models.baselines.um_mae import uniform_gather_index

        kept = uniform_gather_index(mask)[0][~out1["secondary_mask"][0]][0]
        y, xx = divmod(int(kept), 12)
    else:
        y, xx = (~mask[0]).nonzero()[0].tolist()
    x3 = x1.clone()
    x3[0, 0, 8 * y + 3, 8 * xx + 4] += 5.0
    assert not torch.allclose(run(x3)["pred"], out1["pred"])


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_decreases_on_synthetic_em(family):
    image, _ = synthetic_em((H, W), seed=3)
    x = torch.from_numpy(image).float()
    x = ((x - x.mean()) / x.std())[None, None].repeat(2, 1, 1, 1)
    model = _mae(family)
    mask = model.random_mask(2, 8, 12, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        torch.manual_seed(step)
        loss = model(x, mask=mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert losses[-1] < min(losses[:4]), losses


@pytest.mark.parametrize("family", FAMILIES)
def test_segmentation_logits_and_encoder_transfer(family):
    mae = _mae(family)
    seg = create_model(f"{family}_tiny", task="segmentation", num_classes=3)
    assert seg.num_classes == 3 and seg.patch_size == 8 and seg.config == mae.config
    x = torch.randn(2, 1, H, W)
    logits = seg(x)
    assert logits.shape == (2, 3, H, W)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in seg.parameters())
    # any multiple of 8 works for segmentation, also a single patch row
    assert seg(torch.randn(1, 1, 8, 40)).shape == (1, 3, 8, 40)
    # load_encoder_from copies the encoder: same encoder output afterwards
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    seg.load_encoder_from(mae)
    copied = {k for k, v in seg.state_dict().items() if not torch.equal(v, before[k])}
    mae_state = mae.state_dict()
    assert copied and all(torch.equal(seg.state_dict()[k], mae_state[k]) for k in copied)
    enc_keys = [k for k in seg.state_dict() if not k.startswith("head.")]
    assert all(torch.equal(seg.state_dict()[k], mae_state[k]) for k in enc_keys if k in mae_state)
    assert not any(k.startswith("head.") for k in copied)
    # wrong family or size is refused with a clear message
    other = "greenmim" if family != "greenmim" else "vit_mae"
    with pytest.raises(ValueError, match="same family"):
        seg.load_encoder_from(_shared(other, "mae"))
    with pytest.raises(ValueError, match="encoder configs differ"):
        seg.load_encoder_from(create_model(f"{family}_tiny", mlp_ratio=2.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_overrides_and_registry_errors(family):
    assert create_model(f"{family}_tiny", norm_pix_loss=False).config.norm_pix_loss is False
    # a config saved as JSON (tuples become lists) rebuilds the same model
    config = _shared(family, "mae").config
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    with torch.device("meta"):
        assert create_model(f"{family}_tiny", **saved).config == config
    with pytest.raises(ValueError, match="'not_a_field'"):
        create_model(f"{family}_tiny", not_a_field=1)
    with pytest.raises(ValueError, match="num_classes"):
        create_model(f"{family}_tiny", task="segmentation")
    with pytest.raises(ValueError, match="heads"):
        create_model(f"{family}_tiny", decoder_heads=5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("x,message", [
    (torch.randn(1, 3, 64, 64), "one-channel"),
    (torch.randn(64, 64), "4-D"),
    (torch.randn(1, 1, 60, 64), "multiples of"),
    (torch.zeros(1, 1, 64, 64, dtype=torch.uint8), "floating-point"),
    (torch.full((1, 1, 64, 64), float("nan")), "NaN"),
])
def test_bad_input_raises_clear_value_error(family, x, message):
    with pytest.raises(ValueError, match=message):
        _shared(family, "mae")(x)
    with pytest.raises(ValueError, match=message):
        _shared(family, "segmentation")(x)


def test_um_mae_pretraining_needs_multiples_of_16():
    with pytest.raises(ValueError, match="multiples of 16"):
        _shared("um_mae", "mae")(torch.randn(1, 1, 64, 72))
    assert _shared("um_mae", "segmentation")(torch.randn(1, 1, 64, 72)).shape[-1] == 72


def test_family_mask_structure_is_enforced():
    x = torch.randn(2, 1, H, W)
    unequal = torch.ones(2, 8, 12, dtype=torch.bool)
    unequal[0, :2] = False
    unequal[1, :1] = False
    with pytest.raises(ValueError, match="same number of visible"):
        _shared("vit_mae", "mae")(x, mask=unequal)
    random = torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(0)) < 0.75
    with pytest.raises(ValueError, match="exactly one visible patch in every 2x2 block"):
        _shared("um_mae", "mae")(x, mask=random)
    greenmim = _shared("greenmim", "mae")
    shared = greenmim.random_mask(2, 8, 12, generator=torch.Generator().manual_seed(0))
    per_sample = torch.stack([shared[0], ~shared[0]])
    with pytest.raises(ValueError, match="shared by the whole batch"):
        greenmim(x, mask=per_sample)
    broken = shared.clone()
    broken[:, 0, 0] = ~broken[:, 0, 0]
    with pytest.raises(ValueError, match="constant on 8x8-patch units"):
        greenmim(x, mask=broken)
    with pytest.raises(ValueError, match="at least one unit"):
        greenmim(x, mask=torch.ones(2, 8, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="hides no patch"):  # a 64 x 64 tile is a single 64-px unit
        greenmim(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("size", SIZES)
def test_parameter_counts_match_affmae_within_5_percent(size):
    target = _count(f"affmae_{size}")
    for family in FAMILIES:
        count = _count(f"{family}_{size}")
        assert abs(count / target - 1) <= 0.05, f"{family}_{size}: {count} vs affmae_{size}: {target}"
