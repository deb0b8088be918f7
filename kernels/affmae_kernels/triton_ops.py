"""Triton-backed ops with the reference signatures, plus autograd.

`affmae_kernels.dispatch` looks up ``neighborhood_attention``, ``weighted_merge`` and
``knn_centroids`` here. Each takes the same arguments as its `affmae_kernels.reference`
twin, plus keyword-only switches:

* ``debug`` (default: env ``AFFMAE_KERNELS_DEBUG=1``): check every neighbour index lies in
  range (`reference.check_index_range`, one device sync) and allocate every kernel-written
  buffer filled with NaN (or -1) so elements a kernel forgot to write cannot pass unnoticed.
* ``dkdv`` for attention (default: env ``AFFMAE_KERNELS_DKDV``, else ``"atomic"``):
  ``"atomic"`` scatters dk/dv with fp32 atomics from the query-side backward kernel;
  ``"reverse"`` stores p and ds per (query, neighbour) and sums them per key through a
  key -> (query, slot) index (no atomics, deterministic). The default stays ``"atomic"`` until
  a GPU run says otherwise (docs/kernels.md).

On CPU the kernels only run under ``TRITON_INTERPRET=1`` set before this module is imported.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton

from . import reference
from . import triton_attention as _att
from . import triton_knn as _knn
from . import triton_merge as _merge

__all__ = ["neighborhood_attention", "weighted_merge", "knn_centroids", "DKDV_MODES", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
DKDV_MODES = ("atomic", "reverse")
#: dk/dv path when neither ``dkdv=`` nor AFFMAE_KERNELS_DKDV says: not yet measured on a GPU
#: (docs/kernels.md, "Owed"); switch it if the benchmark shows "reverse" is faster.
DEFAULT_DKDV = "atomic"
MAX_KNN_K = 16
_INT32_LIMIT = 2**31 - 1


def interpreted() -> bool:
    """True when the kernels of this process were built for the Triton CPU interpreter."""
    return bool(_att.INTERPRETED)


def _debug_enabled(debug: bool | None) -> bool:
    if debug is not None:
        return bool(debug)
    return os.environ.get("AFFMAE_KERNELS_DEBUG", "0").lower() not in ("", "0", "false", "no")


def _dkdv_mode(mode: str | None) -> str:
    choice = (mode or os.environ.get("AFFMAE_KERNELS_DKDV") or DEFAULT_DKDV).lower()
    if choice not in DKDV_MODES:
        raise ValueError(f"unknown dk/dv mode {choice!r}: use one of {DKDV_MODES}")
    return choice


def _alloc(shape, dtype, device, poison: bool) -> torch.Tensor:
    """Output buffer; under debug it starts as NaN (or -1 for integers) instead of garbage."""
    if not poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def _device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_device(name: str, t: torch.Tensor | None, device: torch.device) -> None:
    if t is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: put every input on one device")


#: Set by `affmae_kernels.compile_report`, whose launches only compile (host tensors are fine).
COMPILE_ONLY = False


def _check_runnable(t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter."""
    if not t.is_cuda and not interpreted() and not COMPILE_ONLY:
        raise ValueError(f"the Triton kernels got {t.device} tensors: they need CUDA tensors, or TRITON_INTERPRET=1 "
                         "set before Triton is first imported (CPU interpreter, for tests); otherwise use the "
                         "reference backend")


def _check_float(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16 "
                         "(use the reference backend for float64)")


def _check_attention(q, k, v, idx, bias, valid, blank_k, blank_v) -> None:
    """Reference shape checks plus what the kernels additionally need."""
    reference.check_attention_inputs(q, k, v, idx, bias, valid, blank_k, blank_v)
    _check_runnable(q)
    for name, t in (("q", q), ("bias", bias), ("blank_k", blank_k), ("blank_v", blank_v)):
        _check_float(name, t)
    for name, t in (("k", k), ("v", v), ("idx", idx), ("bias", bias), ("valid", valid),
                    ("blank_k", blank_k), ("blank_v", blank_v)):
        _check_device(name, t, q.device)
    d, m = q.shape[-1], idx.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the Triton kernels: use one of {SUPPORTED_HEAD_DIMS}")
    if m == 0 or m % 8:
        raise ValueError(f"the neighbourhood size M={m} must be a positive multiple of 8 (pad idx and mark "
                         "the padding invalid)")
    if k.shape[2] > _INT32_LIMIT or idx.numel() > _INT32_LIMIT:
        raise ValueError("too many keys or neighbour entries for int32 indexing")


