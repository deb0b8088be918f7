"""Neighbourhood-attention, weighted-merge and k-nearest-centroid ops for AFFMAE.

Use the dispatching functions exported here: CUDA tensors go to the Triton kernels, every
other device to the pure-PyTorch reference (`affmae_kernels.reference`). Each call runs one
``torch.library`` custom op (``affmae::*``, `affmae_kernels.ops`) with a registered FLOP formula.
Force a backend with the ``backend=`` argument, ``with kernel_settings(backend=...)``, or the
environment variable ``AFFMAE_KERNELS=reference|triton`` (read once; `affmae_kernels.settings`).
"""
from .dispatch import knn_centroids, neighborhood_attention, triton_available, weighted_merge
from .settings import KernelSettings, Tile, current_settings, kernel_settings

__all__ = ["neighborhood_attention", "weighted_merge", "knn_centroids", "triton_available", "KernelSettings",
           "Tile", "current_settings", "kernel_settings"]
