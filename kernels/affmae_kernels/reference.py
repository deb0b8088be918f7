"""Pure-PyTorch reference ops: gather + softmax.

They run on every device (CPU, MPS, CUDA), carry autograd through plain PyTorch, and are the
test oracle of the Triton kernels. Shapes (B batch, H heads, Nq queries, Nk keys, M
neighbours per query, D head dim, c cluster size):

* ``idx`` is ``[B, Nq, M]`` (per-token neighbourhoods) or ``[B, Nq // c, M]`` (cluster mode:
  the ``c`` consecutive queries of a cluster share one neighbourhood).
* ``valid`` has the same leading shape as ``idx``; ``False`` marks a padded neighbour.
* ``bias`` is always per query: ``[B, H, Nq, M]``.

Softmax convention: invalid neighbours get probability exactly 0; the optional blank
key/value (``[H, D]``) is one more candidate every query may attend to, without bias. A row
with no valid neighbour and no blank token returns zeros.
"""
from __future__ import annotations

import math

import torch

#: Finite stand-in for -inf in masked logits (keeps exp() and max() NaN-free).
NEG_SENTINEL = -1.0e30


def expand_cluster_index(idx: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Per-cluster ``[B, Nq/c, M]`` -> per-query ``[B, Nq, M]`` (identity if already per query)."""
    groups = idx.shape[1]
    if groups == num_queries:
        return idx
    if groups == 0 or num_queries % groups:
        raise ValueError(
            f"idx has {groups} rows for {num_queries} queries: expected one row per query or "
            "one per cluster of equal size (Nq must be a multiple of the cluster count)"
        )
    return idx.repeat_interleave(num_queries // groups, dim=1)


def check_attention_inputs(q, k, v, idx, bias, valid, blank_k, blank_v) -> None:
    """Raise ValueError with a readable message when shapes or dtypes do not fit."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, nq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k and v must be [B={b}, H={h}, Nk, D={d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if idx.dim() != 3 or idx.shape[0] != b or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be an int32/int64 tensor [B={b}, Nq or Nq/c, M]; got {idx.dtype} {tuple(idx.shape)}")
    groups, m = idx.shape[1], idx.shape[2]
    if groups != nq and (groups == 0 or nq % groups):
        raise ValueError(f"idx has {groups} rows, which is neither Nq={nq} nor a divisor of it (cluster mode)")
    if bias is not None and tuple(bias.shape) != (b, h, nq, m):
        raise ValueError(f"bias must be [B, H, Nq, M] = {(b, h, nq, m)}; got {tuple(bias.shape)}")
    if valid is not None and (tuple(valid.shape) != tuple(idx.shape) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor shaped like idx {tuple(idx.shape)}; got {valid.dtype} {tuple(valid.shape)}")
    if (blank_k is None) != (blank_v is None):
        raise ValueError("blank_k and blank_v must be given together")
    if blank_k is not None and (tuple(blank_k.shape) != (h, d) or tuple(blank_v.shape) != (h, d)):
        raise ValueError(f"blank_k and blank_v must be [H, D] = {(h, d)}; got {tuple(blank_k.shape)}, {tuple(blank_v.shape)}")


def check_index_range(idx: torch.Tensor, num_keys: int) -> None:
    """Debug check: every neighbour index lies in [0, num_keys)."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_keys):
        raise ValueError(f"idx holds values outside [0, {num_keys}): min {int(idx.min())}, max {int(idx.max())}")


def gather_neighbors(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t ``[B, H, Nk, D]``, idx ``[B, Nq, M]`` -> ``[B, H, Nq, M, D]``.

    Gathers whole D-rows with one ``index_select`` (its backward is a row-wise ``index_add``),
    several times faster on CPU than an element-wise ``gather`` with an expanded index.
    """
    b, h, nk, d = t.shape
    nq, m = idx.shape[1], idx.shape[2]
    rows = t.reshape(b * h * nk, d)  # [B*H*Nk, D]
    offsets = torch.arange(b * h, device=idx.device).reshape(b, h, 1, 1) * nk
    flat = (idx.long()[:, None] + offsets).reshape(-1)  # [B*H*Nq*M]
    return rows.index_select(0, flat).reshape(b, h, nq, m, d)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    bias: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    blank_k: torch.Tensor | None = None,
    blank_v: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over its M neighbours. Returns ``[B, H, Nq, D]``."""
    check_attention_inputs(q, k, v, idx, bias, valid, blank_k, blank_v)
    b, h, nq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    idx = expand_cluster_index(idx, nq)
    if valid is not None:
        valid = expand_cluster_index(valid, nq)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(compute)
    k_nb = gather_neighbors(k.to(compute), idx)  # [B, H, Nq, M, D]
    v_nb = gather_neighbors(v.to(compute), idx)  # [B, H, Nq, M, D]
    logits = torch.einsum("bhqd,bhqmd->bhqm", qf, k_nb) * scale  # [B, H, Nq, M]
    if bias is not None:
        logits = logits + bias.to(compute)
    keep = None if valid is None else valid[:, None]  # [B, 1, Nq, M]
    if keep is not None:
        logits = logits.masked_fill(~keep, NEG_SENTINEL)
    if blank_k is not None:
        blank_logit = torch.einsum("bhqd,hd->bhq", qf, blank_k.to(compute)) * scale
        logits = torch.cat([logits, blank_logit[..., None]], dim=-1)  # [B, H, Nq, M+1]
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    p = torch.exp(logits - row_max)
    if keep is not None:
        pad = torch.ones_like(keep[..., :1]) if blank_k is not None else keep[..., :0]
        p = p * torch.cat([keep, pad], dim=-1).to(compute)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    m = idx.shape[-1]
    out = torch.einsum("bhqm,bhqmd->bhqd", p[..., :m], v_nb)
    if blank_v is not None:
        out = out + p[..., m:] * blank_v.to(compute)[None, :, None, :]
    return out.to(q.dtype)


def weighted_merge(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[b, n, g] = sum_m weights[b, n, m, g] * feat[b, idx[b, n, m]]``.

    weights ``[B, N', M, G]``, feat ``[B, N, C]``, idx ``[B, N', M]`` -> ``[B, N', G, C]``.
    """
    if weights.dim() != 4 or feat.dim() != 3 or idx.dim() != 3:
        raise ValueError(
            f"weighted_merge expects weights [B,N',M,G], feat [B,N,C], idx [B,N',M]; got "
            f"{tuple(weights.shape)}, {tuple(feat.shape)}, {tuple(idx.shape)}"
        )
    b, n_out, m, _ = weights.shape
    if tuple(idx.shape) != (b, n_out, m) or feat.shape[0] != b:
        raise ValueError(f"idx must be [B, N', M] = {(b, n_out, m)} and feat [B={b}, N, C]; got {tuple(idx.shape)}, {tuple(feat.shape)}")
    c = feat.shape[-1]
    gathered = torch.gather(feat, 1, idx.long().reshape(b, n_out * m, 1).expand(b, n_out * m, c))
    gathered = gathered.reshape(b, n_out, m, c)  # [B, N', M, C]
    return torch.einsum("bnmg,bnmc->bngc", weights.to(feat.dtype), gathered)


def knn_centroids(
    query_pos: torch.Tensor,
    centroid_pos: torch.Tensor,
    k: int,
    centroid_valid: torch.Tensor | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Indices of the k nearest centroids per query, nearest first.

    query_pos ``[B, Nq, 2]``, centroid_pos ``[B, Nc, 2]`` (float, any unit), centroid_valid
    ``[B, Nc]`` bool -> int64 ``[B, Nq, k]``. Ties break towards the lower centroid index.
    Queries are processed in chunks so memory stays ``O(chunk * Nc)``.
    """
    if query_pos.dim() != 3 or centroid_pos.dim() != 3 or query_pos.shape[-1] != centroid_pos.shape[-1]:
        raise ValueError(f"positions must be [B, N, 2]; got {tuple(query_pos.shape)} and {tuple(centroid_pos.shape)}")
    nc = centroid_pos.shape[1]
    if not 1 <= k <= nc:
        raise ValueError(f"k={k} must be between 1 and the number of centroids {nc}")
    qp = query_pos.float()
    cp = centroid_pos.float()
    out = []
    for start in range(0, qp.shape[1], chunk):
        d2 = ((qp[:, start:start + chunk, None, :] - cp[:, None, :, :]) ** 2).sum(-1)  # [B, n, Nc]
        if centroid_valid is not None:
            d2 = d2.masked_fill(~centroid_valid[:, None, :], float("inf"))
        # stable sort keeps the lower index first among equal distances
        out.append(torch.sort(d2, dim=-1, stable=True).indices[..., :k])
    return torch.cat(out, dim=1)
