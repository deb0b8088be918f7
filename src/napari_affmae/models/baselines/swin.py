"""A Swin-style pyramid over token sets: (group) window attention, 2x2 patch merging, fusion neck.

One implementation serves three inputs:
- a dense lattice (segmentation of UM-MAE and GreenMIM): every cell is a token;
- UM-MAE's compacted quarter-size image: dense cells, but each token carries its *true*
  (pre-compaction) lattice position, which drives the relative-position bias;
- GreenMIM's visible tokens only: a subset of the lattice, windows packed into groups.

Positions are in 8-px lattice units; the bias sees offsets divided by the stage stride (1, 2, 4,
...). Merging joins the four cells of every 2x2 block of the stage grid; children outside the
token set (image border, odd sizes) are zero-filled, as Swin pads odd maps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Mlp, check_heads
from .grouping import GroupLayout, window_group_layout


@dataclass(frozen=True)
class TokenSet:
    """Where a stage's tokens are: cells ``[N, 2]`` int64 on the stage grid (row-major sorted,
    shared by the batch), grid ``(hs, ws)``, true positions ``[Bp, N, 2]`` float (Bp = 1 or B)."""

    cells: torch.Tensor
    grid: tuple[int, int]
    pos: torch.Tensor


@dataclass
class StageOutput:
    """Tokens ``[B, N, C]`` of one stage, their set, and ``parent [N]`` = index of the merged
    token each one feeds in the next stage (None for the last stage)."""

    x: torch.Tensor
    tokens: TokenSet
    parent: torch.Tensor | None


class RelativeBiasTable(nn.Module):
    """Per-head attention bias as a smooth function of the offset (dy, dx) between two tokens.

    Offsets (stage-stride units) are quantised to ``1/steps`` and clamped to ``+-max_offset``; a
    small MLP on the signed-log offset is evaluated once per call on that table and looked up per
    token pair, so irregular (compacted) positions cost no more than a regular grid.
    """

    def __init__(self, heads: int, max_offset: float, steps: int, hidden: int = 64) -> None:
        super().__init__()
        self.half = round(max_offset * steps)
        self.steps = steps
        side = 2 * self.half + 1
        d = (torch.arange(side, dtype=torch.float32) - self.half) / steps  # [side]
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        offsets = torch.stack([dy, dx], dim=-1).reshape(-1, 2)  # [side*side, 2]
        features = offsets.sign() * torch.log1p(offsets.abs()) / math.log1p(max(max_offset, 1.0))
        self.register_buffer("features", features, persistent=False)
        self.mlp = Mlp(2, hidden, heads)

    def index(self, rel: torch.Tensor) -> torch.Tensor:
        """Offsets ``[..., 2]`` (stage units) -> flat table index ``[...]`` int64."""
        q = (rel * self.steps).round().clamp(-self.half, self.half).long() + self.half
        return q[..., 0] * (2 * self.half + 1) + q[..., 1]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Table index ``[Bp, G, g, g]`` -> bias ``[Bp, G, heads, g, g]``."""
        table = self.mlp(self.features)  # [side*side, heads]
        return table[index].permute(0, 1, 4, 2, 3)


@dataclass(frozen=True)
class AttentionPlan:
    """Group layout of one (shifted) window partition and the table index of every slot pair."""

    layout: GroupLayout
    bias_index: torch.Tensor  # [Bp, G, g, g]


def plan_attention(tokens: TokenSet, window: int, shifted: bool, stride: float,
                   table: RelativeBiasTable) -> AttentionPlan:
    """Group the tokens of one stage into windows and precompute their relative-bias indices."""
    layout = window_group_layout(tokens.cells, tokens.grid, window, shifted)
    pos = tokens.pos
    padded = torch.cat([pos, pos.new_zeros(pos.shape[0], 1, 2)], dim=1)  # [Bp, N+1, 2]
    slot_pos = padded[:, layout.slot_token]  # [Bp, G, g, 2]
    rel = (slot_pos[:, :, :, None] - slot_pos[:, :, None, :]) / stride  # [Bp, G, g, g, 2]
    return AttentionPlan(layout, table.index(rel))


class GroupWindowAttention(nn.Module):
    """Window attention computed on groups of windows with a block-diagonal mask:
    ``[B, N, C] -> [B, N, C]``. Projections run on real tokens only; empty slots never cost a matmul
    beyond the ``g x g`` attention tile."""

    def __init__(self, dim: int, heads: int, max_offset: float, steps: int) -> None:
        super().__init__()
        check_heads(dim, heads, "window attention")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = RelativeBiasTable(heads, max_offset, steps)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        b, _, c = x.shape
        layout = plan.layout
        n_groups, cap = layout.n_groups, layout.capacity
        grouped = layout.group(self.qkv(x))  # [B, G, g, 3C]
        q, k, v = grouped.reshape(b, n_groups, cap, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.bias(plan.bias_index)  # [Bp, G, heads, g, g]
        bias = bias.masked_fill(~layout.allowed[None, :, None], float("-inf"))
        bias = bias.expand(b, -1, -1, -1, -1).reshape(b * n_groups, self.heads, cap, cap).to(q.dtype)
        flat = lambda t: t.reshape(b * n_groups, self.heads, cap, -1)  # noqa: E731
        out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=bias)  # [B*G, heads, g, d]
        out = out.reshape(b, n_groups, self.heads, cap, -1).permute(0, 1, 3, 2, 4).reshape(b, n_groups, cap, c)
        return self.proj(layout.ungroup(out))


