"""FLOP counts of whole models, including the ops `torch.utils.flop_counter` cannot see.

Convention (used for every family, stated on the benchmark page):

* One FLOP = one multiply or one add; a multiply-accumulate is 2 FLOPs.
* Counted: matrix products and convolutions (what ``FlopCounterMode`` counts: ``mm``, ``addmm``,
  ``bmm``, ``convolution`` and their backward), attention, the neighbourhood ops of AFFMAE and the
  k-nearest-centroid distances. Not counted: element-wise work (softmax, GELU, LayerNorm, bias
  adds, masking), sorting / top-k, gathers and scatters - for every family alike.
* A training step is forward + loss + backward, counted op by op as executed (roughly 3x the
  forward: each product of a forward needs two in the backward, one per operand).

The ops without a formula in the counter get one here (``B`` batch, ``H`` heads, ``Nq``
queries, ``Nk`` keys, ``M`` neighbours, ``D`` head dim, ``G`` merge groups, ``C`` channels,
``Nc`` centroids):

* dense attention (``scaled_dot_product_attention``): torch's own formulas,
  forward ``4 B H Nq Nk D``, backward 2.5x that (flash style: the scores are recomputed);
  on CPU the counter has no entry for the CPU flash kernel, so it would count zero.
* neighbourhood attention: forward ``2 B H Nq D (M + 1)`` (QK^T over M neighbours and the
  blank key) ``+ 2 B H Nq M D`` (PV); the blank value enters by a scaled add (element-wise, not
  counted), so forward ~ ``4 B H Nq M D``. Backward = 2x the forward products + one recomputed
  QK^T, the same convention as torch's dense-attention backward and what the Triton kernel does.
  In cluster mode ``Nq`` is the padded query count (whole clusters).
* weighted merge: forward ``2 B N' M G C``, backward 2x forward.
* k nearest centroids: ``B Nq Nc (3 d - 1)`` with ``d = 2`` coordinates (d subtractions, d
  squares, d - 1 additions per query-centroid distance); the sort is not counted; no backward.

`count_flops` runs a function (a forward, or a forward + backward) and returns a `FlopCount`.

* *Stand-in* mode (default, what the benchmark reports): attention, neighbourhood attention,
  weighted merge and k-NN run as shape-only stand-ins that return zeros (and zero gradients) and
  add their analytic count; floating-point activations saved for the backward are kept as shapes
  only. Counting a 2048^2 training step then costs about the time and memory of a cheap forward.
* *Exact* mode (the check): everything runs for real - neighbourhood ops on the PyTorch reference
  backend, whose gather + einsum the counter does see, SDPA through the counter (with formulas
  added for the CPU flash kernel) - and only what no counter can see is added analytically: k-NN
  distances, and the recomputed QK^T where the executed backward keeps the probabilities instead
  (SDPA's math fallback; the reference neighbourhood attention recomputes in its own chunked
  backward, which the counter sees). The tests check that both modes give the same total.

The replacement is process-global while the context is active (module attributes are swapped):
count in one thread at a time.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import affmae_kernels
from affmae_kernels import dispatch

#: Modules whose global names are re-bound while counting (where the dispatching ops are imported).
PATCHED_PREFIXES = ("napari_affmae", "affmae_kernels")

#: Op classes of a `FlopCount` breakdown.
DENSE = "dense"  # what FlopCounterMode counts: linear layers, convolutions, other matmuls
SDPA = "dense_attention"
NEIGHBORHOOD = "neighborhood_attention"
MERGE = "weighted_merge"
KNN = "knn_centroids"
SDPA_RECOMPUTE = "dense_attention_recompute"  # exact mode only: SDPA's math fallback on CPU

_aten = torch.ops.aten


def _cpu_sdpa_mapping() -> dict:
    """Counter formulas for the CPU flash-attention ops, which torch's registry lacks."""
    mapping = {}
    forward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        mapping[forward] = _cpu_sdpa_forward
    if backward is not None:
        mapping[backward] = _cpu_sdpa_backward
    return mapping


def _cpu_sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# ------------------------------------------------------------------------------------ formulas

def neighborhood_attention_flops(batch: int, heads: int, queries: int, neighbours: int, head_dim: int,
                                 blank: bool = True) -> tuple[int, int, int]:
    """(forward, backward, recomputed QK^T) FLOPs of one neighbourhood-attention call.

    ``backward`` includes the recomputation (the reference's chunked backward executes exactly
    these products); ``recompute`` is the recomputed QK^T alone.
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


def sdpa_flops(query_shape: tuple[int, ...], key_shape: tuple[int, ...],
               value_shape: tuple[int, ...]) -> tuple[int, int]:
    """(forward, backward) FLOPs of dense attention, torch's formulas; leading dims fold into batch."""
    def four(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        lead = shape[:-2]
        heads = lead[-1] if lead else 1
        batch = math.prod(lead[:-1]) if len(lead) > 1 else 1
        return batch, heads, shape[-2], shape[-1]

    q, k, v = four(tuple(query_shape)), four(tuple(key_shape)), four(tuple(value_shape))
    out = (q[0], q[1], q[2], v[3])
    return flop_counter.sdpa_flop_count(q, k, v), flop_counter.sdpa_backward_flop_count(out, q, k, v)


# --------------------------------------------------------------------------------------- tally

@dataclass
class FlopCount:
    """FLOPs of one counted run: ``total`` and a breakdown by op class (``DENSE``, ``SDPA``, ...)."""

    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, flops: int, call: bool = False) -> None:
        self.by_op[op] = self.by_op.get(op, 0) + int(flops)
        self.total += int(flops)
        if call:
            self.calls[op] = self.calls.get(op, 0) + 1