def _as_index(idx: torch.Tensor) -> torch.Tensor:
    return idx.to(torch.int32).contiguous()


def _as_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    return None if valid is None else valid.contiguous().view(torch.uint8)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ----------------------------------------------------------------------------------------
# reverse index (atomic-free dk/dv), cached per idx tensor
# ----------------------------------------------------------------------------------------
_REVERSE_CACHE: OrderedDict = OrderedDict()
_REVERSE_CACHE_SIZE = 4


def build_reverse_index(idx: torch.Tensor, valid: torch.Tensor | None, num_queries: int,
                        num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key -> (query, slot) index in CSR form.

    idx ``[B, Nq or G, M]``, valid like idx -> (offsets int64 ``[B * (Nk + 1) + 1]``, entries
    int32 ``[B * Nq * M]``). Bucket ``b * (Nk + 1) + j`` lists the flat positions ``i * M + m``
    (query i, slot m) with ``idx[b, i, m] == j`` in increasing order; invalid slots go to the
    extra bucket ``j = Nk`` that no kernel reads. Cluster indices are expanded to queries.
    """
    b, _, m = idx.shape
    per_query = reference.expand_cluster_index(idx, num_queries).reshape(b, num_queries * m).long()
    if valid is not None:
        keep = reference.expand_cluster_index(valid, num_queries).reshape(b, num_queries * m).bool()
        per_query = torch.where(keep, per_query, torch.full_like(per_query, num_keys))
    buckets = per_query + torch.arange(b, device=idx.device)[:, None] * (num_keys + 1)
    buckets = buckets.reshape(-1)
    order = torch.argsort(buckets, stable=True)
    entries = (order % (num_queries * m)).to(torch.int32)
    counts = torch.bincount(buckets, minlength=b * (num_keys + 1))
    offsets = torch.zeros(b * (num_keys + 1) + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, entries


def _cached_reverse_index(idx, valid, num_queries, num_keys):
    """Blocks of a stage share one idx tensor: build its reverse index once.

    The cache keeps a reference to idx/valid (so their storage cannot be recycled) and
    compares their version counters (so in-place edits invalidate the entry).
    """
    key = (id(idx), id(valid), num_queries, num_keys)
    hit = _REVERSE_CACHE.get(key)
    if hit is not None:
        ref_idx, ref_valid, versions, value = hit
        if ref_idx is idx and ref_valid is valid and versions == _versions(idx, valid):
            _REVERSE_CACHE.move_to_end(key)
            return value
    value = build_reverse_index(idx, valid, num_queries, num_keys)
    _REVERSE_CACHE[key] = (idx, valid, _versions(idx, valid), value)
    while len(_REVERSE_CACHE) > _REVERSE_CACHE_SIZE:
        _REVERSE_CACHE.popitem(last=False)
    return value


def _versions(idx, valid):
    return (idx._version, None if valid is None else valid._version)


# ----------------------------------------------------------------------------------------
# neighbourhood attention
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """Launch shape of one attention kernel: rows (queries) and neighbours per step, warps."""

    rows: int
    neighbours: int
    num_warps: int


def _tile_override(variable: str) -> Tile | None:
    text = os.environ.get(variable)
    if not text:
        return None
    try:
        rows, neighbours, warps = (int(x) for x in text.split(","))
    except ValueError as err:
        raise ValueError(f"{variable}={text!r}: expected 'ROWS,NEIGHBOURS,WARPS', e.g. '16,16,4'") from err
    for value in (rows, neighbours, warps):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{variable}={text!r}: every entry must be a power of two")
    return Tile(rows, neighbours, warps)


def token_tile(m: int, d: int, backward: bool = False) -> Tile:
    """Per-token kernels: [rows x neighbours x D] broadcast tiles (env AFFMAE_KERNELS_TOKEN_TILE).

    The default aims at ~16 (forward) / ~8 (backward) tile elements per thread, which keeps
    the sm_90 builds at <= ~120 registers without spills (``python -m
    affmae_kernels.compile_report``); the GPU sweep in docs/kernels.md is still owed.
    """
    tile = _tile_override("AFFMAE_KERNELS_TOKEN_TILE")
    if tile is not None:
        if m % tile.neighbours:
            raise ValueError(f"AFFMAE_KERNELS_TOKEN_TILE: neighbours per step {tile.neighbours} must divide M={m}")
        return tile
    rows = 16 if d <= 32 else 8
    neighbours = 8 if d <= 64 else 4
    per_thread = 8 if backward else 16
    warps = min(16, max(4, rows * neighbours * d // (32 * per_thread)))
    return Tile(rows, neighbours, warps)


def cluster_tile(c: int, m: int, d: int) -> Tile:
    """Cluster kernels: [rows x neighbours] tl.dot tiles, rows >= 16 (env AFFMAE_KERNELS_CLUSTER_TILE)."""
    tile = _tile_override("AFFMAE_KERNELS_CLUSTER_TILE")
    if tile is not None:
        if tile.rows < 16 or tile.neighbours < 16:
            raise ValueError("AFFMAE_KERNELS_CLUSTER_TILE: tl.dot needs at least 16 rows and 16 neighbours")
        return tile
    rows = min(64, max(16, _next_pow2(c)))
    neighbours = min(64 if d <= 64 else 32, max(16, _next_pow2(m)))
    return Tile(rows, neighbours, 8 if d >= 128 else 4)


def _dot_f32(dtype: torch.dtype) -> bool:
    """fp32 inputs take the exact (ieee) tl.dot; under the interpreter bf16 operands are upcast
    too, because Triton 3.x's interpreter multiplies the raw bf16 bit patterns in tl.dot."""
    return dtype == torch.float32 or (interpreted() and dtype == torch.bfloat16)


class _NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx32, bias, valid8, blank_k, blank_v, scale, dkdv, poison, idx_source, valid_source):
        b, h, nq, d = q.shape
        groups, m = idx32.shape[1], idx32.shape[2]
        out = _alloc((b, h, nq, d), q.dtype, q.device, poison)
        lse = _alloc((b, h, nq), torch.float32, q.device, poison)
        has_blank = blank_k is not None
        dummy = q  # placeholder pointer for absent optional tensors (never read)
        args_common = (
            *q.stride(), *k.stride(), *v.stride(), *_strides4(bias),
        )
        if nq and b * h:
            with _device_guard(q):
                if groups == nq:
                    tile = token_tile(m, d)
                    grid = (triton.cdiv(nq, tile.rows), b * h)
                    _att.na_fwd_token_kernel[grid](
                        q, k, v, idx32, bias if bias is not None else dummy,
                        valid8 if valid8 is not None else idx32,
                        blank_k if has_blank else dummy, blank_v if has_blank else dummy, out, lse,
                        nq, h, scale, *args_common,
                        M=m, D=d, BLOCK_Q=tile.rows, BLOCK_M=tile.neighbours, HAS_BIAS=bias is not None,
                        HAS_VALID=valid8 is not None, HAS_BLANK=has_blank, num_warps=tile.num_warps,
                    )
                else:
                    c = nq // groups
                    tile = cluster_tile(c, m, d)
                    n_sub = triton.cdiv(c, tile.rows)
                    grid = (groups * n_sub, b * h)
                    _att.na_fwd_cluster_kernel[grid](
                        q, k, v, idx32, bias if bias is not None else dummy,
                        valid8 if valid8 is not None else idx32,
                        blank_k if has_blank else dummy, blank_v if has_blank else dummy, out, lse,
                        nq, groups, c, n_sub, h, scale, *args_common,
                        M=m, D=d, BLOCK_C=tile.rows, BLOCK_M=tile.neighbours, HAS_BIAS=bias is not None,
                        HAS_VALID=valid8 is not None, HAS_BLANK=has_blank, DOT_F32=_dot_f32(q.dtype),
                        num_warps=tile.num_warps,
                    )
        ctx.save_for_backward(q, k, v, idx32, bias, valid8, blank_k, blank_v, out, lse)
        ctx.scale = scale
        ctx.dkdv = dkdv
        ctx.poison = poison
        ctx.index_source = (idx_source, valid_source)  # user tensors: key of the reverse-index cache
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, idx32, bias, valid8, blank_k, blank_v, out, lse = ctx.saved_tensors
        scale, poison = ctx.scale, ctx.poison
        atomic = ctx.dkdv == "atomic"
        b, h, nq, d = q.shape
        nk = k.shape[2]
        groups, m = idx32.shape[1], idx32.shape[2]
        dev = q.device
        has_bias, has_blank = bias is not None, blank_k is not None
        need_dbias = has_bias and ctx.needs_input_grad[4]
        store_ds = need_dbias or not atomic
        if dout.dtype != q.dtype:
            dout = dout.to(q.dtype)

        dq = _alloc((b, h, nq, d), q.dtype, dev, poison)
        ds_buf = _alloc((b, h, nq, m), torch.float32, dev, poison) if store_ds else None
        p_buf = None if atomic else _alloc((b, h, nq, m), torch.float32, dev, poison)
        if atomic:
            dk_acc = torch.zeros((b, h, nk, d), dtype=torch.float32, device=dev)
            dv_acc = torch.zeros((b, h, nk, d), dtype=torch.float32, device=dev)
        else:
            dk_acc = _alloc((b, h, nk, d), k.dtype, dev, poison)
            dv_acc = _alloc((b, h, nk, d), v.dtype, dev, poison)

        token_mode = groups == nq
        if token_mode:
            tile = token_tile(m, d, backward=True)
            n_blocks = triton.cdiv(nq, tile.rows)
        else:
            c = nq // groups
            tile = cluster_tile(c, m, d)
            n_sub = triton.cdiv(c, tile.rows)
            n_blocks = groups * n_sub
        dbk_part = _alloc((b, h, n_blocks, d), torch.float32, dev, poison) if has_blank else None
        dbv_part = _alloc((b, h, n_blocks, d), torch.float32, dev, poison) if has_blank else None

        dummy = dq
        ptrs = (
            q, k, v, idx32, bias if has_bias else dummy, valid8 if valid8 is not None else idx32,
            blank_k if has_blank else dummy, blank_v if has_blank else dummy, out, dout, lse,
            dq, ds_buf if store_ds else dummy, p_buf if p_buf is not None else dummy, dk_acc, dv_acc,
            dbk_part if has_blank else dummy, dbv_part if has_blank else dummy,
        )
        strides = (*q.stride(), *k.stride(), *v.stride(), *_strides4(bias), *dout.stride())
        flags = dict(HAS_BIAS=has_bias, HAS_VALID=valid8 is not None, HAS_BLANK=has_blank,
                     ATOMIC=atomic, STORE_DS=store_ds, STORE_P=not atomic)
        if nq and b * h:
            with _device_guard(q):
                if token_mode:
                    _att.na_bwd_token_kernel[(n_blocks, b * h)](
                        *ptrs, nq, nk, h, scale, n_blocks, *strides,
                        M=m, D=d, BLOCK_Q=tile.rows, BLOCK_M=tile.neighbours, num_warps=tile.num_warps, **flags,
                    )
                else:
                    _att.na_bwd_cluster_kernel[(n_blocks, b * h)](
                        *ptrs, nq, nk, groups, c, n_sub, h, scale, *strides,
                        M=m, D=d, BLOCK_C=tile.rows, BLOCK_M=tile.neighbours, DOT_F32=_dot_f32(q.dtype),
                        num_warps=tile.num_warps, **flags,
                    )
                if not atomic and nk:
                    offsets, entries = _cached_reverse_index(*ctx.index_source, nq, nk)
                    _att.dkdv_reverse_kernel[(nk, b * h)](
                        q, dout, p_buf, ds_buf, offsets, entries, dk_acc, dv_acc,
                        nq, nk, h, scale, *q.stride(), *dout.stride(),
                        M=m, D=d, BLOCK_E=16, num_warps=2 if d <= 32 else 4,
                    )
        elif not atomic:  # nothing attends: gradients are zero
            dk_acc.zero_()
            dv_acc.zero_()
            if has_blank:
                dbk_part.zero_()
                dbv_part.zero_()

        dk = dk_acc.to(k.dtype)
        dv = dv_acc.to(v.dtype)
        dbias = ds_buf.to(bias.dtype) if need_dbias else None
        dbk = dbk_part.sum(dim=(0, 2)).to(blank_k.dtype) if has_blank else None
        dbv = dbv_part.sum(dim=(0, 2)).to(blank_v.dtype) if has_blank else None
        return dq, dk, dv, None, dbias, None, dbk, dbv, None, None, None, None, None


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
    *,
    dkdv: str | None = None,
    debug: bool | None = None,
) -> torch.Tensor:
    """Triton neighbourhood attention; same shapes and semantics as the reference.

    q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]``, idx ``[B, Nq, M]`` or ``[B, Nq/c, M]`` (cluster
    mode), bias ``[B, H, Nq, M]``, valid like idx, blank_k/blank_v ``[H, D]`` -> ``[B, H, Nq, D]``
    in q's dtype. Gradients flow to q, k, v, bias, blank_k and blank_v.
    """
    _check_attention(q, k, v, idx, bias, valid, blank_k, blank_v)
    debug = _debug_enabled(debug)
    mode = _dkdv_mode(dkdv)
    if debug:
        reference.check_index_range(idx, k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if blank_k is not None:
        blank_k, blank_v = blank_k.contiguous(), blank_v.contiguous()
    return _NeighborhoodAttention.apply(q, k, v, _as_index(idx), bias, _as_mask(valid),
                                        blank_k, blank_v, scale, mode, debug, idx, valid)


# ----------------------------------------------------------------------------------------
# weighted merge
# ----------------------------------------------------------------------------------------
def _merge_blocks(m: int, g: int, c: int) -> tuple[int, int, int]:
    block_m = min(16, _next_pow2(m))
    block_g = _next_pow2(g)
    block_c = max(16, min(128, 4096 // (block_m * block_g), _next_pow2(c)))
    return block_m, block_g, block_c


class _WeightedMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, feat, idx32, poison):
        b, n_out, m, g = weights.shape
        c = feat.shape[-1]
        out = _alloc((b, n_out, g, c), feat.dtype, feat.device, poison)
        block_m, block_g, block_c = _merge_blocks(m, g, c)
        if out.numel():
            with _device_guard(feat):
                _merge.merge_fwd_kernel[(n_out, triton.cdiv(c, block_c), b)](
                    weights, feat, idx32, out, n_out, c, *weights.stride(), *feat.stride(),
                    M=m, G=g, BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_C=block_c,
                )
        ctx.save_for_backward(weights, feat, idx32)
        ctx.poison = poison
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        weights, feat, idx32 = ctx.saved_tensors
        b, n_out, m, g = weights.shape
        n, c = feat.shape[1], feat.shape[2]
        need_dw, need_df = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dw = _alloc((b, n_out, m, g), torch.float32, feat.device, ctx.poison) if need_dw else None
        dfeat = torch.zeros((b, n, c), dtype=torch.float32, device=feat.device) if need_df else None
        block_m, block_g, block_c = _merge_blocks(m, g, c)
        if (need_dw or need_df) and n_out and b:
            with _device_guard(feat):
                _merge.merge_bwd_kernel[(n_out, b)](
                    weights, feat, idx32, dout, dw if need_dw else feat, dfeat if need_df else feat,
                    n_out, n, c, *weights.stride(), *feat.stride(), *dout.stride(),
                    M=m, G=g, BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_C=block_c,
                    NEED_DW=need_dw, NEED_DFEAT=need_df,
                )
        elif need_dw:
            dw.zero_()
        return (dw.to(weights.dtype) if need_dw else None,
                dfeat.to(feat.dtype) if need_df else None, None, None)


def weighted_merge(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor, *,
                   debug: bool | None = None) -> torch.Tensor:
    """Triton ``out[b, n, g] = sum_m weights[b, n, m, g] * feat[b, idx[b, n, m]]``.

    weights ``[B, N', M, G]``, feat ``[B, N, C]``, idx ``[B, N', M]`` -> ``[B, N', G, C]`` in
    feat's dtype; gradients for weights and feat.
    """
    if weights.dim() != 4 or feat.dim() != 3 or idx.dim() != 3:
        raise ValueError(f"weighted_merge expects weights [B,N',M,G], feat [B,N,C], idx [B,N',M]; got "
                         f"{tuple(weights.shape)}, {tuple(feat.shape)}, {tuple(idx.shape)}")
    b, n_out, m, _ = weights.shape
    if tuple(idx.shape) != (b, n_out, m) or feat.shape[0] != b:
        raise ValueError(f"idx must be [B, N', M] = {(b, n_out, m)} and feat [B={b}, N, C]; got "
                         f"{tuple(idx.shape)}, {tuple(feat.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64; got {idx.dtype}")
    _check_runnable(feat)
    _check_float("weights", weights)
    _check_float("feat", feat)
    _check_device("weights", weights, feat.device)
    _check_device("idx", idx, feat.device)
    if _debug_enabled(debug):
        reference.check_index_range(idx, feat.shape[1])
        poison = True
    else:
        poison = False
    return _WeightedMerge.apply(weights, feat, _as_index(idx), poison)


# ----------------------------------------------------------------------------------------
# k nearest centroids
# ----------------------------------------------------------------------------------------
def knn_centroids(query_pos: torch.Tensor, centroid_pos: torch.Tensor, k: int,
                  centroid_valid: torch.Tensor | None = None, *, debug: bool | None = None) -> torch.Tensor:
    """Triton k-nearest-centroid search (k <= 16), nearest first, ties to the lower index.

    query_pos ``[B, Nq, P]``, centroid_pos ``[B, Nc, P]`` (float), centroid_valid ``[B, Nc]``
    bool -> int64 ``[B, Nq, k]``. No gradient.
    """
    if query_pos.dim() != 3 or centroid_pos.dim() != 3 or query_pos.shape[-1] != centroid_pos.shape[-1] \
            or query_pos.shape[0] != centroid_pos.shape[0]:
        raise ValueError(f"positions must be [B, N, 2] with one batch size; got {tuple(query_pos.shape)} and "
                         f"{tuple(centroid_pos.shape)}")
    if not query_pos.dtype.is_floating_point or not centroid_pos.dtype.is_floating_point:
        raise ValueError(f"positions must be floating point; got {query_pos.dtype}, {centroid_pos.dtype}")
    b, nq, pdim = query_pos.shape
    nc = centroid_pos.shape[1]
    if not 1 <= k <= nc:
        raise ValueError(f"k={k} must be between 1 and the number of centroids {nc}")
    if k > MAX_KNN_K:
        raise ValueError(f"the Triton knn kernel handles k <= {MAX_KNN_K}; got k={k} (use the reference backend)")
    if centroid_valid is not None and (tuple(centroid_valid.shape) != (b, nc) or centroid_valid.dtype != torch.bool):
        raise ValueError(f"centroid_valid must be bool [B, Nc] = {(b, nc)}; got {centroid_valid.dtype} "
                         f"{tuple(centroid_valid.shape)}")
    _check_runnable(query_pos)
    _check_device("centroid_pos", centroid_pos, query_pos.device)
    _check_device("centroid_valid", centroid_valid, query_pos.device)
    qp = query_pos.float().contiguous()
    cp = centroid_pos.float().contiguous()
    cv = _as_mask(centroid_valid)
    out = _alloc((b, nq, k), torch.int64, query_pos.device, _debug_enabled(debug))
    block_q, block_n = 32, 64
    if b and nq:
        with _device_guard(qp):
            _knn.knn_kernel[(triton.cdiv(nq, block_q), b)](
                qp, cp, cv if cv is not None else qp, out, nq, nc,
                P=pdim, K=k, BLOCK_K=max(2, _next_pow2(k)), BLOCK_Q=block_q, BLOCK_N=block_n,
                HAS_VALID=cv is not None,
            )
    return out
