"""FLOP counts of whole models with ``torch.utils.flop_counter.FlopCounterMode``.

Convention (used for every family, stated on the benchmark page):

* One FLOP = one multiply or one add; a multiply-accumulate is 2 FLOPs.
* Counted: matrix products and convolutions (what ``FlopCounterMode`` counts: ``mm``, ``addmm``,
  ``bmm``, ``convolution`` and their backward), attention, the neighbourhood ops of AFFMAE and the
  k-nearest-centroid distances. Not counted: element-wise work (softmax, GELU, LayerNorm, bias
  adds, masking), sorting / top-k, gathers and scatters - for every family alike.
* A training step is forward + loss + backward, counted op by op as executed (roughly 3x the
  forward: each product of a forward needs two in the backward, one per operand).

AFFMAE's ops are ``torch.library`` custom ops (``affmae::*``) whose FLOP formulas are registered
with the counter (`affmae_kernels.flops`, re-exported here; ``B`` batch, ``H`` heads, ``Nq``
queries, ``M`` neighbours, ``D`` head dim, ``G`` merge groups, ``C`` channels, ``Nc`` centroids):

* dense attention (``scaled_dot_product_attention``): torch's own formulas,
  forward ``4 B H Nq Nk D``, backward 2.5x that (flash style: the scores are recomputed);
  on CPU the counter has no entry for the CPU flash kernel, so formulas are added for it.
* neighbourhood attention: forward ``2 B H Nq D (M + 1)`` (QK^T over M neighbours and the
  blank key) ``+ 2 B H Nq M D`` (PV); the blank value enters by a scaled add (element-wise, not
  counted), so forward ~ ``4 B H Nq M D``. Backward = 2x the forward products + one recomputed
  QK^T, the same convention as torch's dense-attention backward and what the reference's chunked
  backward and the Triton kernel execute. In cluster mode ``Nq`` is the padded query count.
* weighted merge: forward ``2 B N' M G C``, backward 2x forward.
* k nearest centroids: ``B Nq Nc (3 d - 1)`` with ``d = 2`` coordinates (d subtractions, d
  squares, d - 1 additions per query-centroid distance); the sort is not counted; no backward.

`count_flops` runs a function (a forward, or a forward + backward) under ``FlopCounterMode`` and
returns a `FlopCount`.

* *Stand-in* mode (default, what the benchmark reports): the ``affmae::`` ops and dense attention
  run as shape-only stand-ins that return zeros (and zero gradients) and are counted by their
  formulas; floating-point activations saved for the backward are kept as shapes only. Counting
  a 2048^2 training step then costs about the time and memory of a cheap forward.
* *Exact* mode (the check): everything runs for real - the ``affmae::`` ops on the PyTorch
  reference backend, SDPA through the counter (with formulas added for the CPU flash kernel) -
  and only what the counter cannot see is added: the recomputed QK^T where SDPA's math fallback
  keeps the probabilities instead. The tests check that both modes give the same total, and
  (tests/bench) that each registered formula equals the products the reference executes.

Dense attention is intercepted with a ``TorchFunctionMode`` and the ``affmae::`` stand-ins with a
``TorchDispatchMode``: nothing is re-bound in any module.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from affmae_kernels import dispatch  # noqa: F401  (the dispatching ops, for callers of this module)
from affmae_kernels import ops as kernel_ops
from affmae_kernels.flops import knn_flops, neighborhood_attention_flops, weighted_merge_flops
from affmae_kernels.settings import kernel_settings

__all__ = ["FlopCount", "count_flops", "shape_only_neighborhood_ops", "neighborhood_attention_flops",
           "weighted_merge_flops", "knn_flops", "sdpa_flops", "DENSE", "SDPA", "NEIGHBORHOOD", "MERGE", "KNN",
           "SDPA_RECOMPUTE"]

kernel_ops.register_flop_formulas()

#: Op classes of a `FlopCount` breakdown.
DENSE = "dense"  # what FlopCounterMode counts: linear layers, convolutions, other matmuls
SDPA = "dense_attention"
NEIGHBORHOOD = "neighborhood_attention"
MERGE = "weighted_merge"
KNN = "knn_centroids"
SDPA_RECOMPUTE = "dense_attention_recompute"  # exact mode only: SDPA's math fallback on CPU

#: Counter key (op packet) -> op class, for the custom ops.
_KERNEL_CLASS = {packet: name for name, packets in kernel_ops.OPS.items() for packet in packets}
#: Forward ops of the custom ops (one per call of a dispatching function).
_KERNEL_FORWARD = {packets[0]: name for name, packets in kernel_ops.OPS.items()}

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
    """Shape-only dense attention: zeros out ``[..., Nq, Dv]``, zero gradients, analytic FLOPs."""

    @staticmethod
    def forward(ctx, tally: FlopCount, flops_fwd: int, flops_bwd: int, q, k, v, mask):
        ctx.tally, ctx.flops_bwd = tally, flops_bwd
        ctx.save_for_backward(q, k, v, mask)
        tally.add(SDPA, flops_fwd, call=True)
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))

    @staticmethod
    def backward(ctx, grad_out):
        ctx.tally.add(SDPA, ctx.flops_bwd)
        return (None, None, None) + _zeros_like_needed(ctx, list(ctx.saved_tensors))


class _DenseAttention(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention``: a stand-in (default) or the real call (exact)."""

    def __init__(self, tally: FlopCount, exact: bool, counter: FlopCounterMode) -> None:
        super().__init__()
        self.tally, self.exact, self.counter = tally, exact, counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        fwd, bwd = sdpa_flops(tuple(query.shape), tuple(key.shape), tuple(value.shape))
        if not self.exact:  # the mask goes in too: a learned bias must still receive a gradient
            mask = attn_mask if attn_mask is not None and attn_mask.is_floating_point() else None
            return _AttentionStandIn.apply(self.tally, fwd, bwd, query, key, value, mask)
        before = self._fused_attention_flops()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale, **kwargs)
        self.tally.calls[SDPA] = self.tally.calls.get(SDPA, 0) + 1
        if self._fused_attention_flops() == before and out.requires_grad:
            # no fused kernel ran: the math fallback (bmm + softmax, counted as bmm) keeps the
            # probabilities, so its backward lacks the recomputed QK^T of the convention
            recompute = bwd - 2 * fwd
            out.register_hook(lambda grad: self.tally.add(SDPA_RECOMPUTE, recompute))
        return out

    def _fused_attention_flops(self) -> int:
        counts = self.counter.get_flop_counts().get("Global", {})
        return sum(v for op, v in counts.items() if "attention" in str(op) and op not in _KERNEL_CLASS)


