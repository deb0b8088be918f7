"""Pure-PyTorch reference ops: gather + softmax.

They run on every device (CPU, MPS, CUDA) and are the test oracle of the Triton kernels.
`neighborhood_attention` processes queries in chunks with its own backward (flash-attention
style: saves the inputs and the per-row log-sum-exp, recomputes each chunk's gather and
softmax), so memory stays bounded; `_unchunked_neighborhood_attention` is the same maths with
plain autograd over whole tensors, kept as the oracle of the chunked one. Shapes (B batch, H heads, Nq queries, Nk keys, M
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


#: Default memory budget of one query chunk: bytes of one gathered neighbour tensor
#: ``[B, H, n, M, D]`` (a chunk holds about four of them at once in the backward).
DEFAULT_CHUNK_BYTES = 16 * 2**20


def _unchunked_neighborhood_attention(
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
    """Whole-tensor gather + softmax with plain autograd (test oracle of the chunked version).

    Materialises ``[B, H, Nq, M, D]`` neighbour tensors and keeps them for the backward.
    """
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


def default_chunk_size(q: torch.Tensor, num_neighbors: int, cluster: int = 1,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Queries per chunk so that one gathered ``[B, H, n, M, D]`` tensor (fp32/fp64) fits ``chunk_bytes``.

    Rounded down to a multiple of ``cluster`` (at least one cluster).
    """
    b, h, _, d = q.shape
    itemsize = 8 if q.dtype == torch.float64 else 4
    per_query = max(1, b * h * num_neighbors * d * itemsize)
    size = max(1, chunk_bytes // per_query)
    return max(cluster, size // cluster * cluster)


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise outer products a ``[B, H, n, M]`` x b ``[B, H, n, D]`` -> ``[B*H*n*M, D]`` (one bmm)."""
    m, d = a.shape[-1], b.shape[-1]
    return torch.bmm(a.reshape(-1, m, 1), b.reshape(-1, 1, d)).reshape(-1, d)


class _Problem:
    """One attention call, sliced into query chunks ``[start, stop)`` (multiples of the cluster size)."""

    def __init__(self, q, k, v, idx, bias, valid, blank_k, blank_v, scale: float, chunk: int) -> None:
        self.b, self.h, self.nq, self.d = q.shape
        self.nk = k.shape[2]
        self.m = idx.shape[-1]
        self.cluster = self.nq // idx.shape[1]  # 1 in token mode
        self.compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.q, self.k, self.v = q, k.to(self.compute), v.to(self.compute)  # k, v: [B, H, Nk, D]
        self.idx, self.bias, self.valid = idx, bias, valid
        self.blank_k = None if blank_k is None else blank_k.to(self.compute)  # [H, D]
        self.blank_v = None if blank_v is None else blank_v.to(self.compute)  # [H, D]
        self.scale = scale
        self.chunk = max(self.cluster, chunk // self.cluster * self.cluster)
        # row offset of every (b, h) block in the flattened [B*H*Nk, D] keys
        self.offsets = torch.arange(self.b * self.h, device=idx.device).reshape(self.b, self.h, 1, 1) * self.nk

    def chunks(self) -> range:
        return range(0, self.nq, self.chunk)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-query idx ``[B, n, M]`` int64 and valid ``[B, n, M]`` of queries ``[start, stop)``."""
        c = self.cluster
        idx = self.idx[:, start // c: stop // c].long()
        valid = None if self.valid is None else self.valid[:, start // c: stop // c]
        if c > 1:
            idx = idx.repeat_interleave(c, dim=1)
            valid = None if valid is None else valid.repeat_interleave(c, dim=1)
        return idx, valid

    def flat_index(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B, n, M]`` -> row indices ``[B*H*n*M]`` into the flattened ``[B*H*Nk, D]`` keys."""
        return (idx[:, None] + self.offsets).reshape(-1)

    def logits(self, start: int, stop: int):
        """Recomputable part of a chunk: (qc, flat index, k_nb, v_nb, logits ``[B, H, n, M(+1)]``, keep)."""
        n = stop - start
        idx, valid = self.rows(start, stop)
        flat = self.flat_index(idx)
        qc = self.q[:, :, start:stop].to(self.compute)  # [B, H, n, D]
        k_nb = self.k.reshape(-1, self.d).index_select(0, flat).reshape(self.b, self.h, n, self.m, self.d)
        v_nb = self.v.reshape(-1, self.d).index_select(0, flat).reshape(self.b, self.h, n, self.m, self.d)
        logits = torch.einsum("bhqd,bhqmd->bhqm", qc, k_nb) * self.scale  # [B, H, n, M]
        if self.bias is not None:
            logits = logits + self.bias[:, :, start:stop].to(self.compute)
        keep = None  # [B, 1, n, M(+1)] float, None = all kept
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None], NEG_SENTINEL)
            keep = valid[:, None].to(self.compute)
        if self.blank_k is not None:
            blank_logit = torch.einsum("bhqd,hd->bhq", qc, self.blank_k) * self.scale  # [B, H, n]
            logits = torch.cat([logits, blank_logit[..., None]], dim=-1)  # [B, H, n, M+1]
            if keep is not None:
                keep = torch.cat([keep, torch.ones_like(keep[..., :1])], dim=-1)
        return qc, flat, k_nb, v_nb, logits, keep

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> out ``[B, H, Nq, D]`` (compute dtype), lse ``[B, H, Nq]`` (0 on rows with nothing to attend)."""
        out = self.q.new_empty(self.b, self.h, self.nq, self.d, dtype=self.compute)
        lse = self.q.new_empty(self.b, self.h, self.nq, dtype=self.compute)
        m = self.m
        for start in self.chunks():
            stop = min(start + self.chunk, self.nq)
            _, _, k_nb, v_nb, logits, keep = self.logits(start, stop)
            del k_nb
            row_max = logits.amax(dim=-1, keepdim=True)  # [B, H, n, 1]
            p = torch.exp(logits - row_max)
            if keep is not None:
                p = p * keep
            denom = p.sum(dim=-1, keepdim=True)
            nonempty = denom > 0
            p = p / torch.where(nonempty, denom, torch.ones_like(denom))
            o = torch.einsum("bhqm,bhqmd->bhqd", p[..., :m], v_nb)  # [B, H, n, D]
            if self.blank_v is not None:
                o = o + p[..., m:] * self.blank_v[None, :, None, :]
            out[:, :, start:stop] = o
            row_lse = torch.where(nonempty, row_max + torch.log(torch.where(nonempty, denom, torch.ones_like(denom))),
                                  torch.zeros_like(denom))
            lse[:, :, start:stop] = row_lse[..., 0]
        return out, lse

    def backward(self, grad_out: torch.Tensor, lse: torch.Tensor, need: tuple[bool, ...]):
        """Gradients (dq, dk, dv, dbias, dblank_k, dblank_v) in the compute dtype (None where not needed).

        Per chunk: recompute the gathered K/V, logits and ``p = exp(logits - lse) * keep``; then
        ``ds = p * (dp - sum(p * dp))`` with ``dp = dout . v`` (softmax backward), and scatter the
        neighbour gradients into dk/dv with one row-wise ``index_add_`` each. The products are
        those of the FLOP convention of `napari_affmae.bench.flops`: twice the forward's
        (the blank value's terms element-wise, as in the forward) plus the recomputed QK^T.
        """
        need_q, need_k, need_v, need_bias, need_bk, need_bv = need
        b, h, nq, d, m = self.b, self.h, self.nq, self.d, self.m
        dq = torch.zeros(b, h, nq, d, dtype=self.compute, device=grad_out.device) if need_q else None
        dk = torch.zeros(b * h * self.nk, d, dtype=self.compute, device=grad_out.device) if need_k else None
        dv = torch.zeros(b * h * self.nk, d, dtype=self.compute, device=grad_out.device) if need_v else None
        dbias = torch.zeros(b, h, nq, m, dtype=self.compute, device=grad_out.device) if need_bias else None
        dbk = torch.zeros(h, d, dtype=self.compute, device=grad_out.device) if need_bk else None
        dbv = torch.zeros(h, d, dtype=self.compute, device=grad_out.device) if need_bv else None
        for start in self.chunks():
            stop = min(start + self.chunk, nq)
            qc, flat, k_nb, v_nb, logits, keep = self.logits(start, stop)
            p = torch.exp(logits - lse[:, :, start:stop, None])  # [B, H, n, M(+1)]
            if keep is not None:
                p = p * keep
            del logits
            go = grad_out[:, :, start:stop].to(self.compute)  # [B, H, n, D]
            dp = torch.einsum("bhqd,bhqmd->bhqm", go, v_nb)  # [B, H, n, M]
            if self.blank_v is not None:  # the blank value enters element-wise, as in the forward
                dp = torch.cat([dp, (go * self.blank_v[None, :, None, :]).sum(-1, keepdim=True)], dim=-1)
            ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))  # d loss / d logits, [B, H, n, M(+1)]
            del dp
            if dv is not None:
                dv.index_add_(0, flat, _outer(p[..., :m], go))
            if dbv is not None:
                dbv += (p[..., m:] * go).sum(dim=(0, 2))
            del v_nb
            if dbias is not None:
                dbias[:, :, start:stop] = ds[..., :m]
            ds = ds * self.scale
            if dq is not None:
                dqc = torch.einsum("bhqm,bhqmd->bhqd", ds[..., :m], k_nb)
                if self.blank_k is not None:
                    dqc = dqc + torch.matmul(ds[..., m:], self.blank_k[None, :, None, :])  # [B, H, n, D]
                dq[:, :, start:stop] = dqc
            del k_nb
            if dk is not None:
                dk.index_add_(0, flat, _outer(ds[..., :m], qc))
            if dbk is not None:
                dbk += torch.einsum("bhq,bhqd->hd", ds[..., m], qc)
        dk = None if dk is None else dk.reshape(b, h, self.nk, d)
        dv = None if dv is None else dv.reshape(b, h, self.nk, d)
        return dq, dk, dv, dbias, dbk, dbv


def _attention_chunk(q: torch.Tensor, idx: torch.Tensor, chunk_size: int | None) -> int:
    """Queries per chunk: ``chunk_size`` or `default_chunk_size` (whole clusters in cluster mode)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of queries; got {chunk_size}")
        return chunk_size
    return default_chunk_size(q, idx.shape[-1], q.shape[2] // idx.shape[1])


def attention_forward(q, k, v, idx, bias, valid, blank_k, blank_v, scale: float,
                      chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked forward without autograd: -> out ``[B, H, Nq, D]`` (q's dtype), lse ``[B, H, Nq]``
    (float32, float64 for float64 inputs; 0 on rows with nothing to attend)."""
    problem = _Problem(q, k, v, idx, bias, valid, blank_k, blank_v, scale, _attention_chunk(q, idx, chunk_size))
    out, lse = problem.forward()
    return out.to(q.dtype), lse


def attention_backward(grad_out, q, k, v, idx, bias, valid, blank_k, blank_v, lse, scale: float,
                       need: tuple[bool, ...], chunk_size: int | None = None) -> tuple[torch.Tensor | None, ...]:
    """Chunked backward from the saved lse: -> (dq, dk, dv, dbias, dblank_k, dblank_v) in the
    dtypes of their inputs, None where ``need`` (same order) is False."""
    problem = _Problem(q, k, v, idx, bias, valid, blank_k, blank_v, scale, _attention_chunk(q, idx, chunk_size))
    grads = problem.backward(grad_out, lse, tuple(need))
    like = (q, k, v, bias, blank_k, blank_v)
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, like))


