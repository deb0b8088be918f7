"""Choose the Triton kernel or the PyTorch reference for each call, then run the custom op.

Rule: ``backend="auto"`` takes Triton for CUDA tensors when Triton imports and the kernels take
the inputs (dtype, head dim, neighbourhood size), the reference otherwise (Triton is not even
imported for CPU/MPS tensors). ``"triton"`` forces the kernels (on CPU that only works under
``TRITON_INTERPRET=1``, set before the first Triton call) and raises when they cannot serve the
call; ``"reference"`` forces PyTorch. Every refusal of Triton is logged once per reason on the
``affmae_kernels`` logger.

The backend comes from the ``backend=`` argument, else from `affmae_kernels.settings`
(`kernel_settings` context, else ``AFFMAE_KERNELS`` read once); so do ``debug`` (index range
checks, one device sync per call; NaN-poisoned kernel outputs), the dk/dv mode and the tiles.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from . import ops, reference
from .settings import BACKENDS, KernelSettings, current_settings, log_once


def triton_available() -> bool:
    """True when the Triton kernels can be imported in this environment."""
    return ops.triton_kernels() is not None


def _requested(backend: str | None, settings: KernelSettings) -> str:
    choice = (backend or settings.backend).lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}: use one of {BACKENDS}")
    return choice


def choose_backend(op: str, requested: str, tensor: torch.Tensor, refusal: Callable[[object], str | None]) -> str:
    """``"triton"`` or ``"reference"`` for one call of ``op``.

    ``refusal(triton_ops)`` says why the kernels cannot take the call's inputs (None if they
    can). A refused ``"triton"`` request raises with the reason; a refused ``"auto"`` falls back
    to the reference. Either way the reason is logged once.
    """
    if requested == "reference" or (requested == "auto" and not tensor.is_cuda):
        return "reference"
    module = ops.triton_kernels()
    reason = "Triton is not installed or does not import" if module is None else refusal(module)
    if reason is None:
        return "triton"
    outcome = "refused" if requested == "triton" else "not used, falling back to the reference"
    log_once(logging.WARNING, op, f"affmae_kernels: Triton backend {outcome} for {op}: {reason}")
    if requested == "triton":
        if module is None:
            raise RuntimeError(f"backend 'triton' requested for {op}, but the Triton kernels are not available here")
        raise ValueError(reason)
    return "reference"


def neighborhood_attention(q, k, v, idx, bias=None, valid=None, blank_k=None, blank_v=None, scale=None, *,
                           backend: str | None = None) -> torch.Tensor:
    """See `affmae_kernels.reference.neighborhood_attention` for shapes and semantics."""
    settings = current_settings()
    requested = _requested(backend, settings)
    reference.check_attention_inputs(q, k, v, idx, bias, valid, blank_k, blank_v)
    chosen = choose_backend("neighborhood_attention", requested, q,
                            lambda tops: tops.attention_refusal(q, k, idx, bias, blank_k, blank_v))
    if chosen == "triton":
        return ops.triton_kernels().neighborhood_attention(q, k, v, idx, bias=bias, valid=valid, blank_k=blank_k,
                                                           blank_v=blank_v, scale=scale)
    if settings.debug:
        reference.check_index_range(idx, k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return ops.neighborhood_attention(q, k, v, idx, bias, valid, blank_k, blank_v, scale, backend="reference",
                                      settings=settings)


def weighted_merge(weights, feat, idx, *, backend: str | None = None) -> torch.Tensor:
    """See `affmae_kernels.reference.weighted_merge`."""
    settings = current_settings()
    requested = _requested(backend, settings)
    reference.check_merge_inputs(weights, feat, idx)
    chosen = choose_backend("weighted_merge", requested, feat, lambda tops: tops.merge_refusal(weights, feat))
    if chosen == "triton":
        return ops.triton_kernels().weighted_merge(weights, feat, idx)
    if settings.debug:
        reference.check_index_range(idx, feat.shape[1])
    return ops.weighted_merge(weights, feat, idx, backend="reference", debug=settings.debug)


def knn_centroids(query_pos, centroid_pos, k, centroid_valid=None, *, backend: str | None = None) -> torch.Tensor:
    """See `affmae_kernels.reference.knn_centroids`."""
    settings = current_settings()
    requested = _requested(backend, settings)
    reference.check_knn_inputs(query_pos, centroid_pos, k)
    chosen = choose_backend("knn_centroids", requested, query_pos, lambda tops: tops.knn_refusal(query_pos, k))
    if chosen == "triton":
        return ops.triton_kernels().knn_centroids(query_pos, centroid_pos, k, centroid_valid)
    return ops.knn_centroids(query_pos, centroid_pos, k, centroid_valid, backend="reference", debug=settings.debug)