class SwinBlock(nn.Module):
    """Pre-LN block: group window attention, then MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, max_offset: float, steps: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupWindowAttention(dim, heads, max_offset, steps)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), plan)
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class MergePlan:
    """children ``[Np, 4]``: token index of the (0,0), (0,1), (1,0), (1,1) child of every merged
    token (``N`` = absent); parent ``[N]``; the merged token set."""

    children: torch.Tensor
    parent: torch.Tensor
    merged: TokenSet


def plan_merge(tokens: TokenSet) -> MergePlan:
    """Join every 2x2 block of the stage grid that holds at least one token."""
    cells, pos = tokens.cells, tokens.pos
    n = cells.shape[0]
    hs, ws = tokens.grid
    grid = ((hs + 1) // 2, (ws + 1) // 2)
    key = (cells[:, 0] // 2) * grid[1] + cells[:, 1] // 2
    parents, parent = torch.unique(key, return_inverse=True)  # sorted keys: row-major order
    children = torch.full((parents.shape[0], 4), n, dtype=torch.long, device=cells.device)
    children[parent, (cells[:, 0] % 2) * 2 + cells[:, 1] % 2] = torch.arange(n, device=cells.device)
    count = torch.bincount(parent, minlength=parents.shape[0]).to(pos.dtype)  # [Np]
    merged_pos = pos.new_zeros(pos.shape[0], parents.shape[0], 2).index_add_(1, parent, pos) / count[None, :, None]
    merged_cells = torch.stack([parents // grid[1], parents % grid[1]], dim=-1)
    return MergePlan(children, parent, TokenSet(merged_cells, grid, merged_pos))


class PatchMerge(nn.Module):
    """Concat the four children (zeros where absent) -> LN(4C) -> Linear(4C, C_out):
    ``[B, N, C] -> [B, Np, C_out]``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        b, _, c = x.shape
        padded = torch.cat([x, x.new_zeros(b, 1, c)], dim=1)  # [B, N+1, C]
        joined = padded[:, plan.children.reshape(-1)].reshape(b, -1, 4 * c)  # [B, Np, 4C]
        return self.reduce(self.norm(joined))


class SwinPyramid(nn.Module):
    """Stages of Swin blocks (alternating plain / shifted windows) with 2x2 merging between them.

    ``forward(x [B, N, dims[0]], tokens)`` -> one `StageOutput` per stage (before merging).
    Bias tables cover offsets up to ``max_offset`` stage units at ``steps`` per unit.
    """

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...], mlp_ratio: float,
                 window: int, max_offset: float, steps: int) -> None:
        super().__init__()
        self.window = window
        self.stages = nn.ModuleList(
            nn.ModuleList(SwinBlock(dim, nh, mlp_ratio, max_offset, steps) for _ in range(depth))
            for dim, depth, nh in zip(dims, depths, heads)
        )
        self.merges = nn.ModuleList(PatchMerge(dims[i], dims[i + 1]) for i in range(len(dims) - 1))

    def forward(self, x: torch.Tensor, tokens: TokenSet) -> list[StageOutput]:
        outputs: list[StageOutput] = []
        for level, blocks in enumerate(self.stages):
            plans: dict[bool, AttentionPlan] = {}
            for i, block in enumerate(blocks):
                shifted = i % 2 == 1
                if shifted not in plans:  # one plan per partition, shared by the stage's blocks
                    plans[shifted] = plan_attention(tokens, self.window, shifted, 2.0 ** level, block.attn.bias)
                x = block(x, plans[shifted])
            if level == len(self.stages) - 1:
                outputs.append(StageOutput(x, tokens, None))
                break
            merge = plan_merge(tokens)
            outputs.append(StageOutput(x, tokens, merge.parent))
            x = self.merges[level](x, merge)
            tokens = merge.merged
        return outputs


class FusionNeck(nn.Module):
    """Feature of every first-stage token = sum over stages of Linear(LN(x_s)) taken at its
    ancestor in that stage (nearest upsampling along the merge tree): ``-> [B, N_1, out_dim]``."""

    def __init__(self, dims: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, out_dim)) for d in dims)

    def forward(self, stages: list[StageOutput]) -> torch.Tensor:
        ancestor = torch.arange(stages[0].x.shape[1], device=stages[0].x.device)  # [N_1]
        fused = None
        for stage, proj in zip(stages, self.proj):
            feat = proj(stage.x)[:, ancestor]  # [B, N_1, out]
            fused = feat if fused is None else fused + feat
            if stage.parent is not None:
                ancestor = stage.parent[ancestor]
        return fused
