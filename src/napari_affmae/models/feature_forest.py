"""A fast pixel classifier on cached features: AFFMAE encoder stages + ilastik-style filters + a forest.

This is the model behind the Live preview (`engine.live`) and the package it saves, which
`engine.segment` and batch segmentation run like any segmentation package.

Per-pixel features of a normalised slice ``[Y, X]``:

* the 20 filter responses of `data.features.filter_features` (intensity, edges, Hessian at
  1-16 px), i.e. everything the ``rf_filters`` benchmark arm sees;
* with ``texture``, the 9 of `data.features.texture_features` (local standard deviation,
  differences of Gaussians);
* the AFFMAE encoder run once over the unmasked slice: each stage's tokens ``[N_i, C_i]`` (res2 on
  the full stride-8 lattice, res3..res5 on the merged, off-grid subsets) are projected to
  ``components`` channels by a fixed projection (principal axes of the first slice encoded),
  filled onto the lattice from the nearest token, and bilinearly upsampled to pixels.

The head is scikit-learn's `RandomForestClassifier`. The package stores no pickle: it keeps the
training pixels' feature vectors and classes as tensors and refits the forest (deterministic in
``seed``) when it is loaded.

**Prior correction.** Strokes paint each class about equally, but in EM the structure a lab
segments is usually a small share of the image, so a forest fitted on strokes calls too much of
the image "structure". `FeatureForest.adapt_priors` estimates the image's class shares from the
forest's own posteriors on unpainted pixels (``prior_iterations`` steps of the EM re-estimation of
Saerens, Latinne and Decaestecker, Neural Computation 2002; one step = the mean posterior) and
re-weights every posterior by ``(estimated share / painted share) ** prior_exponent``. Exponent 0
(the default) is ilastik's behaviour. The EM fixed point (many steps) is unstable with a forest's
over-confident posteriors: after correction strokes it drove the structure's share to zero; the
one-step estimate stays put.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.features import (N_FILTER_FEATURES, N_TEXTURE_FEATURES, filter_feature_names, filter_features,
                             texture_feature_names, texture_features)
from .affmae import SIZES as AFFMAE_SIZES
from .affmae import _build_parts, make_config
from .common import PATCH_SIZE
from .registry import register_model

PROBABILITY_FLOOR = 1e-4  # log-probabilities are clipped here so blended tile outputs stay finite


@dataclass
class FeatureForestConfig:
    """Feature and forest settings. ``encoder_size`` None = filters only (no AFFMAE features)."""

    encoder_size: str | None = "tiny"  # AFFMAE size whose encoder gives the learned features
    encoder_options: dict[str, Any] = field(default_factory=dict)  # AFFMAEConfig overrides (keep rate, ...)
    components: int = 4  # projected channels per encoder stage
    trees: int = 100
    min_samples_leaf: int = 1
    seed: int = 0
    n_samples: int = 0  # rows of the stored training set
    max_samples: int = 60_000  # training pixels kept (class-balanced, deterministic subsample)
    texture: bool = False  # add the 9 texture features
    prior_exponent: float = 0.0  # 0 = posteriors as fitted; 1 = re-weighted to the image's estimated class shares
    prior_iterations: int = 1  # EM steps of the share estimate (1 = the mean posterior)
    class_weights: list[float] = field(default_factory=list)  # per-class posterior weights (set by adapt_priors)

    def __post_init__(self) -> None:
        if self.encoder_size is not None and self.encoder_size not in AFFMAE_SIZES:
            raise ValueError(f"encoder_size must be one of {sorted(AFFMAE_SIZES)} or None; got {self.encoder_size!r}")
        if self.components < 1 or self.trees < 1 or self.min_samples_leaf < 1 or self.max_samples < 2:
            raise ValueError("components, trees and min_samples_leaf must be >= 1, max_samples >= 2")
        if self.n_samples < 0:
            raise ValueError(f"n_samples must be >= 0; got {self.n_samples}")
        check_prior_settings(self.prior_exponent, self.prior_iterations)
        if any(not w > 0 for w in self.class_weights):
            raise ValueError(f"class_weights must be positive; got {self.class_weights}")

    @property
    def n_stages(self) -> int:
        return 0 if self.encoder_size is None else len(AFFMAE_SIZES[self.encoder_size]["dims"])

    @property
    def n_features(self) -> int:
        return N_FILTER_FEATURES + N_TEXTURE_FEATURES * self.texture + self.n_stages * self.components


def check_prior_settings(exponent: float, iterations: int) -> None:
    """Refuse a prior-correction exponent outside [0, 1] or fewer than one EM step, saying which."""
    if not 0.0 <= exponent <= 1.0:
        raise ValueError(f"prior_exponent must be between 0 (no prior correction) and 1 (full correction); "
                         f"got {exponent}")
    if iterations < 1:
        raise ValueError(f"prior_iterations must be >= 1; got {iterations}")


def nearest_fill(values: torch.Tensor, pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Scatter token values ``[N, C]`` at lattice positions ``pos [N, 2]`` (y, x) onto an ``h x w``
    grid; cells without a token take the value of the nearest token -> ``[C, h, w]``."""
    from scipy import ndimage  # noqa: PLC0415

    c = values.shape[1]
    grid = torch.zeros(c, h, w, dtype=values.dtype)
    y, x = pos[:, 0].long().cpu(), pos[:, 1].long().cpu()
    grid[:, y, x] = values.t().cpu()
    empty = np.ones((h, w), bool)
    empty[y.numpy(), x.numpy()] = False
    if empty.any():
        _, (iy, ix) = ndimage.distance_transform_edt(empty, return_indices=True)
        grid = grid[:, torch.from_numpy(iy), torch.from_numpy(ix)]
    return grid


