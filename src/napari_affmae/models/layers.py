"""Transformer layers over off-grid tokens: neighbourhood attention, MLP, pre-LN blocks."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from affmae_kernels import neighborhood_attention

from .clustering import Neighborhood

HEAD_DIM = 32


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of a ``[B, C, H, W]`` map (per pixel, so local in space)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


#: Bytes of one chunk's hidden activations in `chunked_pointwise_mlp`.
MLP_CHUNK_BYTES = 2 * 2**20


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


#: Memory budget of one chunk in no-grad (inference) forwards that go through their queries in chunks:
#: bytes of the largest per-chunk temporary (a gathered neighbour tensor or an MLP's hidden activations).
INFERENCE_CHUNK_BYTES = 2 * 2**20


def chunk_rows(budget: int, row_bytes: int, multiple: int = 1) -> int:
    """Rows per chunk so that ``rows * row_bytes`` fits ``budget``: at least one, a multiple of ``multiple``."""
    rows = max(1, budget // max(1, row_bytes))
    return max(multiple, rows // multiple * multiple)


def spans(n: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` chunks of ``rows`` covering ``range(n)``."""
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def attention_chunk(attn: "NeighborhoodAttention", batch: int, neighbors: int, bias_hidden: int, itemsize: int,
                    budget: int, multiple: int) -> int:
    """Queries per chunk of a no-grad neighbourhood attention: its gathered neighbour tensor
    (``[B, H, n, M, D]``, reference backend) and its bias MLP's hidden activations (``[B, n, M, hidden]``,
    twice) each within ``budget``; a multiple of ``multiple`` (the cluster size)."""
    per_query = batch * neighbors * itemsize * max(attn.heads * attn.head_dim, 2 * bias_hidden)
    return chunk_rows(budget, per_query, multiple)


def residual_attention_in_chunks(attn: "NeighborhoodAttention", norm: nn.Module, x: torch.Tensor,
                                 k: torch.Tensor, v: torch.Tensor, rows: Callable[[int, int], Neighborhood],
                                 bias: Callable[[Neighborhood], torch.Tensor], chunk: int) -> torch.Tensor:
    """No-grad ``x + attn(norm(x), ...)`` written into x ``[B, N, C]`` in place, ``chunk`` queries at a time.

    k, v ``[B, H, Nk, D]`` are computed beforehand (from every token before the update); ``rows(s, e)`` gives
    the neighbourhoods of queries ``[s, e)`` and ``bias(nb)`` their bias ``[B, H, e - s, M]``."""
    for s, e in spans(x.shape[1], chunk):
        nb = rows(s, e)
        x[:, s:e] += attn.attend(norm(x[:, s:e]), k, v, nb, bias(nb))
    return x


def residual_mlp_in_chunks(mlp: "Mlp", norm: nn.Module, x: torch.Tensor, budget: int) -> torch.Tensor:
    """No-grad ``x + mlp(norm(x))`` written into x ``[B, N, C]`` in place, rows within ``budget`` at a time."""
    b = x.shape[0]
    chunk = chunk_rows(budget, 2 * b * mlp.fc1.out_features * x.element_size())
    for s, e in spans(x.shape[1], chunk):
        x[:, s:e] += mlp(norm(x[:, s:e]))
    return x


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

    def layer_bias(self, rel_feat: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's bias only: rel_feat ``[B, n, M, 5]`` -> ``[B, H, n, M]``, equal to ``self(rel_feat)[layer]``.

        Computes just that layer's output units of the MLP (its rows of ``fc2``), for callers that
        go through the queries in chunks one layer at a time (no-grad inference)."""
        rows = slice(layer * self.heads, (layer + 1) * self.heads)
        hidden = F.gelu(self.mlp.fc1(rel_feat.to(self.mlp.fc1.weight.dtype)))  # [B, n, M, hidden]
        out = F.linear(hidden, self.mlp.fc2.weight[rows], self.mlp.fc2.bias[rows])  # [B, n, M, H]
        del hidden
        if self.slope is not None:
            out = out - rel_feat[..., 2:3].to(out.dtype) * self.slope[rows].to(out.dtype)
        return out.permute(0, 3, 1, 2)


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
        ctx = x if context is None else context
        kv = self.kv(ctx).reshape(ctx.shape[0], ctx.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.attend(x, kv[0], kv[1], nb, bias)  # k, v [B, H, Nk, D]

    def keys_values(self, context: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous k, v ``[B, H, Nk, D]`` of ``prepare(context)`` (context ``[B, Nk, Cc]``), built ``chunk``
        rows at a time (no-grad inference: the ``[B, Nk, 2 C]`` projection is never whole)."""
        b, n, _ = context.shape
        k = v = None
        for s in range(0, n, chunk):
            part = context[:, s:s + chunk]
            kv = self.kv(prepare(part) if prepare is not None else part)
            kv = kv.reshape(b, part.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            if k is None:
                k = kv.new_empty(b, self.heads, n, self.head_dim)
                v = kv.new_empty(b, self.heads, n, self.head_dim)
            k[:, :, s:s + chunk] = kv[0]
            v[:, :, s:s + chunk] = kv[1]
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nb: Neighborhood,
               bias: torch.Tensor) -> torch.Tensor:
        """Queries from x ``[B, Nq, C]`` over given keys/values ``[B, H, Nk, D]`` -> ``[B, Nq, C]``."""
        b, nq, c = x.shape
        q = self.q(x).reshape(b, nq, self.heads, self.head_dim).transpose(1, 2)  # [B, H, Nq, D]
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

    def forward_in_chunks(self, x: torch.Tensor, nb: Neighborhood, bias: Callable[[Neighborhood], torch.Tensor],
                          chunk: int, budget: int = INFERENCE_CHUNK_BYTES) -> torch.Tensor:
        """No-grad ``forward`` updating x ``[B, N, C]`` in place, ``chunk`` queries at a time; ``bias(rows)`` gives
        the bias ``[B, H, n, M]`` of a chunk's neighbourhoods (see `residual_attention_in_chunks`)."""
        k, v = self.attn.keys_values(x, self.norm1, chunk)
        residual_attention_in_chunks(self.attn, self.norm1, x, k, v, nb.query_rows, bias, chunk)
        del k, v
        return residual_mlp_in_chunks(self.mlp, self.norm2, x, budget)
