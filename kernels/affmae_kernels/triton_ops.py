"""Triton-backed ops with the reference signatures: kernel launchers, checks and autograd.

Each public function (``neighborhood_attention``, ``weighted_merge``, ``knn_centroids``) takes
the same arguments as its `affmae_kernels.reference` twin and runs the Triton kernels through
the ``affmae::`` custom ops of `affmae_kernels.ops` (so autograd, ``FlopCounterMode`` and
``torch.compile`` see one op). Keyword-only switches, defaulting to the current
`affmae_kernels.settings.KernelSettings`:

* ``debug``: check every neighbour index lies in range (`reference.check_index_range`, one
  device sync) and allocate every kernel-written buffer filled with NaN (or -1) so elements a
  kernel forgot to write cannot pass unnoticed.
* ``dkdv`` for attention: ``"atomic"`` scatters dk/dv with fp32 atomics from the query-side
  backward kernel; ``"reverse"`` stores p and ds per (query, neighbour) and sums them per key
  through a key -> (query, slot) index (no atomics, deterministic). The default stays
  ``"atomic"`` until a GPU run says otherwise (docs/kernels.md). With
  ``torch.use_deterministic_algorithms(True)`` the backward always takes ``"reverse"``, and the
  weighted merge's dfeat (atomics in the kernel) comes from the reference backward.

The launchers (``attention_forward`` / ``attention_backward``, ``merge_forward`` /
``merge_backward``, ``knn_forward``) are what the custom ops call. On CPU the kernels only run
under ``TRITON_INTERPRET=1`` set before this module is imported.
"""
from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary

from . import ops, reference
from . import triton_attention as _att
from . import triton_knn as _knn
from . import triton_merge as _merge
from .settings import DEFAULT_DKDV, DKDV_MODES, Tile, current_settings, log_once