class FeatureForest(nn.Module):
    """Encoder + filter features -> random forest. ``forward``: x ``[B, 1, H, W]`` -> log-probabilities
    ``[B, K, H, W]`` (K = ``num_classes``; H, W any size, padded to the patch grid internally)."""

    def __init__(self, config: FeatureForestConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.encoder = None
        if config.encoder_size is not None:
            self.encoder, _ = _build_parts(make_config(config.encoder_size, **config.encoder_options))
            self.encoder.eval()
            dims = self.encoder.dims
            for i, dim in enumerate(dims):
                self.register_buffer(f"proj_mean_{i}", torch.zeros(dim))
                self.register_buffer(f"proj_axes_{i}", torch.zeros(dim, config.components))
        self.register_buffer("projection_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("train_x", torch.zeros(config.n_samples, config.n_features))
        self.register_buffer("train_y", torch.zeros(config.n_samples, dtype=torch.int64))
        self._forest = None

    # ------------------------------------------------------------------------------------------ features

    def feature_names(self) -> list[str]:
        texture = texture_feature_names() if self.config.texture else []
        return filter_feature_names() + texture + [f"res{i + 2} pc{j + 1}" for i in range(self.config.n_stages)
                                                   for j in range(self.config.components)]

    @torch.no_grad()
    def pixel_features(self, image: np.ndarray) -> np.ndarray:
        """Features of one normalised slice ``[Y, X]`` -> ``[Y, X, F]`` float32."""
        image = np.asarray(image, dtype=np.float32)
        parts = [filter_features(image)]
        if self.config.texture:
            parts.append(texture_features(image))
        if self.encoder is not None:
            parts.append(self.encoder_features(image))
        return np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    @torch.no_grad()
    def encoder_features(self, image: np.ndarray) -> np.ndarray:
        """Projected, upsampled encoder stages of a slice ``[Y, X]`` -> ``[Y, X, n_stages * components]``."""
        height, width = image.shape
        ph, pw = math.ceil(height / PATCH_SIZE) * PATCH_SIZE, math.ceil(width / PATCH_SIZE) * PATCH_SIZE
        x = torch.from_numpy(np.pad(image, ((0, ph - height), (0, pw - width)), mode="reflect"))[None, None]
        param = next(self.encoder.parameters())
        stages = self.encoder(x.to(param.device, param.dtype))
        if not bool(self.projection_ready):
            self._fit_projection([s.tokens[0].float().cpu() for s in stages])
        h, w = ph // PATCH_SIZE, pw // PATCH_SIZE
        maps = []
        for i, stage in enumerate(stages):
            tokens = stage.tokens[0].float().cpu()  # [N_i, C_i]
            projected = (tokens - getattr(self, f"proj_mean_{i}")) @ getattr(self, f"proj_axes_{i}")  # [N_i, r]
            maps.append(nearest_fill(projected, stage.pos[0].cpu(), h, w))  # [r, h, w]
        lattice = torch.cat(maps)[None]  # [1, S * r, h, w]
        full = F.interpolate(lattice, size=(ph, pw), mode="bilinear", align_corners=False)[0, :, :height, :width]
        return np.ascontiguousarray(full.permute(1, 2, 0).numpy(), dtype=np.float32)

    def _fit_projection(self, stage_tokens: list[torch.Tensor]) -> None:
        """Principal axes of each stage's tokens ``[N_i, C_i]`` (fixed from then on, stored in the package)."""
        r = self.config.components
        for i, tokens in enumerate(stage_tokens):
            mean = tokens.mean(0)
            centred = (tokens - mean).double()
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # rows = axes, by variance
            axes = vh[:r].t().float()  # [C_i, r]
            if axes.shape[1] < r:  # fewer tokens than components: pad with zero axes
                axes = torch.cat([axes, axes.new_zeros(axes.shape[0], r - axes.shape[1])], dim=1)
            getattr(self, f"proj_mean_{i}").copy_(mean)
            getattr(self, f"proj_axes_{i}").copy_(axes)
        self.projection_ready.fill_(True)

    # ------------------------------------------------------------------------------------------ forest

    def set_training_data(self, features: np.ndarray, classes: np.ndarray) -> None:
        """Store the training pixels ``features [N, F]`` with classes ``[N]`` (0..K-1) and fit the forest."""
        features = np.asarray(features, dtype=np.float32)
        classes = np.asarray(classes, dtype=np.int64)
        if features.ndim != 2 or features.shape[1] != self.config.n_features or len(classes) != len(features):
            raise ValueError(f"training data must be [N, {self.config.n_features}] features with N classes; got "
                             f"{features.shape} and {classes.shape}")
        self.config = replace(self.config, n_samples=len(features))
        self.train_x = torch.from_numpy(features).clone()
        self.train_y = torch.from_numpy(classes).clone()
        self._forest = None
        self.forest  # noqa: B018  (fit now, so errors surface here)

    @property
    def forest(self) -> Any:
        """The fitted `RandomForestClassifier` (refitted from the stored training pixels on first use)."""
        if self._forest is None:
            from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415

            y = self.train_y.numpy()
            present = np.unique(y)
            if len(present) < 2:
                raise ValueError("the forest needs painted pixels of at least two classes")
            forest = RandomForestClassifier(n_estimators=self.config.trees, min_samples_leaf=self.config.min_samples_leaf,
                                            random_state=self.config.seed, n_jobs=torch.get_num_threads())
            forest.fit(self.train_x.numpy(), y)
            self._forest = forest
        return self._forest

    def predict_proba(self, features: np.ndarray, chunk: int = 262_144, check: Callable[[], None] | None = None,
                      corrected: bool = True) -> np.ndarray:
        """Class probabilities ``[..., K]`` of features ``[..., F]`` (classes the forest never saw get 0),
        prior-corrected with ``class_weights`` unless ``corrected`` is False. ``check`` is called before every
        chunk of pixels (it may raise to stop early)."""
        flat = features.reshape(-1, features.shape[-1])
        out = np.zeros((len(flat), self.num_classes), np.float32)
        forest = self.forest
        weights = np.asarray(self.config.class_weights, np.float32) if corrected else np.empty(0)
        for start in range(0, len(flat), chunk):
            if check is not None:
                check()
            part = out[start:start + chunk]
            part[:, forest.classes_] = forest.predict_proba(flat[start:start + chunk])
            if len(weights) == self.num_classes:
                part *= weights
                part /= np.maximum(part.sum(1, keepdims=True), np.finfo(np.float32).tiny)
        return out.reshape(*features.shape[:-1], self.num_classes)

    def adapt_priors(self, unpainted: np.ndarray) -> np.ndarray:
        """Estimate the class shares of the image from features ``[M, F]`` of unpainted pixels and set
        ``class_weights`` (see the module docstring); returns the estimated shares ``[K]``."""
        painted = np.bincount(self.train_y.numpy(), minlength=self.num_classes) / max(len(self.train_y), 1)
        if self.config.prior_exponent == 0 or len(unpainted) == 0 or np.any(painted == 0):
            self.config = replace(self.config, class_weights=[])
            return painted
        posteriors = self.predict_proba(unpainted, corrected=False)
        shares = estimate_class_shares(posteriors, painted, iterations=self.config.prior_iterations)
        weights = (np.maximum(shares, 1e-6) / painted) ** self.config.prior_exponent
        self.config = replace(self.config, class_weights=[float(w) for w in weights / weights.max()])
        return shares

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, 1, H, W]`` (normalised) -> log-probabilities ``[B, K, H, W]``."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a [B, 1, H, W] batch; got {tuple(x.shape)}")
        images = x[:, 0].detach().float().cpu().numpy()
        probs = np.stack([self.predict_proba(self.pixel_features(img)) for img in images])  # [B, H, W, K]
        logp = np.log(np.maximum(probs, PROBABILITY_FLOOR)).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(logp)).to(x.device)


