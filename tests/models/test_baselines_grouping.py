"""GreenMIM's group window attention: packing, block-diagonal groups, lossless (un)grouping,
attention equal to a per-window reference, sparse merging."""
from __future__ import annotations

import math

import pytest
import torch

from napari_affmae.models.baselines.grouping import (build_group_layout, pack_windows, plan_groups, window_group_layout,
                                                     window_ids)
from napari_affmae.models.baselines.swin import GroupWindowAttention, TokenSet, plan_attention, plan_merge


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin contention on small shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_cells(h: int, w: int, keep: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep_mask = torch.rand(h, w, generator=gen) < keep
    keep_mask[0, 0] = True
    return torch.nonzero(keep_mask)  # [N, 2] row-major


@pytest.mark.parametrize("seed", range(5))
def test_packing_places_every_window_once_within_capacity(seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 65, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
    capacity, groups = plan_groups(counts)
    placed = sorted(i for g in groups for i in g)
    assert placed == list(range(len(counts)))
    assert all(sum(counts[i] for i in g) <= capacity for g in groups)
    assert capacity >= max(counts)
    # never worse than the trivial plan (one window per group of the largest window's size)
    assert len(groups) * capacity**2 <= len(counts) * max(counts) ** 2
    # greedy packing is tight on an easy case: 4 windows of 32 + 2 of 64 fit 4 groups of 64
    assert len(pack_windows([32, 64, 32, 32, 64, 32], 64)) == 4
    with pytest.raises(ValueError, match="smaller than the largest window"):
        pack_windows([10, 70], 64)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("grid,keep,seed", [
    ((16, 24), 0.3, 0), ((13, 9), 0.6, 1), ((8, 8), 1.0, 2), ((20, 12), 0.1, 3),
])
def test_groups_never_mix_windows_and_lose_no_token(grid, keep, seed, shifted):
    window = 4
    cells = _random_cells(*grid, keep, seed)
    n = cells.shape[0]
    layout = window_group_layout(cells, grid, window, shifted)
    # reference window of every token, computed directly from the partition rule
    off = window // 2 if shifted else 0
    ref_window = [((int(y) + (off if grid[0] > window else 0)) // window,
                   (int(x) + (off if grid[1] > window else 0)) // window) for y, x in cells]
    slot_token = layout.slot_token.reshape(-1)
    real = slot_token < n
    # every token sits in exactly one slot, and token_slot is the inverse of slot_token
    assert sorted(slot_token[real].tolist()) == list(range(n))
    assert torch.equal(slot_token[layout.token_slot], torch.arange(n))
    # grouping then ungrouping returns every token unchanged
    x = torch.randn(2, n, 5)
    grouped = layout.group(x)
    assert grouped.shape == (2, layout.n_groups, layout.capacity, 5)
    assert torch.equal(layout.ungroup(grouped), x)
    assert torch.equal(grouped.reshape(2, -1, 5)[:, ~real], torch.zeros(2, int((~real).sum()), 5))
    # block-diagonal: a query may attend a key iff both are real tokens of the same window
    for g in range(layout.n_groups):
        toks = layout.slot_token[g].tolist()
        for a, ta in enumerate(toks):
            for b, tb in enumerate(toks):
                if ta < n and tb < n:
                    expected = ref_window[ta] == ref_window[tb]
                else:
                    expected = ta >= n and a == b  # an empty slot sees only itself
                assert bool(layout.allowed[g, a, b]) == expected
    # a window never spans two groups
    group_of = {}
    for g in range(layout.n_groups):
        for t in layout.slot_token[g].tolist():
            if t < n:
                assert group_of.setdefault(ref_window[t], g) == g


def _reference_window_attention(attn: GroupWindowAttention, x: torch.Tensor, tokens: TokenSet, window: int,
                                shifted: bool, stride: float) -> torch.Tensor:
    """Loop over windows: softmax(q k^T / sqrt(d) + MLP bias(offset)) v in float64."""
    b, n, c = x.shape
    heads, d = attn.heads, c // attn.heads
    ids = window_ids(tokens.cells, tokens.grid, window, shifted)
    qkv = attn.qkv(x).reshape(b, n, 3, heads, d)
    out = torch.zeros(b, n, heads, d, dtype=x.dtype)
    max_offset = attn.bias.half / attn.bias.steps
    for wid in ids.unique():
        members = (ids == wid).nonzero()[:, 0]
        q, k, v = (qkv[:, members, i].transpose(1, 2) for i in range(3))  # [B, heads, m, d]
        pos = tokens.pos[:, members]  # [Bp, m, 2]
        rel = ((pos[:, :, None] - pos[:, None, :]) / stride).clamp(-max_offset, max_offset)
        feat = rel.sign() * torch.log1p(rel.abs()) / math.log1p(max_offset)
        bias = attn.bias.mlp(feat.to(x.dtype)).permute(0, 3, 1, 2)  # [Bp, heads, m, m]
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
        out[:, members] = (weights @ v).transpose(1, 2)
    return attn.proj(out.reshape(b, n, c))


@pytest.mark.parametrize("shifted", [False, True])
def test_group_window_attention_equals_per_window_reference(shifted):
    torch.manual_seed(0)
    window, grid = 4, (12, 10)
    cells = _random_cells(*grid, 0.45, 7)
    tokens = TokenSet(cells, grid, cells[None].double())
    attn = GroupWindowAttention(16, 4, max_offset=window - 1, steps=1).double()
    x = torch.randn(2, cells.shape[0], 16, dtype=torch.float64)
    plan = plan_attention(tokens, window, shifted, 1.0, attn.bias)
    assert plan.layout.n_groups < int(window_ids(cells, grid, window, shifted).unique().numel())  # groups did pack
    got = attn(x, plan)
    want = _reference_window_attention(attn, x, tokens, window, shifted, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_sparse_merge_joins_2x2_blocks_and_averages_positions():
    cells = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0, 4], [1, 5], [4, 2]])
    pos = cells[None].float() + 0.5
    plan = plan_merge(TokenSet(cells, (5, 6), pos))
    assert plan.merged.grid == (3, 3)
    assert plan.merged.cells.tolist() == [[0, 0], [0, 2], [2, 1]]
    assert plan.children.tolist() == [[0, 1, 2, 3], [4, 7, 7, 5], [6, 7, 7, 7]]  # 7 = absent
    assert plan.parent.tolist() == [0, 0, 0, 0, 1, 1, 2]
    torch.testing.assert_close(plan.merged.pos[0], torch.tensor([[1.0, 1.0], [1.0, 5.0], [4.5, 2.5]]))


def test_dense_layout_keeps_one_window_per_group():
    cells = torch.nonzero(torch.ones(8, 12, dtype=torch.bool))
    layout = window_group_layout(cells, (8, 12), 4, shifted=False)
    assert (layout.n_groups, layout.capacity) == (6, 16)
    assert bool((layout.slot_token < cells.shape[0]).all())
    with pytest.raises(ValueError, match="no tokens"):
        plan_groups([])
    assert build_group_layout(torch.zeros(3, dtype=torch.long), [[0]], 3).allowed.all()
