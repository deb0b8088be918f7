"""Family-specific invariants: ViT-MAE's encoder sees visible tokens only; UM-MAE's uniform
sampling, single gather index and secondary masking; GreenMIM's unit mask, sparse tokens and
whole merges."""
from __future__ import annotations

import pytest
import torch

from napari_affmae.models import create_model
from napari_affmae.models.baselines.greenmim import unit_mask
from napari_affmae.models.baselines.swin import plan_merge
from napari_affmae.models.baselines.um_mae import uniform_gather_index, uniform_sampling_mask
from napari_affmae.models.common import split_by_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin contention on small shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _capture_inputs(module: torch.nn.Module) -> list[tuple]:
    seen: list[tuple] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args))
    return seen


# ---------------------------------------------------------------- ViT-MAE
def test_vit_mae_encoder_runs_on_visible_tokens_only():
    torch.manual_seed(0)
    model = create_model("vit_mae_tiny").eval()
    x = torch.randn(2, 1, 64, 96)
    mask = model.random_mask(2, 8, 12, generator=torch.Generator().manual_seed(0))
    n_visible = int((~mask[0]).sum())
    assert n_visible == 24  # 25 % of 96 at the default 75 % ratio
    seen = [_capture_inputs(block) for block in model.encoder.blocks]
    with torch.no_grad():
        model(x, mask=mask)
        latent = model.encode(x, mask)
    assert all(args[0][0].shape == (2, n_visible, 192) for args in seen)
    assert latent.shape == (2, n_visible, 192)
    # encoder output = encoder on a picture made only of the visible patches, masked ones zeroed
    zeroed = torch.where(mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None], 0.0, x)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(zeroed, mask), latent)
    # and the visible ordering is row-major lattice order
    visible_idx, _ = split_by_mask(mask)
    assert torch.equal(visible_idx, torch.sort(visible_idx, dim=1).values)


# ---------------------------------------------------------------- UM-MAE
@pytest.mark.parametrize("h,w,seed", [(8, 12, 0), (4, 4, 1), (16, 6, 2)])
def test_uniform_sampling_keeps_exactly_one_visible_per_2x2_block(h, w, seed):
    mask = uniform_sampling_mask(5, h, w, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == (5, h, w) and mask.dtype == torch.bool
    for b in range(5):
        for i in range(0, h, 2):
            for j in range(0, w, 2):
                assert int((~mask[b, i:i + 2, j:j + 2]).sum()) == 1
    assert float(mask.float().mean()) == 0.75
    # the kept position is random: all four offsets occur
    picks = (~mask).reshape(5, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4).float().argmax(-1)
    assert set(picks.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="even lattice"):
        uniform_sampling_mask(1, 5, 4)


def test_compaction_positions_and_decoder_placement_use_one_gather_index():
    torch.manual_seed(0)
    model = create_model("um_mae_tiny").eval()
    x = torch.randn(2, 1, 64, 96)
    mask = model.random_mask(2, 8, 12, generator=torch.Generator().manual_seed(4))
    gather = uniform_gather_index(mask)
    # reference: loop over blocks in row-major order and find the visible cell
    for b in range(2):
        expected = []
        for i in range(4):
            for j in range(6):
                (dy, dx), = (~mask[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2]).nonzero().tolist()
                expected.append((2 * i + dy) * 12 + 2 * j + dx)
        assert gather[b].tolist() == expected
    # the pitfall this guards against: row-major visible order is a different pairing here
    assert not torch.equal(split_by_mask(mask)[0], gather)
    pyramid_in = _capture_inputs(model.pyramid)
    decoder_in = _capture_inputs(model.decoder)
    embed_in = _capture_inputs(model.embed)
    with torch.no_grad():
        model(x, mask=mask)
    patches, = embed_in[0]
    _, tokens = pyramid_in[0]
    _, placement, grid = decoder_in[0]
    assert tokens.grid == (4, 6) and grid == (8, 12)
    assert torch.equal(placement, gather)
    for b in range(2):
        for k, cell in enumerate(gather[b].tolist()):
            y, xx = divmod(cell, 12)
            # compact token k carries the pixels and the true position of that same cell
            assert torch.equal(patches[b, k], x[b, 0, 8 * y:8 * y + 8, 8 * xx:8 * xx + 8].reshape(-1))
            assert tokens.pos[b, k].tolist() == [float(y), float(xx)]
            assert tokens.cells[k].tolist() == [k // 6, k % 6]


def test_secondary_masking_hides_a_quarter_of_the_visible_patches():
    torch.manual_seed(0)
    model = create_model("um_mae_tiny").double().eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 64, 96, generator=gen, dtype=torch.float64)
    mask = model.random_mask(2, 8, 12, generator=gen)

    def run(image):
        torch.manual_seed(11)
        with torch.no_grad():
            return model(image, mask=mask)

    out = run(x)
    hidden = out["secondary_mask"]
    assert hidden.shape == (2, 24) and hidden.sum(1).tolist() == [6, 6]  # round(24 * 0.25)
    assert not torch.equal(hidden[0], hidden[1])  # drawn per sample
    gather = uniform_gather_index(mask)
    # pixels of secondary-masked patches are replaced by the learnable token: they have no effect
    x2 = x.clone()
    for b in range(2):
        for cell in gather[b][hidden[b]].tolist():
            y, xx = divmod(cell, 12)
            x2[b, 0, 8 * y:8 * y + 8, 8 * xx:8 * xx + 8] = torch.randn(8, 8, dtype=torch.float64)
    torch.testing.assert_close(run(x2)["pred"], out["pred"], rtol=0, atol=1e-10)
    # the loss covers the primary mask only: 72 masked patches per sample, none of the secondary ones
    assert int(out["mask"][0].sum()) == 72
    assert not out["mask"].reshape(2, -1).gather(1, gather).any()
    no_sm = create_model("um_mae_tiny", secondary_mask_ratio=0.0)
    assert int(no_sm(x.float(), mask=mask)["secondary_mask"].sum()) == 0


# ---------------------------------------------------------------- GreenMIM
@pytest.mark.parametrize("h,w,seed", [(8, 12, 0), (32, 24, 1), (20, 36, 2)])
def test_greenmim_mask_is_shared_and_constant_on_coarsest_units(h, w, seed):
    unit = 8
    mask = unit_mask(3, h, w, unit, 0.75, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2])
    for i in range(0, h, unit):
        for j in range(0, w, unit):
            block = mask[0, i:i + unit, j:j + unit]
            assert bool(block.all()) or not bool(block.any())


