"""Per-pixel filter features of one slice, as ilastik's pixel classifier computes them.

`filter_features` is the ilastik-style bank used by the ``rf_filters`` benchmark arm and by the
live preview: scikit-image's `multiscale_basic_features` with intensity (Gaussian), edges
(Sobel of the Gaussian) and texture (Hessian eigenvalues of the Gaussian) at ``FILTER_SIGMAS``
(1 to 16 px, 5 scales, log-spaced) -> 4 features per scale, 20 in all.

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


def filter_feature_names() -> list[str]:
    """Names of the `filter_features` channels, in order (for reports and feature importances)."""
    sigmas = np.logspace(np.log2(FILTER_SIGMA_MIN), np.log2(FILTER_SIGMA_MAX), num=FILTER_NUM_SIGMA, base=2)
    return [f"{kind} s{s:.3g}" for s in sigmas for kind in ("gaussian", "edges", "hessian1", "hessian2")]