class _ChunkedAttention(torch.autograd.Function):
    """Autograd of the chunked reference: saves only the inputs and the per-row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, idx, bias, valid, blank_k, blank_v, scale: float, chunk: int):
        out, lse = attention_forward(q, k, v, idx, bias, valid, blank_k, blank_v, scale, chunk)
        ctx.save_for_backward(q, k, v, idx, bias, valid, blank_k, blank_v, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, idx, bias, valid, blank_k, blank_v, lse = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                ctx.needs_input_grad[4], ctx.needs_input_grad[6], ctx.needs_input_grad[7])
        dq, dk, dv, dbias, dbk, dbv = attention_backward(grad_out, q, k, v, idx, bias, valid, blank_k, blank_v, lse,
                                                         ctx.scale, need, ctx.chunk)
        return dq, dk, dv, None, dbias, None, dbk, dbv, None, None


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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over its M neighbours. Returns ``[B, H, Nq, D]``.

    Queries run in chunks of ``chunk_size`` (default: `default_chunk_size`, one gathered
    ``[B, H, n, M, D]`` tensor within `DEFAULT_CHUNK_BYTES`; rounded to whole clusters in
    cluster mode), so no ``[B, H, Nq, M, D]`` tensor ever exists whole. The backward saves only
    the inputs and the per-row log-sum-exp ``[B, H, Nq]`` and recomputes each chunk's gather and
    softmax (flash-attention style); the maths is that of `_unchunked_neighborhood_attention`.
    """
    check_attention_inputs(q, k, v, idx, bias, valid, blank_k, blank_v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chunk = _attention_chunk(q, idx, chunk_size)
    tensors = (q, k, v, bias, blank_k, blank_v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ChunkedAttention.apply(q, k, v, idx, bias, valid, blank_k, blank_v, scale, chunk)
    return attention_forward(q, k, v, idx, bias, valid, blank_k, blank_v, scale, chunk)[0]


def check_merge_inputs(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor) -> None:
    """Raise ValueError when weights ``[B, N', M, G]``, feat ``[B, N, C]``, idx ``[B, N', M]`` do not fit."""
    if weights.dim() != 4 or feat.dim() != 3 or idx.dim() != 3:
        raise ValueError(
            f"weighted_merge expects weights [B,N',M,G], feat [B,N,C], idx [B,N',M]; got "
            f"{tuple(weights.shape)}, {tuple(feat.shape)}, {tuple(idx.shape)}"
        )
    b, n_out, m, _ = weights.shape
    if tuple(idx.shape) != (b, n_out, m) or feat.shape[0] != b:
        raise ValueError(f"idx must be [B, N', M] = {(b, n_out, m)} and feat [B={b}, N, C]; got {tuple(idx.shape)}, {tuple(feat.shape)}")


def _unchunked_weighted_merge(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Whole-tensor gather + einsum with plain autograd (test oracle of `weighted_merge`)."""
    check_merge_inputs(weights, feat, idx)
    b, n_out, m, _ = weights.shape
    c = feat.shape[-1]
    gathered = torch.gather(feat, 1, idx.long().reshape(b, n_out * m, 1).expand(b, n_out * m, c))
    gathered = gathered.reshape(b, n_out, m, c)  # [B, N', M, C]
    return torch.einsum("bnmg,bnmc->bngc", weights.to(feat.dtype), gathered)


def _merge_rows(feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row indices ``[B*n*M]`` of ``idx [B, n, M]`` into the flattened ``feat [B*N, C]``."""
    b, n = feat.shape[:2]
    return (idx.long() + torch.arange(b, device=idx.device).reshape(b, 1, 1) * n).reshape(-1)


def _merge_forward(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunked forward of `weighted_merge` (no autograd): -> ``[B, N', G, C]``."""
    b, n_out, m, g = weights.shape
    c = feat.shape[-1]
    rows = feat.reshape(-1, c)  # [B*N, C]
    out = feat.new_empty(b, n_out, g, c)  # [B, N', G, C]
    for s in range(0, n_out, chunk):
        gathered = rows.index_select(0, _merge_rows(feat, idx[:, s:s + chunk]))
        gathered = gathered.reshape(b, -1, m, c)  # [B, n, M, C]
        out[:, s:s + chunk] = torch.einsum("bnmg,bnmc->bngc", weights[:, s:s + chunk], gathered)
    return out


def _merge_backward(grad_out, weights, feat, idx, need_w: bool, need_f: bool, chunk: int):
    """Chunked backward of `_merge_forward` (weights already in feat's dtype): -> (dw, dfeat) or None."""
    b, n_out, m, g = weights.shape
    c = feat.shape[-1]
    rows = feat.reshape(-1, c)  # [B*N, C]
    dw = torch.empty_like(weights) if need_w else None
    dfeat = torch.zeros_like(rows) if need_f else None  # [B*N, C]
    for s in range(0, n_out, chunk):
        flat = _merge_rows(feat, idx[:, s:s + chunk])
        go = grad_out[:, s:s + chunk]  # [B, n, G, C]
        if dw is not None:
            gathered = rows.index_select(0, flat).reshape(b, -1, m, c)  # [B, n, M, C]
            dw[:, s:s + chunk] = torch.einsum("bngc,bnmc->bnmg", go, gathered)
            del gathered
        if dfeat is not None:
            dgathered = torch.einsum("bnmg,bngc->bnmc", weights[:, s:s + chunk], go)
            dfeat.index_add_(0, flat, dgathered.reshape(-1, c))
    return dw, None if dfeat is None else dfeat.reshape(feat.shape)


class _ChunkedMerge(torch.autograd.Function):
    """Weighted merge over chunks of output rows; saves weights, feat, idx; regathers in backward."""

    @staticmethod
    def forward(ctx, weights, feat, idx, chunk: int):
        out = _merge_forward(weights, feat, idx, chunk)
        ctx.save_for_backward(weights, feat, idx)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weights, feat, idx = ctx.saved_tensors
        dw, dfeat = _merge_backward(grad_out, weights, feat, idx, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                    ctx.chunk)
        return dw, dfeat, None, None


def _merge_chunk(weights: torch.Tensor, feat: torch.Tensor, chunk_size: int | None) -> int:
    """Output rows per chunk: ``chunk_size`` or the gathered ``[B, n, M, C]`` within `DEFAULT_CHUNK_BYTES`."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows; got {chunk_size}")
        return chunk_size
    b, _, m, _ = weights.shape
    return max(1, DEFAULT_CHUNK_BYTES // max(1, b * m * feat.shape[-1] * feat.element_size()))


def merge_forward(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor,
                  chunk_size: int | None = None) -> torch.Tensor:
    """Forward of `weighted_merge` without autograd: -> ``[B, N', G, C]`` in feat's dtype."""
    return _merge_forward(weights.to(feat.dtype), feat, idx, _merge_chunk(weights, feat, chunk_size))


def merge_backward(grad_out: torch.Tensor, weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor,
                   need_weights: bool, need_feat: bool, chunk_size: int | None = None):
    """Backward of `weighted_merge`: -> (dweights in weights' dtype, dfeat), None where not needed."""
    dw, dfeat = _merge_backward(grad_out.to(feat.dtype), weights.to(feat.dtype), feat, idx, need_weights, need_feat,
                                _merge_chunk(weights, feat, chunk_size))
    return None if dw is None else dw.to(weights.dtype), dfeat


def weighted_merge(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor,
                   chunk_size: int | None = None) -> torch.Tensor:
    """``out[b, n, g] = sum_m weights[b, n, m, g] * feat[b, idx[b, n, m]]``.

    weights ``[B, N', M, G]``, feat ``[B, N, C]``, idx ``[B, N', M]`` -> ``[B, N', G, C]``.
    Output rows run in chunks of ``chunk_size`` (default: the gathered ``[B, n, M, C]`` within
    `DEFAULT_CHUNK_BYTES`); the backward regathers instead of keeping ``[B, N', M, C]``.
    """
    check_merge_inputs(weights, feat, idx)
    chunk = _merge_chunk(weights, feat, chunk_size)
    w = weights.to(feat.dtype)
    if torch.is_grad_enabled() and (w.requires_grad or feat.requires_grad):
        return _ChunkedMerge.apply(w, feat, idx, chunk)
    return _merge_forward(w, feat, idx, chunk)


def check_knn_inputs(query_pos: torch.Tensor, centroid_pos: torch.Tensor, k: int) -> None:
    """Raise ValueError unless positions are ``[B, N, P]`` alike and ``1 <= k <= Nc``."""
    if query_pos.dim() != 3 or centroid_pos.dim() != 3 or query_pos.shape[-1] != centroid_pos.shape[-1]:
        raise ValueError(f"positions must be [B, N, 2]; got {tuple(query_pos.shape)} and {tuple(centroid_pos.shape)}")
    nc = centroid_pos.shape[1]
    if not 1 <= k <= nc:
        raise ValueError(f"k={k} must be between 1 and the number of centroids {nc}")


def knn_centroids(
    query_pos: torch.Tensor,
    centroid_pos: torch.Tensor,
    k: int,
    centroid_valid: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Indices of the k nearest centroids per query, nearest first.

    query_pos ``[B, Nq, 2]``, centroid_pos ``[B, Nc, 2]`` (float, any unit), centroid_valid
    ``[B, Nc]`` bool -> int64 ``[B, Nq, k]``. Ties break towards the lower centroid index.
    Queries are processed in chunks of ``chunk`` so memory stays ``O(chunk * Nc)``; default: as
    many as keep the chunk's distance/sort temporaries (about 32 bytes per query-centroid pair)
    within `DEFAULT_CHUNK_BYTES`.
    """
    check_knn_inputs(query_pos, centroid_pos, k)
    nc = centroid_pos.shape[1]
    if chunk is None:
        chunk = max(1, DEFAULT_CHUNK_BYTES // (32 * query_pos.shape[0] * nc))
    elif chunk < 1:
        raise ValueError(f"chunk must be a positive number of queries; got {chunk}")
    qp = query_pos.float()
    cp = centroid_pos.float()
    out = []
    for start in range(0, qp.shape[1], chunk):
        d2 = ((qp[:, start:start + chunk, None, :] - cp[:, None, :, :]) ** 2).sum(-1)  # [B, n, Nc]
        if centroid_valid is not None:
            d2 = d2.masked_fill(~centroid_valid[:, None, :], float("inf"))
        # stable sort keeps the lower index first among equal distances; copy the k columns out, or the
        # slice would keep every chunk's whole [B, n, Nc] int64 sort result alive until the cat
        out.append(torch.sort(d2, dim=-1, stable=True).indices[..., :k].contiguous())
    return torch.cat(out, dim=1)
