"""The kernel ops as ``torch.library`` custom ops (namespace ``affmae``).

Each op runs one backend, named by its ``backend`` argument (``"reference"`` or ``"triton"``,
chosen beforehand by `affmae_kernels.dispatch`), so the op itself reads no global state:

* ``affmae::na_forward`` -> (out ``[B, H, Nq, D]``, lse ``[B, H, Nq]``) and ``affmae::na_backward``
  -> (dq, dk, dv, dbias, dblank_k, dblank_v), linked by ``register_autograd``;
* ``affmae::weighted_merge`` and ``affmae::weighted_merge_backward``;
* ``affmae::knn_centroids`` (no gradient).

Every op has a fake (meta) implementation, so ``torch.compile`` traces models through them, and a
FLOP formula (`affmae_kernels.flops`) registered with ``torch.utils.flop_counter``, so
``FlopCounterMode`` counts them. A gradient the backward op was not asked for comes back as an
empty tensor (custom ops return tensors, never None).

The formulas are registered as soon as ``torch.utils.flop_counter`` is imported, not before:
that module imports Triton, which a CPU-only process (and the napari widgets, see
``napari_affmae.widgets._preload``) must not import early. `register_flop_formulas` does it; the
op wrappers call it whenever the flop counter is loaded, and add the formulas to counters that
were built before the registration.
"""
import functools
import sys
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from . import reference
from .flops import knn_flops, neighborhood_attention_flops, weighted_merge_flops
from .settings import KernelSettings, Tile

__all__ = ["neighborhood_attention", "weighted_merge", "knn_centroids", "triton_kernels", "OPS",
           "register_flop_formulas"]


@functools.lru_cache(maxsize=1)
def triton_kernels():
    """`affmae_kernels.triton_ops`, or None when Triton does not import here (imported on first use)."""
    try:
        from . import triton_ops  # noqa: PLC0415  (imports triton)
    except ImportError:
        return None
    return triton_ops


def _kernels():
    module = triton_kernels()
    if module is None:
        raise RuntimeError("the Triton kernels are not available here (Triton does not import)")
    return module


def _tile(spec: str) -> Tile | None:
    return Tile.parse(spec) if spec else None


def _tile_spec(tile: Tile | None) -> str:
    return "" if tile is None else tile.spec()


def _placeholder(like: Tensor) -> Tensor:
    """Stands for a gradient that was not asked for."""
    return like.new_empty(0)


# ------------------------------------------------------------------------------ attention

@torch.library.custom_op("affmae::na_forward", mutates_args=())
def _na_forward(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Optional[Tensor], valid: Optional[Tensor],
                blank_k: Optional[Tensor], blank_v: Optional[Tensor], scale: float, backend: str, dkdv: str,
                debug: bool, token_tile: str, cluster_tile: str) -> tuple[Tensor, Tensor]:
    """-> out ``[B, H, Nq, D]`` (q's dtype), lse ``[B, H, Nq]`` (float32; float64 for float64 q)."""
    if backend == "triton":
        return _kernels().attention_forward(q, k, v, idx, bias, valid, blank_k, blank_v, scale, debug=debug,
                                            token=_tile(token_tile), cluster=_tile(cluster_tile))
    return reference.attention_forward(q, k, v, idx, bias, valid, blank_k, blank_v, scale)


@_na_forward.register_fake
def _na_forward_fake(q, k, v, idx, bias, valid, blank_k, blank_v, scale, backend, dkdv, debug, token_tile,
                     cluster_tile):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("affmae::na_backward", mutates_args=())
