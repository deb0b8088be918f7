"""Balanced clustering of off-grid tokens and the neighbourhoods built from it.

Tokens carry integer lattice positions ``pos [B, N, 2]`` (y, x). A stage orders its tokens along
a Hilbert curve; consecutive runs of ``c`` tokens form the clusters (the last one may be short).
A token's neighbourhood is the members of its ``k`` nearest cluster centroids: ``M = k * c``
neighbour indices plus a validity mask for the short last cluster.

Two modes share this structure:

* ``"token"``: every query finds its own nearest centroids -> ``idx [B, Nq, M]``.
* ``"cluster"``: the queries of one cluster share the neighbourhood of their centroid ->
  ``idx [B, ceil(Nq / c), M]``; attention pads the queries to a multiple of ``c``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from affmae_kernels import knn_centroids

NEIGHBORHOOD_MODES = ("token", "cluster")


def hilbert_key(pos: torch.Tensor) -> torch.Tensor:
    """Index along a Hilbert curve of integer positions ``[..., 2]`` (y, x) -> int64 ``[...]``."""
    y = pos[..., 0].long().clone()
    x = pos[..., 1].long().clone()
    top = int(torch.maximum(x.max(), y.max())) if pos.numel() else 0
    n = 1
    while n <= top:
        n *= 2
    key = torch.zeros_like(x)
    s = n // 2
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        key += s * s * ((3 * rx.long()) ^ ry.long())
        # rotate the quadrant so the curve stays continuous
        flip = (~ry) & rx
        x = torch.where(flip, s - 1 - x, x)
        y = torch.where(flip, s - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s //= 2
    return key


def curve_order(pos: torch.Tensor) -> torch.Tensor:
    """Permutation ``[B, N]`` that sorts each sample's tokens along the Hilbert curve."""
    return torch.sort(hilbert_key(pos), dim=1, stable=True).indices


def gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``t [B, N, ...]`` at ``index [B, K]`` -> ``[B, K, ...]``."""
    shape = index.shape + t.shape[2:]
    flat = index.reshape(index.shape[0], -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return torch.gather(t, 1, flat).reshape(shape)


@dataclass
class Clusters:
    """Tokens already in curve order, cut into clusters of ``size``.

    pos ``[B, N, 2]`` float lattice positions; centroids ``[B, nc, 2]`` with
    ``nc = ceil(N / size)``.
    """

    pos: torch.Tensor
    size: int
    centroids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.pos.shape[1]

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @classmethod
    def from_sorted(cls, pos: torch.Tensor, size: int = 8) -> "Clusters":
        b, n, _ = pos.shape
        nc = -(-n // size)
        padded = torch.zeros(b, nc * size, 2, dtype=torch.float32, device=pos.device)
        padded[:, :n] = pos.float()
        count = torch.zeros(nc * size, device=pos.device)
        count[:n] = 1
        sums = padded.reshape(b, nc, size, 2).sum(2)  # [B, nc, 2]
        centroids = sums / count.reshape(nc, size).sum(1)[None, :, None]
        return cls(pos=pos.float(), size=size, centroids=centroids)

    def members(self, cluster_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices of clusters ``[..., k]`` -> (idx ``[..., k * size]`` int64, valid bool)."""
        offs = torch.arange(self.size, device=cluster_idx.device)
        idx = (cluster_idx[..., None] * self.size + offs).flatten(-2)
        valid = idx < self.num_tokens
        return idx.clamp(max=self.num_tokens - 1), valid


