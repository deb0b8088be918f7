"""FLOP formulas of the kernel ops (registered for ``torch.utils.flop_counter`` in `affmae_kernels.ops`).

Convention: one FLOP = one multiply or one add (a multiply-accumulate is 2 FLOPs); only products
are counted, not element-wise work (softmax, masking), sorting or gathers. ``B`` batch, ``H``
heads, ``Nq`` queries, ``M`` neighbours, ``D`` head dim, ``N'`` merge centres, ``G`` merge
groups, ``C`` channels, ``Nc`` centroids.

* neighbourhood attention: forward ``2 B H Nq D (M + 1)`` (QK^T over M neighbours and the blank
  key) ``+ 2 B H Nq M D`` (PV); the blank value enters by a scaled add (element-wise, not
  counted), so forward ~ ``4 B H Nq M D``. Backward = 2x the forward products + one recomputed
  QK^T (torch's dense-attention convention, and what the reference's chunked backward and the
  Triton kernel execute). In cluster mode ``Nq`` is the padded query count (whole clusters).
* weighted merge: forward ``2 B N' M G C``, backward 2x forward.
* k nearest centroids: ``B Nq Nc (3 d - 1)`` with ``d`` coordinates (d subtractions, d squares,
  d - 1 additions per query-centroid distance); the sort is not counted; no backward.
"""
from __future__ import annotations


def neighborhood_attention_flops(batch: int, heads: int, queries: int, neighbours: int, head_dim: int,
                                 blank: bool = True) -> tuple[int, int, int]:
    """(forward, backward, recomputed QK^T) FLOPs of one neighbourhood-attention call.

    ``backward`` includes the recomputation; ``recompute`` is the recomputed QK^T alone.
    """
    qk = 2 * batch * heads * queries * head_dim * (neighbours + int(blank))
    pv = 2 * batch * heads * queries * neighbours * head_dim
    return qk + pv, 2 * (qk + pv) + qk, qk


def weighted_merge_flops(batch: int, centres: int, neighbours: int, groups: int, channels: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``weighted_merge``: ``out[b,n,g,c] = sum_m w[b,n,m,g] f[b,idx,c]``."""
    forward = 2 * batch * centres * neighbours * groups * channels
    return forward, 2 * forward


def knn_flops(batch: int, queries: int, centroids: int, dims: int = 2) -> int:
    """FLOPs of the squared distances of a k-nearest-centroid search (the sort is not counted)."""
    return batch * queries * centroids * (3 * dims - 1)
