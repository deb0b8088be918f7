"""AFFMAE decoder: queries at target lattice positions attend coarse to fine (res5 -> res2).

Each layer: neighbourhood cross-attention from the queries to the tokens of one encoder stage
(members of the queries' nearest token clusters, same kernel as the encoder), neighbourhood
self-attention among the queries, then an MLP. Cross-attention through the encoder's kernel
was chosen over deformable 4-NN sampling: one op to optimise, exact attention over 64
neighbours instead of 4 interpolated samples.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .affmae_encoder import StageOutput
from .clustering import Clusters, Neighborhood, build_neighborhood, curve_order, gather_tokens, nearest_members, \
    relative_features, relative_positions
from .common import sincos_position_code
from .layers import Mlp, NeighborhoodAttention, RelativePositionBias, attention_chunk, residual_attention_in_chunks, \
    residual_mlp_in_chunks, spans

#: Typical spacing (lattice units) used to normalise query-to-query offsets.
QUERY_SCALE = 2.0


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = NeighborhoodAttention(dim, heads)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = NeighborhoodAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q, keys, cross_nb, cross_bias, self_nb, self_bias):
        """q ``[B, Nq, D]``, keys ``[B, Nk, D]``, biases ``[B, H, Nq, M]`` -> ``[B, Nq, D]``."""
        q = q + self.cross(self.norm_cross(q), cross_nb, cross_bias, context=keys)
        q = q + self.self_attn(self.norm_self(q), self_nb, self_bias)
        return q + self.mlp(self.norm_mlp(q))


class AFFMAEDecoder(nn.Module):
    """Coarse-to-fine decoder over off-grid encoder tokens.

    ``forward`` returns the query features after each layer, ``[res5, res4, res3, res2]`` (for a
    4-stage encoder), each ``[B, Nq, D]`` in the caller's query order.
    """

    def __init__(self, encoder_dims: tuple[int, ...], dim: int, heads: int, mlp_ratio: float,
                 cluster_size: int, nearest_clusters: int, neighborhood: str, locality: bool = False,
                 cross_clusters: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.cluster_size = cluster_size
        self.nearest_clusters = nearest_clusters
        self.cross_clusters = nearest_clusters if cross_clusters is None else int(cross_clusters)
        self.neighborhood = neighborhood
        self.query_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.query_token, std=0.02)
        self.pos_proj = nn.Linear(dim, dim)
        self.key_proj = nn.ModuleList(nn.Linear(d, dim) for d in reversed(encoder_dims))
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, mlp_ratio) for _ in encoder_dims)
        # the queries' own neighbourhood is the same for every layer: one shared bias MLP
        self.self_bias = RelativePositionBias(heads, len(encoder_dims), locality=locality)
        self.cross_bias = nn.ModuleList(RelativePositionBias(heads, locality=locality) for _ in encoder_dims)

    def forward(self, query_pos: torch.Tensor, stages: list[StageOutput], canvas: tuple[int, int],
                query_init: torch.Tensor | None = None, chunk_bytes: int | None = None,
                query_proj: nn.Module | None = None) -> list[torch.Tensor]:
        """query_pos ``[B, Nq, 2]`` lattice positions, canvas ``(h, w)``; query_init ``[B, Nq, D]`` optional, or
        ``[B, Nq, E]`` that ``query_proj`` maps to D (applied chunk by chunk in the chunked path).

        ``chunk_bytes`` (no-grad inference only): go through the queries in chunks in every sub-layer, each
        chunk's temporaries within this budget (`layers.attention_chunk`), so nothing per query and
        neighbour (``[B, Nq, M, ...]``) is ever whole; returns only the last layer's output then (a
        one-element list). Same maths as the default whole-tensor path."""
        order = curve_order(query_pos)  # queries in curve order for clustering
        inverse = torch.argsort(order, dim=1)
        qpos = gather_tokens(query_pos, order)
        if chunk_bytes is not None:
            if torch.is_grad_enabled():
                raise ValueError("the chunked decoder path is for inference: call it under torch.no_grad()")
            q = self._forward_chunked(qpos, order, stages, canvas, (query_init, query_proj), chunk_bytes)
            return [gather_tokens(q, inverse)]
        if query_proj is not None and query_init is not None:
            query_init = query_proj(query_init)
        q = self.query_token + self.pos_proj(sincos_position_code(qpos, self.dim, canvas).to(self.query_token.dtype))  # [B, Nq, D]
        if query_init is not None:
            q = q + gather_tokens(query_init, order)
        queries = Clusters.from_sorted(qpos, self.cluster_size)
        self_nb = build_neighborhood(queries, queries, self.nearest_clusters, self.neighborhood)
        self_biases = self.self_bias(relative_features(self_nb.rel, QUERY_SCALE))  # one per layer
        outputs = []
        for layer, proj, cross_bias, self_bias, stage in zip(self.layers, self.key_proj, self.cross_bias, self_biases,
                                                             reversed(stages)):
            cross_nb = build_neighborhood(queries, stage.clusters, self.cross_clusters, self.neighborhood)
            (bias,) = cross_bias(relative_features(cross_nb.rel, stage.scale))
            q = layer(q, proj(stage.tokens), cross_nb, bias, self_nb, self_bias)
            outputs.append(gather_tokens(q, inverse))
        return outputs


    def _initial_queries(self, qpos: torch.Tensor, order: torch.Tensor, canvas: tuple[int, int],
                         init: tuple[torch.Tensor | None, nn.Module | None], chunk: int) -> torch.Tensor:
        """Query features ``[B, Nq, D]`` in curve order, built ``chunk`` queries at a time; init: (query_init,
        query_proj) of ``forward``."""
        b, n, _ = qpos.shape
        query_init, query_proj = init
        q = None
        for s, e in spans(n, chunk):
            code = sincos_position_code(qpos[:, s:e], self.dim, canvas).to(self.query_token.dtype)
            part = self.query_token + self.pos_proj(code)  # [B, n, D]
            if query_init is not None:
                rows = gather_tokens(query_init, order[:, s:e])
                part = part + (query_proj(rows) if query_proj is not None else rows)
            if q is None:
                q = part.new_empty(b, n, part.shape[-1])
            q[:, s:e] = part
        return q

    def _forward_chunked(self, qpos: torch.Tensor, order: torch.Tensor, stages: list[StageOutput],
                         canvas: tuple[int, int], init: tuple[torch.Tensor | None, nn.Module | None],
                         budget: int) -> torch.Tensor:
        """No-grad decoder over query chunks (see ``forward``) -> last layer ``[B, Nq, D]`` in curve order."""
        b, c = qpos.shape[0], self.cluster_size
        itemsize = 8 if self.query_token.dtype == torch.float64 else 4
        queries = Clusters.from_sorted(qpos, c)
        self_idx, self_valid = nearest_members(queries, queries, self.nearest_clusters, self.neighborhood)
        self_idx = self_idx.to(torch.int32)  # relative positions: per chunk (`_self_rows`)
        neighbors = max(self_idx.shape[-1], self.cross_clusters * c)
        chunk = attention_chunk(self.layers[0].self_attn, b, neighbors, self.self_bias.mlp.fc1.out_features,
                                itemsize, budget, c)
        q = self._initial_queries(qpos, order, canvas, init, chunk)
        for i, (layer, stage) in enumerate(zip(self.layers, reversed(stages))):
            k, v = layer.cross.keys_values(stage.tokens, self.key_proj[i], chunk)

            def cross_rows(s: int, e: int, stage: StageOutput = stage) -> Neighborhood:
                return build_neighborhood(queries, stage.clusters, self.cross_clusters, self.neighborhood, s, e)

            def cross_bias(nb: Neighborhood, i: int = i, scale: float = stage.scale) -> torch.Tensor:
                return self.cross_bias[i](relative_features(nb.rel, scale))[0]

            residual_attention_in_chunks(layer.cross, layer.norm_cross, q, k, v, cross_rows, cross_bias, chunk)
            del k, v
            k, v = layer.self_attn.keys_values(q, layer.norm_self, chunk)  # from every query before the update

            def self_rows(s: int, e: int) -> Neighborhood:
                rows = slice(s // c, -(-e // c)) if self.neighborhood == "cluster" else slice(s, e)
                idx = self_idx[:, rows]
                rel = relative_positions(queries, queries, idx, self.neighborhood, s, e)
                return Neighborhood(idx, self_valid[:, rows], rel, self.neighborhood, c)

            def self_bias(nb: Neighborhood, i: int = i) -> torch.Tensor:
                return self.self_bias.layer_bias(relative_features(nb.rel, QUERY_SCALE), i)

            residual_attention_in_chunks(layer.self_attn, layer.norm_self, q, k, v, self_rows, self_bias, chunk)
            del k, v
            residual_mlp_in_chunks(layer.mlp, layer.norm_mlp, q, budget)
        return q