def _zeros_or_placeholder(like: torch.Tensor | None, wanted: bool, placeholder: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(like.shape) if (wanted and like is not None) else placeholder.new_empty(0)


def _na_forward_stand_in(q, k, v, idx, bias, valid, blank_k, blank_v, *options):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_zeros(q.shape[:-1] + (v.shape[-1],)), q.new_zeros(q.shape[:3], dtype=lse_dtype)


def _na_backward_stand_in(grad_out, q, k, v, idx, bias, valid, blank_k, blank_v, out, lse, *options):
    need = options[-1]
    return tuple(_zeros_or_placeholder(t, wanted, q) for t, wanted in zip((q, k, v, bias, blank_k, blank_v), need))


def _merge_forward_stand_in(weights, feat, idx, *options):
    b, n_out, _, groups = weights.shape
    return feat.new_zeros(b, n_out, groups, feat.shape[-1])


def _merge_backward_stand_in(grad_out, weights, feat, idx, backend, debug, need_weights, need_feat):
    return _zeros_or_placeholder(weights, need_weights, weights), _zeros_or_placeholder(feat, need_feat, feat)


def _knn_stand_in(query_pos, centroid_pos, k, *options):
    # shape-only: the first k centroids (valid indices; which ones does not change any count)
    b, nq = query_pos.shape[:2]
    return torch.arange(k, device=query_pos.device).expand(b, nq, k).contiguous()


_STAND_INS = {
    torch.ops.affmae.na_forward: _na_forward_stand_in,
    torch.ops.affmae.na_backward: _na_backward_stand_in,
    torch.ops.affmae.weighted_merge: _merge_forward_stand_in,
    torch.ops.affmae.weighted_merge_backward: _merge_backward_stand_in,
    torch.ops.affmae.knn_centroids: _knn_stand_in,
}


class _KernelOps(TorchDispatchMode):
    """Tallies calls of the ``affmae::`` ops; with ``shape_only`` runs them as stand-ins (zeros)."""

    def __init__(self, tally: FlopCount, shape_only: bool) -> None:
        super().__init__()
        self.tally, self.shape_only = tally, shape_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in _KERNEL_FORWARD:
            name = _KERNEL_FORWARD[packet]
            self.tally.calls[name] = self.tally.calls.get(name, 0) + 1
        if self.shape_only and packet in _STAND_INS:
            return _STAND_INS[packet](*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def shape_only_neighborhood_ops() -> Iterator[FlopCount]:
    """Run AFFMAE's neighbourhood attention, weighted merge and k-NN as shape-only stand-ins.

    The ops keep what a fused kernel keeps for its backward (q, k, v, bias, blank, lse; merge
    weights and features) and never build the ``[B, H, Nq, M, D]`` neighbour tensors of the
    reference backend, so a model's peak memory under this context is a lower bound for fused
    kernels. Outputs are zeros: use it for cost measurements only. Yields a tally of the calls
    (``calls``); FLOPs are counted by `count_flops`.
    """
    tally = FlopCount()
    with kernel_settings(backend="reference"), _KernelOps(tally, shape_only=True):
        yield tally


def _pack_shape(t: torch.Tensor):
    # floating activations only: bool masks and indices select elements, so they keep their values
    return (t.shape, t.dtype, t.device) if t.is_floating_point() else t


def _unpack_zeros(packed) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    shape, dtype, device = packed
    return torch.zeros(shape, dtype=dtype, device=device)


def _op_class(op) -> str:
    if op in _KERNEL_CLASS:
        return _KERNEL_CLASS[op]
    return SDPA if "attention" in str(op) else DENSE


def count_flops(fn: Callable[[], object], exact: bool = False) -> FlopCount:
    """FLOPs of running ``fn()`` (see the module docstring for the convention and the two modes).

    ``fn`` may run a forward only (wrap it in ``torch.no_grad()`` for inference) or a forward and a
    backward; everything it executes is counted.
    """
    tally = FlopCount()
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping() if exact else {})
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernel_settings(backend="reference"))
        stack.enter_context(_DenseAttention(tally, exact, counter))
        if not exact:  # counts depend on shapes only: keep no activations for the backward
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_pack_shape, _unpack_zeros))
        stack.enter_context(_KernelOps(tally, shape_only=not exact))  # below the counter: sees what it passes on
        stack.enter_context(counter)
        fn()
    tally.add(DENSE, 0)
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        tally.add(_op_class(op), flops)
    return tally