def estimate_class_shares(posteriors: np.ndarray, train_shares: np.ndarray, iterations: int = 200,
                          tol: float = 1e-7) -> np.ndarray:
    """Class shares ``[K]`` of unlabelled samples whose posteriors ``[M, K]`` a classifier gives under the
    training shares ``[K]``: the fixed point of re-weighting posteriors by new / training shares and
    averaging them (Saerens et al. 2002, an EM algorithm)."""
    posteriors = np.asarray(posteriors, np.float64)
    train_shares = np.asarray(train_shares, np.float64)
    shares = train_shares.copy()
    for _ in range(iterations):
        weighted = posteriors * (shares / train_shares)
        new = (weighted / np.maximum(weighted.sum(1, keepdims=True), 1e-300)).mean(0)
        if np.abs(new - shares).max() < tol:
            return new
        shares = new
    return shares


def make_forest_config(**overrides: Any) -> FeatureForestConfig:
    known = {f.name for f in fields(FeatureForestConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown feature-forest option(s) {unknown}; known: {sorted(known)}")
    return FeatureForestConfig(**overrides)


def feature_forest(task: str = "segmentation", num_classes: int | None = None, **overrides: Any) -> FeatureForest:
    """Filters + AFFMAE-tiny encoder features -> random forest (the Live preview model)."""
    if task != "segmentation":
        raise ValueError("feature_forest is a segmentation model only (it is not pretrained)")
    return FeatureForest(make_forest_config(**overrides), num_classes)


register_model("feature_forest", feature_forest, tasks=("segmentation",), trainable=False)