def _zeros_like_needed(ctx, tensors) -> tuple:
    return tuple(torch.zeros_like(t) if (t is not None and need) else None
                 for t, need in zip(tensors, ctx.needs_input_grad[-len(tensors):]))


class _AttentionStandIn(torch.autograd.Function):
    """Shape-only attention: zeros out ``[..., Nq, Dv]``, zero gradients, analytic FLOPs."""

    @staticmethod
    def forward(ctx, tally: FlopCount, op: str, flops_fwd: int, flops_bwd: int, q, k, v, *extras):
        ctx.tally, ctx.op, ctx.flops_bwd = tally, op, flops_bwd
        ctx.save_for_backward(q, k, v, *[e for e in extras if e is not None])
        ctx.extra_present = [e is not None for e in extras]
        tally.add(op, flops_fwd, call=True)
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))

    @staticmethod
    def backward(ctx, grad_out):
        ctx.tally.add(ctx.op, ctx.flops_bwd)
        saved = list(ctx.saved_tensors)
        q, k, v = saved[:3]
        rest = iter(saved[3:])
        extras = [next(rest) if present else None for present in ctx.extra_present]
        return (None, None, None, None) + _zeros_like_needed(ctx, [q, k, v, *extras])


class _MergeStandIn(torch.autograd.Function):
    """Shape-only weighted merge: zeros ``[B, N', G, C]``, zero gradients, analytic FLOPs."""

    @staticmethod
    def forward(ctx, tally: FlopCount, flops_fwd: int, flops_bwd: int, weights, feat, idx):
        ctx.tally, ctx.flops_bwd = tally, flops_bwd
        ctx.save_for_backward(weights, feat)
        tally.add(MERGE, flops_fwd, call=True)
        b, n_out, _, groups = weights.shape
        return feat.new_zeros(b, n_out, groups, feat.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        ctx.tally.add(MERGE, ctx.flops_bwd)
        weights, feat = ctx.saved_tensors
        grads = _zeros_like_needed(ctx, [weights, feat, None])
        return (None, None, None) + grads


@contextlib.contextmanager
def _rebound(original: Callable, replacement: Callable, extra_modules=()) -> Iterator[None]:
    """Re-bind every module-level name bound to ``original`` (in our packages) to ``replacement``."""
    swapped = []
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and name.split(".")[0] in PATCHED_PREFIXES] + list(extra_modules)
    for module in modules:
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)
                swapped.append((module, attr))
    try:
        yield
    finally:
        for module, attr in swapped:
            setattr(module, attr, original)


def _na_shapes(q, idx, blank_k) -> tuple[int, int, int, int, int, bool]:
    b, h, nq, d = q.shape
    return b, h, nq, idx.shape[-1], d, blank_k is not None


