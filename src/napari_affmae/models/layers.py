"""Transformer layers over off-grid tokens: neighbourhood attention, MLP, pre-LN blocks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from affmae_kernels import neighborhood_attention

from .clustering import Neighborhood

HEAD_DIM = 32


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


#: Bytes of one chunk's hidden activations in `chunked_pointwise_mlp`.
MLP_CHUNK_BYTES = 16 * 2**20


def chunked_pointwise_mlp(mlp: Mlp, x: torch.Tensor, chunk_bytes: int = MLP_CHUNK_BYTES) -> torch.Tensor:
    """``mlp`` on x ``[B, N, M, F]`` -> ``[B, N, M, O]``, in chunks along N; hidden activations are never kept.

    The hidden activations (``[B, N, M, hidden]``, twice: before and after GELU) are the memory hot
    spot of the small relative-position MLPs. With autograd on, every chunk is checkpointed (only
    its input is saved; the backward recomputes the chunk's hidden activations); without
    autograd, chunks are written into one output. Same maths as ``mlp(x)``.
    """
    b, n, m = x.shape[:3]
    hidden = mlp.fc1.out_features
    rows = max(1, chunk_bytes // max(1, b * m * hidden * x.element_size()))
    grad = torch.is_grad_enabled() and any(p.requires_grad for p in mlp.parameters())
    if rows >= n:
        return checkpoint(mlp, x, use_reentrant=False) if grad else mlp(x)
    if grad:
        return torch.cat([checkpoint(mlp, x[:, s:s + rows], use_reentrant=False) for s in range(0, n, rows)], dim=1)
    out = x.new_empty(b, n, m, mlp.fc2.out_features)  # [B, N, M, O]
    for s in range(0, n, rows):
        out[:, s:s + rows] = mlp(x[:, s:s + rows])
    return out


class RelativePositionBias(nn.Module):
    """Per-head biases of several attention layers from one small MLP on (dy, dx, |d|, dy/|d|, dx/|d|).

    All layers that attend over the same neighbourhood share the MLP. Its hidden activations
    (one value per query, neighbour and hidden unit) would be the memory hot spot, so they are
    computed in chunks and recomputed in the backward (`chunked_pointwise_mlp`):
    rel_feat ``[B, Nq, M, 5]`` -> one bias ``[B, H, Nq, M]`` per layer.

    With ``locality`` a learnable per-head distance penalty ``-slope_h * |d|`` is added (ALiBi-style:
    slopes from 2 down to 1/8 across the heads, so some heads start sharply local and others nearly
    global). Without it every neighbour starts with the same weight, and a short run never learns to
    look at the nearest tokens (see docs/pretraining.md).
    """

    def __init__(self, heads: int, layers: int = 1, hidden: int = 32, locality: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.layers = layers
        self.mlp = Mlp(5, hidden, heads * layers)
        if locality:
            slopes = torch.logspace(1.0, -3.0, heads, base=2.0) if heads > 1 else torch.ones(1)
            self.slope = nn.Parameter(slopes.repeat(layers))  # [layers * H]
        else:
            self.slope = None

    def forward(self, rel_feat: torch.Tensor) -> list[torch.Tensor]:
        out = chunked_pointwise_mlp(self.mlp, rel_feat.to(self.mlp.fc1.weight.dtype))  # [B, Nq, M, H * layers]
        if self.slope is not None:
            out = out - rel_feat[..., 2:3].to(out.dtype) * self.slope.to(out.dtype)  # |d| is feature 2
        return [b.permute(0, 3, 1, 2) for b in out.split(self.heads, dim=-1)]


class NeighborhoodAttention(nn.Module):
    """Multi-head attention of each query over its neighbourhood of keys, plus a learnable blank key/value.

    Self-attention when ``context`` is None, cross-attention otherwise.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.blank_k = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.blank_v = nn.Parameter(torch.zeros(heads, self.head_dim))
        nn.init.trunc_normal_(self.blank_k, std=0.02)

    def forward(self, x: torch.Tensor, nb: Neighborhood, bias: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, Nq, C]``, context ``[B, Nk, Cc]``, bias ``[B, H, Nq, M]`` -> ``[B, Nq, C]``."""
        b, nq, c = x.shape
        ctx = x if context is None else context
        q = self.q(x).reshape(b, nq, self.heads, self.head_dim).transpose(1, 2)  # [B, H, Nq, D]
        kv = self.kv(ctx).reshape(b, ctx.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # [B, H, Nk, D]
        pad = nb.padded_queries - nq
        if pad:  # cluster mode: the kernel sees whole clusters of queries
            q = F.pad(q, (0, 0, 0, pad))
            bias = F.pad(bias, (0, 0, 0, pad))
        out = neighborhood_attention(q, k, v, nb.idx, bias=bias.to(q.dtype), valid=nb.valid,
                                     blank_k=self.blank_k.to(q.dtype), blank_v=self.blank_v.to(q.dtype))
        out = out[:, :, :nq].transpose(1, 2).reshape(b, nq, c)  # [B, Nq, C]
        return self.proj(out)


class Block(nn.Module):
    """Pre-LN block: neighbourhood self-attention, then MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, nb: Neighborhood, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), nb, bias)
        return x + self.mlp(self.norm2(x))
