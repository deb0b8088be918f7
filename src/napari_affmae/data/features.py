"""Per-pixel filter features of one slice, as ilastik's pixel classifier computes them.

`filter_features` is the ilastik-style bank used by the ``rf_filters`` benchmark arm and by the
live preview: scikit-image's `multiscale_basic_features` with intensity (Gaussian), edges
(Sobel of the Gaussian) and texture (Hessian eigenvalues of the Gaussian) at ``FILTER_SIGMAS``
(1 to 16 px, 5 scales, log-spaced) -> 4 features per scale, 20 in all.

`texture_features` adds what that bank lacks for textured organelles (mitochondria with cristae
against dark but plain cytoplasm): the local standard deviation at the same 5 scales and
differences of Gaussians (sigma vs 2 sigma, sigma = 1-8 px) -> 9 features.

Input: one normalised slice ``[Y, X]`` (float); output ``[Y, X, F]`` float32, channels last (the
layout scikit-learn wants after a reshape to ``[Y * X, F]``).
"""
from __future__ import annotations

import numpy as np

FILTER_SIGMA_MIN = 1.0  # px
FILTER_SIGMA_MAX = 16.0  # px
FILTER_NUM_SIGMA = 5
FILTERS_PER_SIGMA = 4  # intensity, edges, 2 Hessian eigenvalues
N_FILTER_FEATURES = FILTERS_PER_SIGMA * FILTER_NUM_SIGMA
DOG_SIGMAS = (1.0, 2.0, 4.0, 8.0)  # px; each against twice its sigma
N_TEXTURE_FEATURES = FILTER_NUM_SIGMA + len(DOG_SIGMAS)


def filter_features(image: np.ndarray) -> np.ndarray:
    """Multiscale intensity / edge / texture features of a 2D slice ``[Y, X]`` -> ``[Y, X, 20]`` float32."""
    from skimage.feature import multiscale_basic_features  # noqa: PLC0415  (scikit-image import is slow)

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"filter features need one 2D slice [Y, X]; got shape {image.shape}")
    features = multiscale_basic_features(image, intensity=True, edges=True, texture=True,
                                         sigma_min=FILTER_SIGMA_MIN, sigma_max=FILTER_SIGMA_MAX,
                                         num_sigma=FILTER_NUM_SIGMA, channel_axis=None)
    return np.ascontiguousarray(features, dtype=np.float32)


def filter_sigmas() -> np.ndarray:
    """The 5 log-spaced scales of the filter bank, in px."""
    return np.logspace(np.log2(FILTER_SIGMA_MIN), np.log2(FILTER_SIGMA_MAX), num=FILTER_NUM_SIGMA, base=2)


def filter_feature_names() -> list[str]:
    """Names of the `filter_features` channels, in order (for reports and feature importances)."""
    return [f"{kind} s{s:.3g}" for s in filter_sigmas() for kind in ("gaussian", "edges", "hessian1", "hessian2")]


def texture_features(image: np.ndarray) -> np.ndarray:
    """Local standard deviation at the filter scales and differences of Gaussians of a 2D slice
    ``[Y, X]`` -> ``[Y, X, 9]`` float32 (Gaussian windows, reflected at the border)."""
    from scipy import ndimage  # noqa: PLC0415

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"texture features need one 2D slice [Y, X]; got shape {image.shape}")
    out = np.empty((*image.shape, N_TEXTURE_FEATURES), np.float32)
    for i, sigma in enumerate(filter_sigmas()):
        mean = ndimage.gaussian_filter(image, sigma, mode="reflect")
        mean_sq = ndimage.gaussian_filter(image * image, sigma, mode="reflect")
        out[..., i] = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    for j, sigma in enumerate(DOG_SIGMAS):
        out[..., FILTER_NUM_SIGMA + j] = (ndimage.gaussian_filter(image, sigma, mode="reflect")
                                          - ndimage.gaussian_filter(image, 2 * sigma, mode="reflect"))
    return out


def texture_feature_names() -> list[str]:
    """Names of the `texture_features` channels, in order."""
    return [f"local std s{s:.3g}" for s in filter_sigmas()] + [f"DoG s{s:.3g}-{2 * s:.3g}" for s in DOG_SIGMAS]