@dataclass
class Neighborhood:
    """Neighbour lists of queries into keys (self- or cross-attention, or merging).

    idx / valid: ``[B, Nq, M]`` (token mode) or ``[B, ceil(Nq/c), M]`` (cluster mode).
    rel: ``[B, Nq, M, 2]`` neighbour position minus query position, lattice units.
    """

    idx: torch.Tensor
    valid: torch.Tensor
    rel: torch.Tensor
    mode: str
    query_cluster_size: int

    @property
    def num_queries(self) -> int:
        return self.rel.shape[1]

    @property
    def padded_queries(self) -> int:
        """Query count the attention kernel sees (a multiple of the cluster size in cluster mode)."""
        return self.idx.shape[1] * self.query_cluster_size if self.mode == "cluster" else self.num_queries

    def query_rows(self, start: int, stop: int) -> "Neighborhood":
        """The neighbourhoods of queries ``[start, stop)`` (views; ``start`` a multiple of the query cluster size
        in cluster mode)."""
        rows = slice(start, stop)
        if self.mode == "cluster":
            c = self.query_cluster_size
            if start % c:
                raise ValueError(f"cluster mode: query rows must start at a multiple of {c}; got {start}")
            rows = slice(start // c, -(-stop // c))
        return Neighborhood(idx=self.idx[:, rows], valid=self.valid[:, rows], rel=self.rel[:, start:stop],
                            mode=self.mode, query_cluster_size=self.query_cluster_size)

    def rows_for(self, query_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx/valid rows (``[B, K, M]``) of selected queries ``query_index [B, K]``."""
        rows = query_index // self.query_cluster_size if self.mode == "cluster" else query_index
        return gather_tokens(self.idx, rows), gather_tokens(self.valid, rows)


def nearest_members(queries: Clusters, keys: Clusters, k: int, mode: str = "token", start: int = 0,
                    stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Members of the ``k`` nearest key clusters of queries ``[start, stop)`` -> (idx int64, valid bool), each
    ``[B, n, M]`` (token mode) or ``[B, ceil(n / c), M]`` (cluster mode: one row per query cluster)."""
    if mode not in NEIGHBORHOOD_MODES:
        raise ValueError(f"unknown neighbourhood mode {mode!r}; use one of {NEIGHBORHOOD_MODES}")
    stop = queries.num_tokens if stop is None else min(stop, queries.num_tokens)
    k = min(k, keys.num_clusters)
    if mode == "token":
        source = queries.pos[:, start:stop]
    else:
        if start % queries.size:
            raise ValueError(f"cluster mode: query rows must start at a multiple of {queries.size}; got {start}")
        source = queries.centroids[:, start // queries.size: -(-stop // queries.size)]
    nearest = knn_centroids(source, keys.centroids, k)  # [B, Nq or nqc, k]
    return keys.members(nearest)  # [B, Nq or nqc, M]


def relative_positions(queries: Clusters, keys: Clusters, idx: torch.Tensor, mode: str, start: int = 0,
                       stop: int | None = None) -> torch.Tensor:
    """Neighbour minus query position ``[B, n, M, 2]`` of queries ``[start, stop)`` whose neighbour rows are idx
    (``[B, n, M]``, or one row per query cluster in cluster mode)."""
    stop = queries.num_tokens if stop is None else min(stop, queries.num_tokens)
    per_query = idx.long()
    if mode == "cluster":
        per_query = per_query.repeat_interleave(queries.size, dim=1)[:, : stop - start]
    b, nq, m = per_query.shape
    neighbour_pos = gather_tokens(keys.pos, per_query.reshape(b, nq * m)).reshape(b, nq, m, 2)
    return neighbour_pos - queries.pos[:, start:stop, None, :]  # [B, Nq, M, 2]


def build_neighborhood(queries: Clusters, keys: Clusters, k: int, mode: str = "token", start: int = 0,
                       stop: int | None = None) -> Neighborhood:
    """Neighbourhoods of ``queries`` = members of their ``k`` nearest key-cluster centroids.

    ``start``/``stop``: only the queries in ``[start, stop)`` (``start`` a multiple of the cluster size in
    cluster mode), as rows of the whole result would be; the default is every query."""
    idx, valid = nearest_members(queries, keys, k, mode, start, stop)
    rel = relative_positions(queries, keys, idx, mode, start, stop)
    return Neighborhood(idx=idx.to(torch.int32), valid=valid, rel=rel, mode=mode, query_cluster_size=queries.size)


def relative_features(rel: torch.Tensor, scale: float) -> torch.Tensor:
    """(dy, dx, |d|, dy/|d|, dx/|d|) of relative positions ``[..., 2]`` -> ``[..., 5]``; zeros at d = 0.

    ``scale`` (lattice units) brings distances of a stage to order one.
    """
    d = rel / scale
    norm = d.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, d / norm.clamp_min(1.0e-12), torch.zeros_like(d))
    return torch.cat([d, norm, unit], dim=-1)
