"""AFFMAE encoder: masked conv stem, clustered neighbourhood-attention stages, adaptive merging.

Only visible tokens enter the stages; each stage re-orders its tokens along a Hilbert curve,
clusters them, attends within neighbourhoods, emits its tokens with their integer lattice
positions, and keeps the ``ceil(n * keep_rate)`` most important tokens as the next stage's
(off-grid) centres.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from affmae_kernels import weighted_merge

from .clustering import Clusters, Neighborhood, build_neighborhood, curve_order, gather_tokens, relative_features
from .common import PATCH_SIZE, lattice_positions, split_by_mask
from .layers import Block, ChannelNorm, Mlp, RelativePositionBias, attention_chunk, chunk_rows, \
    chunked_pointwise_mlp, spans


@dataclass
class StageOutput:
    """One stage's tokens in curve order: tokens ``[B, N, C]``, pos ``[B, N, 2]`` int64 (y, x)."""

    tokens: torch.Tensor
    pos: torch.Tensor
    clusters: Clusters
    scale: float


class MaskedConvStem(nn.Module):
    """Three 3x3 stride-2 convs (1 -> E/2 -> E/2 -> E) that never see masked pixels.

    Before every conv, features of masked patches are zeroed at that resolution, so a visible
    token's output depends only on visible pixels (the leak test proves it).
    """

    def __init__(self, embed_dim: int, in_chans: int = 1) -> None:
        super().__init__()
        half = embed_dim // 2
        chans = [in_chans, half, half, embed_dim]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1) for i in range(3))
        self.norms = nn.ModuleList(ChannelNorm(chans[i + 1]) for i in range(3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x ``[B, 1, H, W]``, mask ``[B, h, w]`` -> (``[B, E, h, w]``, [level-1 map ``[B, E/2, H/2, W/2]``,
        level-2 map ``[B, E/2, H/4, W/4]``]) (the level maps before the next level's masking)."""
        keep = None if mask is None else (~mask)[:, None].to(x.dtype)  # [B, 1, h, w]
        levels = []
        for level, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if keep is not None:
                factor = PATCH_SIZE >> level  # 8, 4, 2 pixels of this level per patch
                x = x * keep.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
            x = norm(conv(x))
            if level < 2:
                x = F.gelu(x)
                levels.append(x)
        if keep is not None:
            x = x * keep
        return x, levels


class AdaptiveMerge(nn.Module):
    """Keep the top ``ceil(n * keep_rate)`` tokens by importance; pool their neighbourhoods.

    New feature = Linear(LN(concat_g sum_j g_g(dp_cj) * s_j * valid_j * x_j)), with s = sigmoid
    importance; s_j multiplies the pooled features, so the scorer receives gradient.
    """

    def __init__(self, dim_in: int, dim_out: int, keep_rate: float, groups: int = 4) -> None:
        super().__init__()
        self.keep_rate = keep_rate
        self.groups = groups
        self.score = nn.Linear(dim_in, 1)
        self.weights = Mlp(5, 32, groups)
        self.norm = nn.LayerNorm(groups * dim_in)
        self.proj = nn.Linear(groups * dim_in, dim_out)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, nb: Neighborhood, scale: float,
                chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, N, C]``, pos ``[B, N, 2]`` -> (merged ``[B, N', C']``, pos ``[B, N', 2]``, scores ``[B, N]``).

        ``chunk_bytes`` (no-grad inference only): pool the centres in chunks, each chunk's temporaries
        within this budget. Same maths."""
        b, n, c = x.shape
        scores = torch.sigmoid(self.score(x).squeeze(-1))  # [B, N]
        n_keep = max(1, math.ceil(n * self.keep_rate))
        centres = torch.topk(scores.detach(), n_keep, dim=1).indices  # [B, N']
        centres = torch.sort(centres, dim=1).values  # keep curve order among centres
        idx, valid = nb.rows_for(centres)  # [B, N', M]
        centre_pos = gather_tokens(pos, centres)  # [B, N', 2]
        if chunk_bytes is None:
            return self._pool(x, pos, scores, centre_pos, idx, valid, scale), centre_pos, scores
        if torch.is_grad_enabled():
            raise ValueError("the chunked merge is for inference: call it under torch.no_grad()")
        itemsize = 8 if x.dtype == torch.float64 else 4
        chunk = chunk_rows(chunk_bytes, b * idx.shape[-1] * itemsize * max(2 * self.weights.fc1.out_features, c))
        merged = None
        for s, e in spans(n_keep, chunk):
            part = self._pool(x, pos, scores, centre_pos[:, s:e], idx[:, s:e], valid[:, s:e], scale)
            if merged is None:
                merged = part.new_empty(b, n_keep, part.shape[-1])
            merged[:, s:e] = part
        return merged, centre_pos, scores

    def _pool(self, x: torch.Tensor, pos: torch.Tensor, scores: torch.Tensor, centre_pos: torch.Tensor,
              idx: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
        """Merged features ``[B, n, C']`` of centres at centre_pos ``[B, n, 2]`` with neighbourhoods idx / valid
        ``[B, n, M]`` over x ``[B, N, C]`` (positions ``[B, N, 2]``, importance scores ``[B, N]``)."""
        b, n, m = idx.shape
        neighbour_pos = gather_tokens(pos, idx.long().reshape(b, -1)).reshape(b, n, m, 2)
        rel = (neighbour_pos - centre_pos[:, :, None]).to(x.dtype)  # [B, n, M, 2]
        s_nb = gather_tokens(scores, idx.long().reshape(b, -1)).reshape(b, n, m)
        w = chunked_pointwise_mlp(self.weights, relative_features(rel, scale)) * (s_nb * valid)[..., None]  # [B, n, M, G]
        pooled = weighted_merge(w.to(x.dtype), x, idx)  # [B, n, G, C]
        return self.proj(self.norm(pooled.reshape(b, n, self.groups * x.shape[-1])))


class AFFMAEEncoder(nn.Module):
    """Hierarchical encoder over visible tokens. Returns one `StageOutput` per stage (res2..res5)."""

    def __init__(self, dims: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...],
                 mlp_ratio: float, keep_rate: float, cluster_size: int, nearest_clusters: int,
                 neighborhood: str, locality: bool = False) -> None:
        super().__init__()
        if not (len(dims) == len(depths) == len(heads)):
            raise ValueError("dims, depths and heads need one entry per stage")
        self.dims = dims
        self.keep_rate = keep_rate
        self.cluster_size = cluster_size
        self.nearest_clusters = nearest_clusters
        self.neighborhood = neighborhood
        self.stem = MaskedConvStem(dims[0])
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(dims[i], heads[i], mlp_ratio) for _ in range(depths[i])) for i in range(len(dims))
        )
        self.stage_bias = nn.ModuleList(RelativePositionBias(heads[i], depths[i], locality=locality)
                                        for i in range(len(dims)))
        self.merges = nn.ModuleList(
            AdaptiveMerge(dims[i], dims[i + 1], keep_rate) for i in range(len(dims) - 1)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)

    def stage_scale(self, stage: int) -> float:
        """Typical token spacing of a stage in lattice units (normalises relative positions)."""
        return 2.0 * self.keep_rate ** (-stage / 2)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Stem + gather of visible tokens: -> tokens ``[B, N, E]``, pos ``[B, N, 2]``, the stem's level-1 and
        level-2 maps (`MaskedConvStem.forward`)."""
        fmap, levels = self.stem(x, mask)  # [B, E, h, w]
        b, e, h, w = fmap.shape
        flat = fmap.flatten(2).transpose(1, 2)  # [B, h*w, E]
        grid = lattice_positions(h, w, device=x.device).expand(b, -1, -1)  # [B, h*w, 2]
        if mask is None:
            return flat, grid, levels
        visible, _ = split_by_mask(mask)  # [B, N] row-major visible cells
        return gather_tokens(flat, visible), gather_tokens(grid, visible), levels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[StageOutput]:
        tokens, pos, _ = self.embed(x, mask)
        return self.forward_tokens(tokens, pos)

    def forward_tokens(self, tokens: torch.Tensor, pos: torch.Tensor, chunk_bytes: int | None = None
                       ) -> list[StageOutput]:
        """Run the stages on tokens ``[B, N, E]`` at positions ``[B, N, 2]``.

        ``chunk_bytes`` (no-grad inference only): blocks and merges go through their tokens in chunks, each
        chunk's temporaries within this budget; no per-neighbour tensor (``[B, N, M, ...]``) is whole. Same
        maths as the default whole-tensor path."""
        if chunk_bytes is not None and torch.is_grad_enabled():
            raise ValueError("the chunked encoder path is for inference: call it under torch.no_grad()")
        outputs = []
        for i, blocks in enumerate(self.stages):
            order = curve_order(pos)
            tokens, pos = gather_tokens(tokens, order), gather_tokens(pos, order)
            clusters = Clusters.from_sorted(pos, self.cluster_size)
            nb = build_neighborhood(clusters, clusters, self.nearest_clusters, self.neighborhood)
            scale = self.stage_scale(i)
            if chunk_bytes is None:
                biases = self.stage_bias[i](relative_features(nb.rel, scale))  # one [B, H, N, M] per block
                for block, bias in zip(blocks, biases):
                    tokens = block(tokens, nb, bias)
            else:
                self._blocks_in_chunks(i, tokens, nb, chunk_bytes)
            outputs.append(StageOutput(self.norms[i](tokens), pos, clusters, scale))
            if i < len(self.merges):
                tokens, pos, _ = self.merges[i](tokens, pos, nb, scale, chunk_bytes)
        return outputs

    def _blocks_in_chunks(self, stage: int, tokens: torch.Tensor, nb: Neighborhood, budget: int) -> torch.Tensor:
        """The blocks of one stage on tokens ``[B, N, C]`` (in place, no grad), chunks within ``budget`` bytes."""
        bias_mlp = self.stage_bias[stage]
        scale = self.stage_scale(stage)
        itemsize = 8 if tokens.dtype == torch.float64 else 4
        for j, block in enumerate(self.stages[stage]):
            chunk = attention_chunk(block.attn, tokens.shape[0], nb.idx.shape[-1], bias_mlp.mlp.fc1.out_features,
                                    itemsize, budget, self.cluster_size)

            def bias(rows: Neighborhood, j: int = j) -> torch.Tensor:
                return bias_mlp.layer_bias(relative_features(rows.rel, scale), j)

            block.forward_in_chunks(tokens, nb, bias, chunk, budget)
        return tokens
