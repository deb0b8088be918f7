"""Choose the Triton kernel or the PyTorch reference for each call.

Rule: ``backend="auto"`` (default, or ``AFFMAE_KERNELS`` unset/``auto``) takes Triton for CUDA
tensors when Triton imports, the reference otherwise (Triton is not even imported for CPU/MPS
tensors). ``"triton"`` forces the kernels (on CPU that only works under ``TRITON_INTERPRET=1``,
set before the first Triton call); ``"reference"`` forces PyTorch.

``AFFMAE_KERNELS_DEBUG=1`` checks that every neighbour index is in range (both backends; one
device sync per call) and makes the Triton kernels write into NaN-poisoned buffers.
``AFFMAE_KERNELS_DKDV=atomic|reverse`` picks how the Triton backward accumulates dk/dv.
"""
from __future__ import annotations

import functools
import os

import torch

from . import reference

BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=1)
def _triton_module():
    try:
        from . import triton_ops  # noqa: PLC0415  (imports triton)
    except ImportError:
        return None
    return triton_ops


def triton_available() -> bool:
    """True when the Triton kernels can be imported in this environment."""
    return _triton_module() is not None


def _resolve(backend: str | None, tensor: torch.Tensor, op: str):
    choice = (backend or os.environ.get("AFFMAE_KERNELS", "auto")).lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}: use one of {BACKENDS}")
    if choice == "reference":
        return None
    if choice == "auto" and not tensor.is_cuda:
        return None
    module = _triton_module()
    if choice == "triton":
        if module is None or not hasattr(module, op):
            raise RuntimeError(f"backend 'triton' requested for {op}, but the Triton kernels are not available here")
        return getattr(module, op)
    if module is not None and hasattr(module, op):
        return getattr(module, op)
    return None


def _debug_enabled() -> bool:
    return os.environ.get("AFFMAE_KERNELS_DEBUG", "0").lower() not in ("", "0", "false", "no")


def neighborhood_attention(q, k, v, idx, bias=None, valid=None, blank_k=None, blank_v=None, scale=None, *, backend=None):
    """See `affmae_kernels.reference.neighborhood_attention` for shapes and semantics."""
    kernel = _resolve(backend, q, "neighborhood_attention")
    if kernel is None and _debug_enabled():
        reference.check_index_range(idx, k.shape[2])
    fn = kernel or reference.neighborhood_attention
    return fn(q, k, v, idx, bias=bias, valid=valid, blank_k=blank_k, blank_v=blank_v, scale=scale)


def weighted_merge(weights, feat, idx, *, backend=None):
    """See `affmae_kernels.reference.weighted_merge`."""
    kernel = _resolve(backend, feat, "weighted_merge")
    if kernel is None and _debug_enabled():
        reference.check_index_range(idx, feat.shape[1])
    return (kernel or reference.weighted_merge)(weights, feat, idx)


def knn_centroids(query_pos, centroid_pos, k, centroid_valid=None, *, backend=None):
    """See `affmae_kernels.reference.knn_centroids`."""
    kernel = _resolve(backend, query_pos, "knn_centroids")
    return (kernel or reference.knn_centroids)(query_pos, centroid_pos, k, centroid_valid)