class _Counting:
    """Replacement ops for one counting run (stand-in or exact mode)."""

    def __init__(self, tally: FlopCount, exact: bool) -> None:
        self.tally = tally
        self.exact = exact
        self.na_original = dispatch.neighborhood_attention
        self.merge_original = dispatch.weighted_merge
        self.knn_original = dispatch.knn_centroids
        self.sdpa_original = F.scaled_dot_product_attention
        self.counter: FlopCounterMode | None = None

    def neighborhood_attention(self, q, k, v, idx, bias=None, valid=None, blank_k=None, blank_v=None, scale=None,
                               *, backend=None):
        fwd, bwd, _ = neighborhood_attention_flops(*_na_shapes(q, idx, blank_k))
        if not self.exact:
            return _AttentionStandIn.apply(self.tally, NEIGHBORHOOD, fwd, bwd, q, k, v, bias, blank_k, blank_v)
        self.tally.calls[NEIGHBORHOOD] = self.tally.calls.get(NEIGHBORHOOD, 0) + 1
        # the reference's backward recomputes QK^T itself (flash style): the counter sees all of it
        return self.na_original(q, k, v, idx, bias=bias, valid=valid, blank_k=blank_k, blank_v=blank_v,
                                scale=scale, backend="reference")

    def weighted_merge(self, weights, feat, idx, *, backend=None):
        b, n_out, m, groups = weights.shape
        fwd, bwd = weighted_merge_flops(b, n_out, m, groups, feat.shape[-1])
        if not self.exact:
            return _MergeStandIn.apply(self.tally, fwd, bwd, weights, feat, idx)
        self.tally.calls[MERGE] = self.tally.calls.get(MERGE, 0) + 1
        return self.merge_original(weights, feat, idx, backend="reference")

    def knn_centroids(self, query_pos, centroid_pos, k, centroid_valid=None, *, backend=None):
        b, nq, dims = query_pos.shape
        self.tally.add(KNN, knn_flops(b, nq, centroid_pos.shape[1], dims), call=True)
        if self.exact:
            return self.knn_original(query_pos, centroid_pos, k, centroid_valid, backend="reference")
        if not 1 <= k <= centroid_pos.shape[1]:
            raise ValueError(f"k={k} must be between 1 and the number of centroids {centroid_pos.shape[1]}")
        # shape-only: the first k centroids (valid indices; which ones does not change any count)
        return torch.arange(k, device=query_pos.device).expand(b, nq, k).contiguous()

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        fwd, bwd = sdpa_flops(tuple(query.shape), tuple(key.shape), tuple(value.shape))
        if not self.exact:  # the mask goes in too: a learned bias must still receive a gradient
            mask = attn_mask if attn_mask is not None and attn_mask.is_floating_point() else None
            return _AttentionStandIn.apply(self.tally, SDPA, fwd, bwd, query, key, value, mask)
        before = self._fused_attention_flops()
        out = self.sdpa_original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, **kwargs)
        if self._fused_attention_flops() == before and out.requires_grad:
            # no fused kernel ran: the math fallback (bmm + softmax, counted as bmm) keeps the
            # probabilities, so its backward lacks the recomputed QK^T of the convention
            recompute = bwd - 2 * fwd
            out.register_hook(lambda grad: self.tally.add(SDPA_RECOMPUTE, recompute))
        return out

    def _fused_attention_flops(self) -> int:
        counts = self.counter.get_flop_counts().get("Global", {}) if self.counter is not None else {}
        return sum(v for op, v in counts.items() if "attention" in str(op))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_rebound(self.na_original, self.neighborhood_attention, [affmae_kernels, dispatch]))
            stack.enter_context(_rebound(self.merge_original, self.weighted_merge, [affmae_kernels, dispatch]))
            stack.enter_context(_rebound(self.knn_original, self.knn_centroids, [affmae_kernels, dispatch]))
            stack.enter_context(_rebound(self.sdpa_original, self.sdpa, [F]))
            yield


@contextlib.contextmanager
def shape_only_neighborhood_ops() -> Iterator[FlopCount]:
    """Run AFFMAE's neighbourhood attention, weighted merge and k-NN as shape-only stand-ins.

    The stand-ins keep what a fused kernel keeps for its backward (q, k, v, bias, blank; merge
    weights and features) and never build the ``[B, H, Nq, M, D]`` neighbour tensors of the
    reference backend, so a model's peak memory under this context is a lower bound for fused
    kernels. Outputs are zeros: use it for cost measurements only. Yields the FLOP tally.
    """
    tally = FlopCount()
    counting = _Counting(tally, exact=False)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_rebound(counting.na_original, counting.neighborhood_attention, [affmae_kernels, dispatch]))
        stack.enter_context(_rebound(counting.merge_original, counting.weighted_merge, [affmae_kernels, dispatch]))
        stack.enter_context(_rebound(counting.knn_original, counting.knn_centroids, [affmae_kernels, dispatch]))
        yield tally


def _pack_shape(t: torch.Tensor):
    # floating activations only: bool masks and indices select elements, so they keep their values
    return (t.shape, t.dtype, t.device) if t.is_floating_point() else t


def _unpack_zeros(packed) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    shape, dtype, device = packed
    return torch.zeros(shape, dtype=dtype, device=device)


def count_flops(fn: Callable[[], object], exact: bool = False) -> FlopCount:
    """FLOPs of running ``fn()`` (see the module docstring for the convention and the two modes).

    ``fn`` may run a forward only (wrap it in ``torch.no_grad()`` for inference) or a forward and a
    backward; everything it executes is counted.
    """
    tally = FlopCount()
    counting = _Counting(tally, exact)
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping() if exact else {})
    counting.counter = counter
    with contextlib.ExitStack() as stack:
        stack.enter_context(counting.installed())
        if not exact:  # counts depend on shapes only: keep no activations for the backward
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_pack_shape, _unpack_zeros))
        stack.enter_context(counter)
        fn()
    per_aten = counter.get_flop_counts().get("Global", {})
    attention_ops = {op for op in per_aten if "attention" in str(op)}
    dense = sum(v for op, v in per_aten.items() if op not in attention_ops)
    tally.add(DENSE, dense)
    if attention_ops:
        tally.add(SDPA, sum(per_aten[op] for op in attention_ops))
    return tally
