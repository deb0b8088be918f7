"""Data pipeline pieces (a leaf package: numpy/scipy, torch only where a tensor is passed in).

* `synthetic_em` / `sparse_strokes`: deterministic synthetic EM with dense labels, and scribbles.
* `compute_stats` / `apply_normalization` / `NormalizationStats`: robust percentile normalisation.
* `PatchSampler` / `LabeledPatchSampler`: seeded 2D crops from 2D/3D arrays (numpy, zarr, dask).
* `augment_pair` / `augment_batch` / `AugmentConfig`: flips, rot90, intensity jitter.
"""
from .augment import AugmentConfig, AugmentParams, augment_batch, augment_pair
from .normalize import NormalizationStats, apply_normalization, compute_stats
from .sampling import CropLocation, LabeledPatchSampler, PatchSampler, read_crop
from .strokes import sparse_strokes
from .synthetic import CLASS_NAMES, CYTOPLASM, MEMBRANE, MITOCHONDRION, synthetic_em

__all__ = [
    "CLASS_NAMES",
    "CYTOPLASM",
    "MEMBRANE",
    "MITOCHONDRION",
    "AugmentConfig",
    "AugmentParams",
    "CropLocation",
    "LabeledPatchSampler",
    "NormalizationStats",
    "PatchSampler",
    "apply_normalization",
    "augment_batch",
    "augment_pair",
    "compute_stats",
    "read_crop",
    "sparse_strokes",
    "synthetic_em",
]
