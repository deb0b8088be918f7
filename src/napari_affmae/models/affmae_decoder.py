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
from .clustering import Clusters, build_neighborhood, curve_order, gather_tokens, relative_features
from .common import sincos_position_code
from .layers import Mlp, NeighborhoodAttention, RelativePositionBias

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
                query_init: torch.Tensor | None = None) -> list[torch.Tensor]:
        """query_pos ``[B, Nq, 2]`` lattice positions, canvas ``(h, w)``; query_init ``[B, Nq, D]`` optional."""
        order = curve_order(query_pos)  # queries in curve order for clustering
        inverse = torch.argsort(order, dim=1)
        qpos = gather_tokens(query_pos, order)
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