__all__ = ["neighborhood_attention", "weighted_merge", "knn_centroids", "DKDV_MODES", "SUPPORTED_DTYPES",
           "attention_refusal", "merge_refusal", "knn_refusal"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_KNN_K = 16
_INT32_LIMIT = 2**31 - 1
assert DEFAULT_DKDV in DKDV_MODES


def interpreted() -> bool:
    """True when the kernels of this process were built for the Triton CPU interpreter."""
    return bool(_att.INTERPRETED)


def _resolve_dkdv(mode: str | None) -> str:
    choice = (mode or current_settings().dkdv).lower()
    if choice not in DKDV_MODES:
        raise ValueError(f"unknown dk/dv mode {choice!r}: use one of {DKDV_MODES}")
    return choice


def _resolve_debug(debug: bool | None) -> bool:
    return current_settings().debug if debug is None else bool(debug)


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


def runnable_refusal(t: torch.Tensor) -> str | None:
    """Why the kernels cannot run on t's device here (None if they can): they need CUDA tensors,
    or CPU tensors under the interpreter (or a compile-only run, `affmae_kernels.compile_report`)."""
    if t.is_cuda or interpreted() or current_settings().compile_only:
        return None
    return (f"the Triton kernels got {t.device} tensors: they need CUDA tensors, or TRITON_INTERPRET=1 "
            "set before Triton is first imported (CPU interpreter, for tests); otherwise use the "
            "reference backend")


def _check_runnable(t: torch.Tensor) -> None:
    reason = runnable_refusal(t)
    if reason is not None:
        raise ValueError(reason)


def _float_refusal(name: str, t: torch.Tensor | None) -> str | None:
    if t is not None and t.dtype not in SUPPORTED_DTYPES:
        return (f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16 "
                "(use the reference backend for float64)")
    return None


def _check_float(name: str, t: torch.Tensor | None) -> None:
    reason = _float_refusal(name, t)
    if reason is not None:
        raise ValueError(reason)


def attention_refusal(q: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None,
                      blank_k: torch.Tensor | None = None, blank_v: torch.Tensor | None = None) -> str | None:
    """Why the attention kernels cannot take these (shape-checked) inputs, or None."""
    for name, t in (("q", q), ("bias", bias), ("blank_k", blank_k), ("blank_v", blank_v)):
        reason = _float_refusal(name, t)
        if reason is not None:
            return reason
    reason = runnable_refusal(q)
    if reason is not None:
        return reason
    d, m = q.shape[-1], idx.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head dim {d} is not supported by the Triton kernels: use one of {SUPPORTED_HEAD_DIMS}"
    if m == 0 or m % 8:
        return (f"the neighbourhood size M={m} must be a positive multiple of 8 (pad idx and mark "
                "the padding invalid)")
    if k.shape[2] > _INT32_LIMIT or idx.numel() > _INT32_LIMIT:
        return "too many keys or neighbour entries for int32 indexing"
    return None


def _check_attention(q, k, v, idx, bias, valid, blank_k, blank_v) -> None:
    """Reference shape checks plus what the kernels additionally need."""
    reference.check_attention_inputs(q, k, v, idx, bias, valid, blank_k, blank_v)
    _check_runnable(q)
    for name, t in (("k", k), ("v", v), ("idx", idx), ("bias", bias), ("valid", valid),
                    ("blank_k", blank_k), ("blank_v", blank_v)):
        _check_device(name, t, q.device)
    reason = attention_refusal(q, k, idx, bias, blank_k, blank_v)
    if reason is not None:
        raise ValueError(reason)


def _as_index(idx: torch.Tensor) -> torch.Tensor:
    return idx.to(torch.int32).contiguous()


def _as_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    return None if valid is None else valid.contiguous().view(torch.uint8)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------------------
# reverse index (atomic-free dk/dv), cached per idx tensor
# ----------------------------------------------------------------------------------------
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


#: idx tensor -> (weakref to valid or None, version counters, (Nq, Nk), reverse index). Keys are
#: held weakly and compared by identity: an entry dies with its idx tensor, so a recycled
#: address can never hit a stale entry.
_REVERSE_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _versions(idx: torch.Tensor, valid: torch.Tensor | None) -> tuple[int, int | None]:
    return idx._version, None if valid is None else valid._version


def _cached_reverse_index(idx: torch.Tensor, valid: torch.Tensor | None, num_queries: int,
                          num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of a stage share one idx tensor: build its reverse index once.

    A hit needs the same idx object (weak, by identity), the same valid object, unchanged
    version counters (in-place edits invalidate) and the same sizes.
    """
    versions = _versions(idx, valid)
    hit = _REVERSE_CACHE.get(idx)
    if hit is not None:
        valid_ref, saved_versions, sizes, value = hit
        same_valid = valid_ref is None if valid is None else (valid_ref is not None and valid_ref() is valid)
        if same_valid and saved_versions == versions and sizes == (num_queries, num_keys):
            return value
    value = build_reverse_index(idx, valid, num_queries, num_keys)
    _REVERSE_CACHE[idx] = (None if valid is None else weakref.ref(valid), versions, (num_queries, num_keys), value)
    return value


# ----------------------------------------------------------------------------------------
# neighbourhood attention
# ----------------------------------------------------------------------------------------
def token_tile(m: int, d: int, backward: bool = False, override: Tile | None = None) -> Tile:
    """Per-token kernels: [rows x neighbours x D] broadcast tiles (``override``: settings.token_tile).

    The default aims at ~16 (forward) / ~8 (backward) tile elements per thread, which keeps
    the sm_90 builds at <= ~120 registers without spills (``python -m
    affmae_kernels.compile_report``); the GPU sweep in docs/kernels.md is still owed.
    """
    if override is not None:
        if m % override.neighbours:
            raise ValueError(f"token tile {override.spec()}: neighbours per step {override.neighbours} "
                             f"must divide M={m}")
        return override
    rows = 16 if d <= 32 else 8
    neighbours = 8 if d <= 64 else 4
    per_thread = 8 if backward else 16
    warps = min(16, max(4, rows * neighbours * d // (32 * per_thread)))
    return Tile(rows, neighbours, warps)


def cluster_tile(c: int, m: int, d: int, override: Tile | None = None) -> Tile:
    """Cluster kernels: [rows x neighbours] tl.dot tiles, rows >= 16 (``override``: settings.cluster_tile)."""
    if override is not None:
        return override
    rows = min(64, max(16, _next_pow2(c)))
    neighbours = min(64 if d <= 64 else 32, max(16, _next_pow2(m)))
    return Tile(rows, neighbours, 8 if d >= 128 else 4)


def _dot_f32(dtype: torch.dtype) -> bool:
    """fp32 inputs take the exact (ieee) tl.dot; under the interpreter bf16 operands are upcast
    too, because Triton 3.x's interpreter multiplies the raw bf16 bit patterns in tl.dot."""
    return dtype == torch.float32 or (interpreted() and dtype == torch.bfloat16)


def _kernel_inputs(idx, valid, blank_k, blank_v):
    """idx as int32, valid as uint8 and contiguous blank tensors, as the attention kernels read them."""
    if blank_k is not None:
        blank_k, blank_v = blank_k.contiguous(), blank_v.contiguous()
    return _as_index(idx), _as_mask(valid), blank_k, blank_v


@dataclass(frozen=True)
class _AttentionGrid:
    """Kernel family, tile and grid of one attention launch: per-token mode when ``cluster`` is 0,
    else cluster-tile mode with ``cluster`` queries per cluster in ``n_sub`` programs each."""

    tile: Tile
    n_blocks: int  # programs along the query axis
    cluster: int = 0
    n_sub: int = 1

    def constants(self, m: int, d: int, dtype: torch.dtype) -> dict:
        """The kernel's compile-time arguments and warps."""
        if not self.cluster:
            return dict(M=m, D=d, BLOCK_Q=self.tile.rows, BLOCK_M=self.tile.neighbours, num_warps=self.tile.num_warps)
        return dict(M=m, D=d, BLOCK_C=self.tile.rows, BLOCK_M=self.tile.neighbours, DOT_F32=_dot_f32(dtype),
                    num_warps=self.tile.num_warps)


def _attention_grid(nq: int, groups: int, m: int, d: int, token: Tile | None, cluster: Tile | None,
                    backward: bool = False) -> _AttentionGrid:
    if groups == nq:
        tile = token_tile(m, d, backward=backward, override=token)
        return _AttentionGrid(tile, triton.cdiv(nq, tile.rows))
    c = nq // groups
    tile = cluster_tile(c, m, d, override=cluster)
    n_sub = triton.cdiv(c, tile.rows)
    return _AttentionGrid(tile, groups * n_sub, c, n_sub)


def attention_forward(q, k, v, idx, bias, valid, blank_k, blank_v, scale: float, *, debug: bool = False,
                      token: Tile | None = None, cluster: Tile | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: -> out ``[B, H, Nq, D]`` (q's dtype), lse ``[B, H, Nq]`` float32.

    Inputs as `neighborhood_attention` (already checked); ``debug`` NaN-poisons the outputs first.
    """
    idx32, valid8, blank_k, blank_v = _kernel_inputs(idx, valid, blank_k, blank_v)
    b, h, nq, d = q.shape
    groups, m = idx32.shape[1], idx32.shape[2]
    out = _alloc((b, h, nq, d), q.dtype, q.device, debug)
    lse = _alloc((b, h, nq), torch.float32, q.device, debug)
    has_blank = blank_k is not None
    dummy = q  # placeholder pointer for absent optional tensors (never read)
    ptrs = (q, k, v, idx32, bias if bias is not None else dummy, valid8 if valid8 is not None else idx32,
            blank_k if has_blank else dummy, blank_v if has_blank else dummy, out, lse)
    strides = (*q.stride(), *k.stride(), *v.stride(), *_strides4(bias))
    flags = dict(HAS_BIAS=bias is not None, HAS_VALID=valid8 is not None, HAS_BLANK=has_blank)
    if nq and b * h:
        grid = _attention_grid(nq, groups, m, d, token, cluster)
        constants = grid.constants(m, d, q.dtype)
        with _device_guard(q):
            if not grid.cluster:
                _att.na_fwd_token_kernel[(grid.n_blocks, b * h)](*ptrs, nq, h, scale, *strides, **constants, **flags)
            else:
                _att.na_fwd_cluster_kernel[(grid.n_blocks, b * h)](
                    *ptrs, nq, groups, grid.cluster, grid.n_sub, h, scale, *strides, **constants, **flags,
                )
    return out, lse


def _backward_dkdv(dkdv: str) -> str:
    """The requested dk/dv mode, or ``reverse`` (no atomics) under deterministic algorithms."""
    if dkdv == "atomic" and _deterministic():
        log_once(logging.INFO, "dkdv", "deterministic algorithms are enabled: the Triton attention backward "
                 "accumulates dk/dv through the reverse index instead of atomics")
        return "reverse"
    return dkdv


def _backward_buffers(q, k, v, m: int, n_blocks: int, *, atomic: bool, store_ds: bool, has_blank: bool,
                      poison: bool):
    """(dq, ds, p, dk, dv, dblank_k partials, dblank_v partials) written by the backward kernels.

    ds/p are fp32 ``[B, H, Nq, M]`` (None when not stored), dk/dv are zeroed fp32 atomic
    accumulators or the reverse pass's outputs in k/v's dtypes, the blank partials fp32
    ``[B, H, n_blocks, D]`` (None without blank tokens).
    """
    b, h, nq, d = q.shape
    nk, dev = k.shape[2], q.device
    dq = _alloc((b, h, nq, d), q.dtype, dev, poison)
    ds_buf = _alloc((b, h, nq, m), torch.float32, dev, poison) if store_ds else None
    p_buf = None if atomic else _alloc((b, h, nq, m), torch.float32, dev, poison)
    if atomic:
        dk_acc = torch.zeros((b, h, nk, d), dtype=torch.float32, device=dev)
        dv_acc = torch.zeros((b, h, nk, d), dtype=torch.float32, device=dev)
    else:
        dk_acc = _alloc((b, h, nk, d), k.dtype, dev, poison)
        dv_acc = _alloc((b, h, nk, d), v.dtype, dev, poison)
    dbk_part = _alloc((b, h, n_blocks, d), torch.float32, dev, poison) if has_blank else None
    dbv_part = _alloc((b, h, n_blocks, d), torch.float32, dev, poison) if has_blank else None
    return dq, ds_buf, p_buf, dk_acc, dv_acc, dbk_part, dbv_part


def _reverse_dkdv(q, dout, p_buf, ds_buf, idx, valid, dk, dv, scale: float) -> None:
    """Atomic-free dk/dv: sum the stored p/ds of every key's (query, slot) pairs into dk/dv."""
    b, h, nq, d = q.shape
    nk, m = dk.shape[2], idx.shape[2]
    offsets, entries = _cached_reverse_index(idx, valid, nq, nk)
    _att.dkdv_reverse_kernel[(nk, b * h)](
        q, dout, p_buf, ds_buf, offsets, entries, dk, dv,
        nq, nk, h, scale, *q.stride(), *dout.stride(),
        M=m, D=d, BLOCK_E=16, num_warps=2 if d <= 32 else 4,
    )


def attention_backward(dout, q, k, v, idx, bias, valid, blank_k, blank_v, out, lse, scale: float,
                       need: tuple[bool, ...], *, dkdv: str = DEFAULT_DKDV, debug: bool = False,
                       token: Tile | None = None, cluster: Tile | None = None) -> tuple[torch.Tensor | None, ...]:
    """Launch the backward kernels: -> (dq, dk, dv, dbias, dblank_k, dblank_v) in the input dtypes.

    ``need`` flags the same six gradients (the kernels compute dq, dk, dv and the blank gradients
    regardless; dbias only when needed). ``dkdv``: see the module docstring.
    """
    idx32, valid8, blank_k, blank_v = _kernel_inputs(idx, valid, blank_k, blank_v)
    atomic = _backward_dkdv(dkdv) == "atomic"
    b, h, nq, d = q.shape
    nk = k.shape[2]
    groups, m = idx32.shape[1], idx32.shape[2]
    has_bias, has_blank = bias is not None, blank_k is not None
    need_dbias = has_bias and need[3]
    store_ds = need_dbias or not atomic
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    grid = _attention_grid(nq, groups, m, d, token, cluster, backward=True)
    dq, ds_buf, p_buf, dk_acc, dv_acc, dbk_part, dbv_part = _backward_buffers(
        q, k, v, m, grid.n_blocks, atomic=atomic, store_ds=store_ds, has_blank=has_blank, poison=debug)

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
    constants = grid.constants(m, d, q.dtype)
    if nq and b * h:
        with _device_guard(q):
            if not grid.cluster:
                _att.na_bwd_token_kernel[(grid.n_blocks, b * h)](
                    *ptrs, nq, nk, h, scale, grid.n_blocks, *strides, **constants, **flags)
            else:
                _att.na_bwd_cluster_kernel[(grid.n_blocks, b * h)](
                    *ptrs, nq, nk, groups, grid.cluster, grid.n_sub, h, scale, *strides, **constants, **flags)
            if not atomic and nk:
                _reverse_dkdv(q, dout, p_buf, ds_buf, idx, valid, dk_acc, dv_acc, scale)
    elif not atomic:  # nothing attends: gradients are zero
        for buf in (dk_acc, dv_acc, dbk_part, dbv_part):
            if buf is not None:
                buf.zero_()

    dbias = ds_buf.to(bias.dtype) if need_dbias else None
    dbk = dbk_part.sum(dim=(0, 2)).to(blank_k.dtype) if has_blank else None
    dbv = dbv_part.sum(dim=(0, 2)).to(blank_v.dtype) if has_blank else None
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype), dbias, dbk, dbv


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
    settings = current_settings().replace(dkdv=_resolve_dkdv(dkdv), debug=_resolve_debug(debug))
    if settings.debug:
        reference.check_index_range(idx, k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return ops.neighborhood_attention(q, k, v, idx, bias, valid, blank_k, blank_v, scale,
                                      backend="triton", settings=settings)


# ----------------------------------------------------------------------------------------
# weighted merge
# ----------------------------------------------------------------------------------------
def _merge_blocks(m: int, g: int, c: int) -> tuple[int, int, int]:
    block_m = min(16, _next_pow2(m))
    block_g = _next_pow2(g)
    block_c = max(16, min(128, 4096 // (block_m * block_g), _next_pow2(c)))
    return block_m, block_g, block_c


def merge_forward(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor, *,
                  debug: bool = False) -> torch.Tensor:
    """Launch the merge kernel: weights ``[B, N', M, G]``, feat ``[B, N, C]`` -> ``[B, N', G, C]``."""
    idx32 = _as_index(idx)
    b, n_out, m, g = weights.shape
    c = feat.shape[-1]
    out = _alloc((b, n_out, g, c), feat.dtype, feat.device, debug)
    block_m, block_g, block_c = _merge_blocks(m, g, c)
    if out.numel():
        with _device_guard(feat):
            _merge.merge_fwd_kernel[(n_out, triton.cdiv(c, block_c), b)](
                weights, feat, idx32, out, n_out, c, *weights.stride(), *feat.stride(),
                M=m, G=g, BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_C=block_c,
            )
    return out


def merge_backward(dout: torch.Tensor, weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor,
                   need_weights: bool, need_feat: bool, *, debug: bool = False):
    """Launch the merge backward: -> (dweights, dfeat) in the input dtypes, None where not needed.

    dfeat is scattered with atomics; under deterministic algorithms it comes from the reference
    backward in float32 instead (the kernel then computes dweights only).
    """
    idx32 = _as_index(idx)
    b, n_out, m, g = weights.shape
    n, c = feat.shape[1], feat.shape[2]
    kernel_df = need_feat and not _deterministic()
    dw = _alloc((b, n_out, m, g), torch.float32, feat.device, debug) if need_weights else None
    dfeat = torch.zeros((b, n, c), dtype=torch.float32, device=feat.device) if kernel_df else None
    block_m, block_g, block_c = _merge_blocks(m, g, c)
    if (need_weights or kernel_df) and n_out and b:
        with _device_guard(feat):
            _merge.merge_bwd_kernel[(n_out, b)](
                weights, feat, idx32, dout, dw if need_weights else feat, dfeat if kernel_df else feat,
                n_out, n, c, *weights.stride(), *feat.stride(), *dout.stride(),
                M=m, G=g, BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_C=block_c,
                NEED_DW=need_weights, NEED_DFEAT=kernel_df,
            )
    elif need_weights:
        dw.zero_()
    if need_feat and not kernel_df:
        log_once(logging.INFO, "merge", "deterministic algorithms are enabled: the weighted-merge backward "
                 "computes dfeat with the reference (no atomics)")
        _, dfeat = reference.merge_backward(dout.float(), weights.float(), feat.float(), idx, False, True)
    return (dw.to(weights.dtype) if need_weights else None,
            dfeat.to(feat.dtype) if need_feat else None)


def weighted_merge(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor, *,
                   debug: bool | None = None) -> torch.Tensor:
    """Triton ``out[b, n, g] = sum_m weights[b, n, m, g] * feat[b, idx[b, n, m]]``.

    weights ``[B, N', M, G]``, feat ``[B, N, C]``, idx ``[B, N', M]`` -> ``[B, N', G, C]`` in
    feat's dtype; gradients for weights and feat.
    """
    check_merge_inputs(weights, feat, idx)
    _check_runnable(feat)
    _check_float("weights", weights)
    _check_float("feat", feat)
    _check_device("weights", weights, feat.device)
    _check_device("idx", idx, feat.device)
    debug = _resolve_debug(debug)
    if debug:
        reference.check_index_range(idx, feat.shape[1])
    return ops.weighted_merge(weights, feat, idx, backend="triton", debug=debug)


def check_merge_inputs(weights: torch.Tensor, feat: torch.Tensor, idx: torch.Tensor) -> None:
    """The reference's shape checks of the weighted merge plus the index dtype the kernels read."""
    reference.check_merge_inputs(weights, feat, idx)
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64; got {idx.dtype}")


def merge_refusal(weights: torch.Tensor, feat: torch.Tensor) -> str | None:
    """Why the merge kernels cannot take these (shape-checked) inputs, or None."""
    return runnable_refusal(feat) or _float_refusal("weights", weights) or _float_refusal("feat", feat)


# ----------------------------------------------------------------------------------------
# k nearest centroids
# ----------------------------------------------------------------------------------------
def knn_refusal(query_pos: torch.Tensor, k: int) -> str | None:
    """Why the knn kernel cannot serve this call, or None."""
    if k > MAX_KNN_K:
        return f"the Triton knn kernel handles k <= {MAX_KNN_K}; got k={k} (use the reference backend)"
    return runnable_refusal(query_pos)


def knn_forward(query_pos: torch.Tensor, centroid_pos: torch.Tensor, k: int,
                centroid_valid: torch.Tensor | None, *, debug: bool = False) -> torch.Tensor:
    """Launch the knn kernel: -> int64 ``[B, Nq, k]`` (inputs already checked)."""
    b, nq, pdim = query_pos.shape
    nc = centroid_pos.shape[1]
    qp = query_pos.float().contiguous()
    cp = centroid_pos.float().contiguous()
    cv = _as_mask(centroid_valid)
    out = _alloc((b, nq, k), torch.int64, query_pos.device, debug)
    block_q, block_n = 32, 64
    if b and nq:
        with _device_guard(qp):
            _knn.knn_kernel[(triton.cdiv(nq, block_q), b)](
                qp, cp, cv if cv is not None else qp, out, nq, nc,
                P=pdim, K=k, BLOCK_K=max(2, _next_pow2(k)), BLOCK_Q=block_q, BLOCK_N=block_n,
                HAS_VALID=cv is not None,
            )
    return out


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
    return ops.knn_centroids(query_pos, centroid_pos, k, centroid_valid, backend="triton",
                             debug=_resolve_debug(debug))