def test_greenmim_encoder_gets_visible_tokens_and_merges_stay_whole():
    torch.manual_seed(0)
    model = create_model("greenmim_tiny").eval()
    x = torch.randn(2, 1, 160, 192)  # 20 x 24 lattice: border units are partial (20 = 2*8 + 4)
    mask = model.random_mask(2, 20, 24, generator=torch.Generator().manual_seed(1))
    seen = _capture_inputs(model.pyramid)
    stage_in = [_capture_inputs(blocks[0]) for blocks in model.pyramid.stages]
    with torch.no_grad():
        out = model(x, mask=mask)
    feats, tokens = seen[0]
    n_visible = int((~mask[0]).sum())
    assert feats.shape[:2] == (2, n_visible) and tokens.cells.shape[0] == n_visible
    visible_cells = (~mask[0]).nonzero()
    assert torch.equal(tokens.cells, visible_cells)
    # every merge joins all of a block's children that lie inside the stage grid
    for level in range(len(model.pyramid.stages) - 1):
        plan_tokens = tokens
        for _ in range(level):
            plan_tokens = plan_merge(plan_tokens).merged
        plan = plan_merge(plan_tokens)
        hs, ws = plan_tokens.grid
        for parent, kids in zip(plan.merged.cells.tolist(), plan.children.tolist()):
            inside = [2 * parent[0] + dy < hs and 2 * parent[1] + dx < ws for dy in (0, 1) for dx in (0, 1)]
            present = [k < plan_tokens.cells.shape[0] for k in kids]
            assert present == inside
    # stage token counts shrink with the merges; the last stage has one token per visible unit
    counts = [args[0][0].shape[1] for args in stage_in]
    units = unit_mask(1, 20, 24, 8, 0.75, generator=torch.Generator().manual_seed(1))
    assert counts[0] == n_visible and counts[-1] == int((~units[0, ::8, ::8]).sum())
    assert out["pred"].shape == (2, 480, 64)
