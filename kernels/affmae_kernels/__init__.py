"""Neighbourhood-attention, weighted-merge and k-nearest-centroid ops for AFFMAE.

Use the dispatching functions exported here: CUDA tensors go to the Triton kernels, every
other device to the pure-PyTorch reference (`affmae_kernels.reference`). Force a backend with
the ``backend=`` argument or the environment variable ``AFFMAE_KERNELS=reference|triton``.
"""
from .dispatch import knn_centroids, neighborhood_attention, weighted_merge, triton_available

__all__ = ["neighborhood_attention", "weighted_merge", "knn_centroids", "triton_available"]