def _na_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Optional[Tensor],
                 valid: Optional[Tensor], blank_k: Optional[Tensor], blank_v: Optional[Tensor], out: Tensor,
                 lse: Tensor, scale: float, backend: str, dkdv: str, debug: bool, token_tile: str,
                 cluster_tile: str, need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dbias, dblank_k, dblank_v); ``need`` flags them (same order)."""
    if backend == "triton":
        grads = _kernels().attention_backward(grad_out, q, k, v, idx, bias, valid, blank_k, blank_v, out, lse,
                                              scale, tuple(need), dkdv=dkdv, debug=debug,
                                              token=_tile(token_tile), cluster=_tile(cluster_tile))
    else:
        grads = reference.attention_backward(grad_out, q, k, v, idx, bias, valid, blank_k, blank_v, lse, scale,
                                             tuple(need))
    like = (q, k, v, bias, blank_k, blank_v)
    return tuple(g if (wanted and t is not None) else _placeholder(q) for g, t, wanted in zip(grads, like, need))


@_na_backward.register_fake
def _na_backward_fake(grad_out, q, k, v, idx, bias, valid, blank_k, blank_v, out, lse, scale, backend, dkdv,
                      debug, token_tile, cluster_tile, need):
    like = (q, k, v, bias, blank_k, blank_v)
    return tuple(t.new_empty(t.shape) if (wanted and t is not None) else _placeholder(q)
                 for t, wanted in zip(like, need))


def _na_setup_context(ctx, inputs, output) -> None:
    q, k, v, idx, bias, valid, blank_k, blank_v, scale, backend, dkdv, debug, token_tile, cluster_tile = inputs
    out, lse = output
    kept_out = out if backend == "triton" else None  # the reference backward does not read out
    ctx.save_for_backward(q, k, v, idx, bias, valid, blank_k, blank_v, kept_out, lse)
    ctx.options = (scale, backend, dkdv, debug, token_tile, cluster_tile)
    ctx.mark_non_differentiable(lse)


def _na_autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, idx, bias, valid, blank_k, blank_v, out, lse = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[0], n[1], n[2], n[4] and bias is not None, n[6] and blank_k is not None, n[7] and blank_v is not None]
    out = _placeholder(q) if out is None else out
    grads = torch.ops.affmae.na_backward(grad_out, q, k, v, idx, bias, valid, blank_k, blank_v, out, lse,
                                         *ctx.options, need)
    dq, dk, dv, dbias, dbk, dbv = (g if wanted else None for g, wanted in zip(grads, need))
    return dq, dk, dv, None, dbias, None, dbk, dbv, None, None, None, None, None, None


_na_forward.register_autograd(_na_autograd_backward, setup_context=_na_setup_context)


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, bias: Tensor | None,
                           valid: Tensor | None, blank_k: Tensor | None, blank_v: Tensor | None, scale: float, *,
                           backend: str, settings: KernelSettings) -> Tensor:
    """Run ``affmae::na_forward`` on checked inputs -> ``[B, H, Nq, D]`` (differentiable)."""
    _sync_flop_formulas()
    out, _ = torch.ops.affmae.na_forward(q, k, v, idx, bias, valid, blank_k, blank_v, float(scale), backend,
                                         settings.dkdv, settings.debug, _tile_spec(settings.token_tile),
                                         _tile_spec(settings.cluster_tile))
    return out


# ------------------------------------------------------------------------------ weighted merge

@torch.library.custom_op("affmae::weighted_merge", mutates_args=())
def _weighted_merge(weights: Tensor, feat: Tensor, idx: Tensor, backend: str, debug: bool) -> Tensor:
    """weights ``[B, N', M, G]``, feat ``[B, N, C]``, idx ``[B, N', M]`` -> ``[B, N', G, C]`` (feat's dtype)."""
    if backend == "triton":
        return _kernels().merge_forward(weights, feat, idx, debug=debug)
    return reference.merge_forward(weights, feat, idx)


@_weighted_merge.register_fake
def _weighted_merge_fake(weights, feat, idx, backend, debug):
    b, n_out, _, groups = weights.shape
    return feat.new_empty((b, n_out, groups, feat.shape[-1]))


@torch.library.custom_op("affmae::weighted_merge_backward", mutates_args=())
def _weighted_merge_backward(grad_out: Tensor, weights: Tensor, feat: Tensor, idx: Tensor, backend: str,
                             debug: bool, need_weights: bool, need_feat: bool) -> tuple[Tensor, Tensor]:
    """-> (dweights ``[B, N', M, G]``, dfeat ``[B, N, C]``); empty where not needed."""
    if backend == "triton":
        dw, dfeat = _kernels().merge_backward(grad_out, weights, feat, idx, need_weights, need_feat, debug=debug)
    else:
        dw, dfeat = reference.merge_backward(grad_out, weights, feat, idx, need_weights, need_feat)
    return (dw if need_weights else _placeholder(weights)), (dfeat if need_feat else _placeholder(feat))


@_weighted_merge_backward.register_fake
def _weighted_merge_backward_fake(grad_out, weights, feat, idx, backend, debug, need_weights, need_feat):
    return (weights.new_empty(weights.shape) if need_weights else _placeholder(weights),
            feat.new_empty(feat.shape) if need_feat else _placeholder(feat))


def _merge_setup_context(ctx, inputs, output) -> None:
    weights, feat, idx, backend, debug = inputs
    ctx.save_for_backward(weights, feat, idx)
    ctx.options = (backend, debug)


def _merge_autograd_backward(ctx, grad_out):
    weights, feat, idx = ctx.saved_tensors
    need_w, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dw, dfeat = torch.ops.affmae.weighted_merge_backward(grad_out, weights, feat, idx, *ctx.options, need_w, need_f)
    return (dw if need_w else None), (dfeat if need_f else None), None, None, None


_weighted_merge.register_autograd(_merge_autograd_backward, setup_context=_merge_setup_context)


def weighted_merge(weights: Tensor, feat: Tensor, idx: Tensor, *, backend: str, debug: bool) -> Tensor:
    """Run ``affmae::weighted_merge`` on checked inputs -> ``[B, N', G, C]`` (differentiable)."""
    _sync_flop_formulas()
    return torch.ops.affmae.weighted_merge(weights, feat, idx, backend, debug)


# ------------------------------------------------------------------------------ k nearest centroids

@torch.library.custom_op("affmae::knn_centroids", mutates_args=())
def _knn_centroids(query_pos: Tensor, centroid_pos: Tensor, k: int, centroid_valid: Optional[Tensor],
                   backend: str, debug: bool) -> Tensor:
    """query_pos ``[B, Nq, P]``, centroid_pos ``[B, Nc, P]`` -> int64 ``[B, Nq, k]``, nearest first."""
    if backend == "triton":
        return _kernels().knn_forward(query_pos, centroid_pos, k, centroid_valid, debug=debug)
    return reference.knn_centroids(query_pos, centroid_pos, k, centroid_valid)


@_knn_centroids.register_fake
def _knn_centroids_fake(query_pos, centroid_pos, k, centroid_valid, backend, debug):
    return query_pos.new_empty((query_pos.shape[0], query_pos.shape[1], k), dtype=torch.int64)


def knn_centroids(query_pos: Tensor, centroid_pos: Tensor, k: int, centroid_valid: Tensor | None, *,
                  backend: str, debug: bool) -> Tensor:
    """Run ``affmae::knn_centroids`` on checked inputs (positions carry no gradient)."""
    _sync_flop_formulas()
    return torch.ops.affmae.knn_centroids(query_pos.detach(), centroid_pos.detach(), int(k), centroid_valid,
                                          backend, debug)


# ------------------------------------------------------------------------------ FLOP formulas

def _na_shape(q_shape, idx_shape, blank_k_shape) -> tuple[int, int, int, int, int, bool]:
    b, h, nq, d = q_shape
    return b, h, nq, idx_shape[-1], d, blank_k_shape is not None


def _na_forward_flop(q_shape, k_shape, v_shape, idx_shape, bias_shape, valid_shape, blank_k_shape, *args,
                     out_shape=None, **kwargs) -> int:
    return neighborhood_attention_flops(*_na_shape(q_shape, idx_shape, blank_k_shape))[0]


def _na_backward_flop(grad_out_shape, q_shape, k_shape, v_shape, idx_shape, bias_shape, valid_shape,
                      blank_k_shape, *args, out_shape=None, **kwargs) -> int:
    return neighborhood_attention_flops(*_na_shape(q_shape, idx_shape, blank_k_shape))[1]


def _merge_flops(weights_shape, feat_shape) -> tuple[int, int]:
    b, n_out, m, groups = weights_shape
    return weighted_merge_flops(b, n_out, m, groups, feat_shape[-1])


def _merge_forward_flop(weights_shape, feat_shape, *args, out_shape=None, **kwargs) -> int:
    return _merge_flops(weights_shape, feat_shape)[0]


def _merge_backward_flop(grad_out_shape, weights_shape, feat_shape, *args, out_shape=None, **kwargs) -> int:
    return _merge_flops(weights_shape, feat_shape)[1]


def _knn_flop(query_shape, centroid_shape, *args, out_shape=None, **kwargs) -> int:
    b, nq, dims = query_shape
    return knn_flops(b, nq, centroid_shape[1], dims)


#: The op packets, for FLOP breakdowns by op (``FlopCounterMode.get_flop_counts()`` keys).
OPS = {
    "neighborhood_attention": (torch.ops.affmae.na_forward, torch.ops.affmae.na_backward),
    "weighted_merge": (torch.ops.affmae.weighted_merge, torch.ops.affmae.weighted_merge_backward),
    "knn_centroids": (torch.ops.affmae.knn_centroids,),
}

#: Shape-level FLOP formula of every op (arguments: the op's, tensors replaced by their shapes).
FLOP_FORMULAS = {
    torch.ops.affmae.na_forward: _na_forward_flop,
    torch.ops.affmae.na_backward: _na_backward_flop,
    torch.ops.affmae.weighted_merge: _merge_forward_flop,
    torch.ops.affmae.weighted_merge_backward: _merge_backward_flop,
    torch.ops.affmae.knn_centroids: _knn_flop,
}


def register_flop_formulas() -> None:
    """Register `FLOP_FORMULAS` with ``torch.utils.flop_counter`` (idempotent; imports it).

    Also adds them to the active ``FlopCounterMode`` instances, which copied the registry when
    they were built (possibly before this registration).
    """
    from torch.utils import flop_counter  # noqa: PLC0415  (imports Triton where installed)

    for packet, formula in FLOP_FORMULAS.items():
        if packet not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(packet)(formula)
    for mode in _get_current_dispatch_mode_stack():
        registry = getattr(getattr(mode, "counter", None), "flop_registry", None)
        if isinstance(registry, dict):
            for packet in FLOP_FORMULAS:
                registry.setdefault(packet, flop_counter.flop_registry[packet])


def _sync_flop_formulas() -> None:
    """`register_flop_formulas` once the flop counter is loaded (a no-op before)."""
    if "torch.utils.flop_counter" in sys.modules:
        register_flop_formulas()


_sync_flop_formulas()
