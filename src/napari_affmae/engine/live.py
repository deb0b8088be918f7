"""Live preview: a fast pixel classifier that retrains in seconds whenever the strokes change.

A `LivePreview` holds one image (2D or a 3D stack) and a `models.feature_forest.FeatureForest`:

* **Features per slice, cached.** The first time a slice is needed (it carries strokes, or it is
  being viewed) its per-pixel features are computed once — the ilastik-style filter bank plus,
  when a package is given, that package's AFFMAE encoder stages upsampled to pixels — and kept
  in a least-recently-used cache bounded by ``max_cache_mb``. A slice larger than
  ``max_window_pixels`` is never featurised whole: only the asked-for view (plus a context
  margin) is.
* **A forest on the painted pixels.** `update` collects the features of every painted pixel
  (0 = unpainted; painted values 1..K), fits a scikit-learn random forest (deterministic in the
  seed) and predicts the slice or view being looked at. The features are the filter bank, as in
  ilastik, computed on each slice normalised by its own intensity statistics
  (``slice_normalization``: sections of a stack differ in brightness and contrast), and the
  posteriors are corrected toward the class shares estimated on unpainted pixels near the strokes
  (``prior_exponent``; strokes do not paint the classes in the shares the image has). Both are
  on by default and off in `LiveConfig.ilastik_style`; ``texture`` adds texture features (see
  `models.feature_forest`; docs/live-preview.md measures each).
* `to_package` / `save` keep the fast model as a segmentation package that `engine.segment`
  and batch segmentation run over whole stacks like any other.

No Qt here: the Fine-tune widget runs `update` in a worker and cancels stale jobs through the
`CancelToken`.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.normalize import NormalizationStats, compute_stats, slice_stats
from ..models.feature_forest import check_prior_settings
from .painted import MAX_CLASSES, check_labels
from .inputs import as_input_image, check_has_contrast
from .package import ModelPackage, load_package, save_package
from .progress import CancelToken, JobCancelled
from .segment import labels_dtype

log = logging.getLogger(__name__)
CONTEXT_MARGIN = 64  # px of context around a view (4 x the largest filter sigma)
MIN_SIDE = 16  # px: smallest slice the filters and the encoder accept


@dataclass
class LiveConfig:
    """Live preview settings. Memory in MiB, sizes in pixels."""

    package: str | Path | ModelPackage | None = None  # encoder features from this (MAE or segmentation) package
    encoder_features: bool = True  # use the package's encoder (ignored without a package)
    components: int = 4  # projected channels per encoder stage
    trees: int = 100
    seed: int = 0
    max_cache_mb: float = 1024.0  # feature cache bound
    max_window_pixels: int = 2048 * 1024  # larger slices are featurised view by view
    max_samples: int = 60_000  # painted pixels the forest trains on (class-balanced subsample beyond)
    texture: bool = False  # local standard deviation + differences of Gaussians besides the filter bank
    prior_exponent: float = 1.0  # 0 = no prior correction (ilastik); 1 = full correction to the estimated shares
    prior_iterations: int = 1  # EM steps of the share estimate (1 = mean posterior; more: toward the EM fixed point)
    prior_samples: int = 20_000  # unpainted pixels (near the strokes) the class shares are estimated on
    slice_normalization: bool = True  # each slice by its own intensity statistics (False: the image's, as ilastik)

    @classmethod
    def ilastik_style(cls, **overrides: Any) -> "LiveConfig":
        """ilastik's pixel classifier: the filter bank and a forest, nothing else (the ``rf_filters`` arm)."""
        return cls(**{"package": None, "texture": False, "prior_exponent": 0.0, "slice_normalization": False,
                      **overrides})

    def validate(self) -> None:
        if self.components < 1 or self.trees < 1:
            raise ValueError(f"components and trees must be >= 1; got {self.components}, {self.trees}")
        if self.max_cache_mb <= 0:
            raise ValueError(f"max_cache_mb must be > 0; got {self.max_cache_mb}")
        if self.max_window_pixels < MIN_SIDE * MIN_SIDE:
            raise ValueError(f"max_window_pixels must be >= {MIN_SIDE * MIN_SIDE}; got {self.max_window_pixels}")
        if self.max_samples < 2:
            raise ValueError(f"max_samples must be >= 2; got {self.max_samples}")
        check_prior_settings(self.prior_exponent, self.prior_iterations)
        if self.prior_samples < 0:
            raise ValueError(f"prior_samples must be >= 0; got {self.prior_samples}")


Window = tuple[int, int, int, int, int]  # z, y0, y1, x0, x1 (image pixels, end exclusive)


@dataclass
class LiveResult:
    """One preview: labels ``[h, w]`` of the view (painted values 1..K), optional probabilities
    ``[K, h, w]``, where the view sits, and the seconds each part took."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    z: int
    region: tuple[int, int, int, int]  # y0, y1, x0, x1
    timings: dict[str, float]
    n_painted: int


class LivePreview:
    """Cached features + forest for one image ``[Y, X]`` or ``[Z, Y, X]``."""

    def __init__(self, image: Any, config: LiveConfig | None = None, stats: NormalizationStats | None = None) -> None:
        self.config = config or LiveConfig()
        self.config.validate()
        img = as_input_image(image, what="image")
        if min(img.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"image: {img.shape[-2]} x {img.shape[-1]} px is too small for the live preview; "
                             f"it needs at least {MIN_SIDE} x {MIN_SIDE} px")
        self.image = img.array
        self.ndim = img.ndim
        self.stats = stats or compute_stats(self.image)
        check_has_contrast(self.stats, "image")
        self._slice_stats: dict[int, NormalizationStats] = {}  # per-slice statistics (slice_normalization)
        self.package = self._encoder_package()
        self.model = self._new_model(n_samples=0)
        self._cache: OrderedDict[Window, np.ndarray] = OrderedDict()
        self.fitted = False
        self.label_values: list[int] = []  # the painted value of each forest class
        self._fingerprint = ""  # of the strokes the forest was last fitted on
        self.windows_computed = 0  # feature windows computed so far (cache misses)
        self.class_shares: np.ndarray | None = None  # class shares near the strokes, as the forest estimates them

    # ------------------------------------------------------------------------------------------ set-up

    def _encoder_package(self) -> ModelPackage | None:
        source = self.config.package
        if source is None or not self.config.encoder_features:
            return None
        pkg = source if isinstance(source, ModelPackage) else load_package(source)
        if not pkg.model_name.startswith("affmae_"):
            raise ValueError(f"live preview features come from an AFFMAE package; {pkg.model_name} has no AFFMAE "
                             "encoder (choose an AFFMAE package or none)")
        return pkg

    def _encoder_size(self) -> str | None:
        return None if self.package is None else self.package.model_name.split("_", 1)[1]

    def _encoder_options(self) -> dict[str, Any]:
        if self.package is None:
            return {}
        keep = ("keep_rate", "cluster_size", "nearest_clusters", "neighborhood", "dims", "depths", "heads", "mlp_ratio")
        return {k: v for k, v in self.package.config.items() if k in keep}

    def _new_model(self, n_samples: int) -> torch.nn.Module:
        from ..models import create_model  # noqa: PLC0415

        model = create_model("feature_forest", task="segmentation", num_classes=2, encoder_size=self._encoder_size(),
                             encoder_options=self._encoder_options(), components=self.config.components,
                             trees=self.config.trees, seed=self.config.seed, n_samples=n_samples,
                             max_samples=self.config.max_samples, texture=self.config.texture,
                             prior_exponent=self.config.prior_exponent,
                             prior_iterations=self.config.prior_iterations)
        if self.package is not None:
            encoder = {k[len("encoder."):]: v for k, v in self.package.state_dict.items() if k.startswith("encoder.")}
            model.encoder.load_state_dict(encoder)
        return model

    # ------------------------------------------------------------------------------------------ features

    @property
    def depth(self) -> int:
        return int(self.image.shape[0]) if self.ndim == 3 else 1

    @property
    def slice_shape(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @property
    def cell_side(self) -> tuple[int, int]:
        """Size of the fixed grid cells a slice is featurised in: the whole slice when it fits
        ``max_window_pixels``, else squares whose window (cell + context margin) fits it."""
        height, width = self.slice_shape
        if height * width <= self.config.max_window_pixels:
            return height, width
        side = max(64, int(self.config.max_window_pixels ** 0.5) - 2 * CONTEXT_MARGIN)
        return side, side

    def _cells(self, z: int, y0: int, y1: int, x0: int, x1: int) -> list[tuple[Window, tuple[int, int, int, int]]]:
        """The grid cells of slice z meeting rows [y0, y1) x columns [x0, x1): (feature window, the part of the
        region inside the cell). Cells sit on a fixed grid, so panning or a new stroke reuses cached windows."""
        height, width = self.slice_shape
        side_y, side_x = self.cell_side
        whole = (side_y, side_x) == (height, width)
        out = []
        for cy in range(y0 // side_y * side_y, y1, side_y):
            for cx in range(x0 // side_x * side_x, x1, side_x):
                part = (max(y0, cy), min(y1, cy + side_y), max(x0, cx), min(x1, cx + side_x))
                margin = 0 if whole else CONTEXT_MARGIN
                window = (z, max(0, cy - margin), min(height, cy + side_y + margin),
                          max(0, cx - margin), min(width, cx + side_x + margin))
                out.append((window, part))
        return out

    def _read(self, window: Window) -> np.ndarray:
        z, y0, y1, x0, x1 = window
        crop = self.image[z, y0:y1, x0:x1] if self.ndim == 3 else self.image[y0:y1, x0:x1]
        return self.stats_of(z).apply(np.asarray(crop))

    def stats_of(self, z: int) -> NormalizationStats:
        """The intensity statistics slice ``z`` is normalised with: its own (the whole slice's, whichever view
        is featurised) with ``slice_normalization``, else the image's; a flat slice falls back to the image's."""
        if not self.config.slice_normalization:
            return self.stats
        if z not in self._slice_stats:
            self._slice_stats[z] = slice_stats(self.image[z] if self.ndim == 3 else self.image, lambda: self.stats)
        return self._slice_stats[z]

    def features(self, window: Window) -> np.ndarray:
        """Features ``[h, w, F]`` float32 of a window (cached; least recently used evicted past the bound)."""
        if window in self._cache:
            self._cache.move_to_end(window)
            return self._cache[window]
        feats = self.model.pixel_features(self._read(window))
        self.windows_computed += 1
        self._cache[window] = feats
        limit = self.config.max_cache_mb * 2**20
        while len(self._cache) > 1 and self.cache_bytes > limit:
            self._cache.popitem(last=False)
        return feats

    @property
    def cache_bytes(self) -> int:
        return sum(f.nbytes for f in self._cache.values())

    def forget(self, z: int) -> None:
        """Drop the cached features of slice ``z``."""
        for window in [w for w in self._cache if w[0] == z]:
            del self._cache[window]

    def clear(self) -> None:
        """Free the feature cache (the fitted forest stays)."""
        self._cache.clear()

    # ------------------------------------------------------------------------------------------ training

    def _painted_slices(self, labels: np.ndarray) -> list[int]:
        if self.ndim == 2:
            return [0] if np.any(labels) else []
        return [int(z) for z in np.flatnonzero(np.asarray(labels).reshape(labels.shape[0], -1).any(axis=1))]

    def check_labels(self, labels: Any) -> tuple[np.ndarray, list[int]]:
        """Validate painted labels (the image's shape, integers, 0 = unpainted, >= 2 painted values, at most
        `MAX_CLASSES`) -> (labels as an ndarray, the painted label values, sorted: one forest class each)."""
        labels = np.asarray(labels)
        if labels.shape != tuple(self.image.shape):
            raise ValueError(f"labels of shape {labels.shape} do not match the image {tuple(self.image.shape)}; "
                             "paint on a Labels layer of the image's shape")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers (0 = unpainted, classes 1..K); got {labels.dtype}")
        _, values = check_labels(labels, "sparse")  # the fine-tuning rules: any values, mapped to classes
        return labels, values

    def training_set(self, labels: np.ndarray, values: list[int], cancel: CancelToken | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features ``[N, F]`` and classes ``[N]`` (index into ``values``) of every painted pixel, class-balanced
        and capped at ``max_samples``, and features ``[M, F]`` of up to ``prior_samples`` unpainted pixels of
        the same feature windows when the prior correction is on (M = 0 otherwise); deterministic in the seed."""
        lut = np.asarray(values)
        rng = np.random.default_rng(self.config.seed)
        budget = self.config.prior_samples if self.config.prior_exponent > 0 else 0
        xs, ys, unpainted = [], [], []
        for z in self._painted_slices(labels):
            plane = labels[z] if self.ndim == 3 else labels
            rows, cols = np.nonzero(plane)
            cells = self._cells(z, int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
            for window, (cy0, cy1, cx0, cx1) in cells:
                inside = (rows >= cy0) & (rows < cy1) & (cols >= cx0) & (cols < cx1)
                if not inside.any():
                    continue
                if cancel is not None:
                    cancel.raise_if_cancelled()
                _, wy0, _, wx0, _ = window
                feats = self.features(window)
                r, c = rows[inside], cols[inside]
                xs.append(feats[r - wy0, c - wx0])
                ys.append(np.searchsorted(lut, plane[r, c]).astype(np.int64))
                if budget:  # only the prior correction needs unpainted pixels
                    free_r, free_c = np.nonzero(plane[cy0:cy1, cx0:cx1] == 0)
                    pick = rng.choice(len(free_r), min(len(free_r), budget // len(cells)), replace=False)
                    unpainted.append(feats[free_r[pick] + cy0 - wy0, free_c[pick] + cx0 - wx0])
        x, y = _balanced_subsample(np.concatenate(xs), np.concatenate(ys), self.config.max_samples, self.config.seed)
        return x, y, (np.concatenate(unpainted) if unpainted else np.empty((0, x.shape[1]), np.float32))

    def fit(self, labels: Any, cancel: CancelToken | None = None) -> int:
        """Fit the forest on the painted pixels of ``labels`` (skipped when the strokes are those of the last
        fit); returns the number of training pixels."""
        labels, values = self.check_labels(labels)
        painted = np.flatnonzero(labels)
        fingerprint = hashlib.sha1(painted.tobytes() + labels.ravel()[painted].astype(np.int64).tobytes()).hexdigest()
        if self.fitted and fingerprint == self._fingerprint:
            return int(self.model.config.n_samples)
        x, y, unpainted = self.training_set(labels, values, cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        self.model.num_classes = len(values)
        self.model.set_training_data(x, y)
        self.class_shares = self.model.adapt_priors(unpainted) if self.config.prior_exponent > 0 else None
        self.label_values = values
        self._fingerprint = fingerprint
        self.fitted = True
        return len(y)

    def _clip(self, region: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
        height, width = self.slice_shape
        y0, y1, x0, x1 = region if region is not None else (0, height, 0, width)
        clipped = max(0, int(y0)), min(height, int(y1)), max(0, int(x0)), min(width, int(x1))
        if clipped[1] <= clipped[0] or clipped[3] <= clipped[2]:
            raise ValueError(f"the region {region} holds no pixel of the {height} x {width} slice")
        return clipped

    def predict(self, z: int = 0, region: tuple[int, int, int, int] | None = None, probabilities: bool = False,
                cancel: CancelToken | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels ``[h, w]`` (the painted label values) of ``region = (y0, y1, x0, x1)`` of slice ``z`` (whole
        slice by default; clipped to the slice), and class probabilities ``[K, h, w]`` when asked."""
        if not self.fitted:
            raise RuntimeError("the live model is not trained yet: call update() or fit() with painted labels")
        if not 0 <= z < self.depth:
            raise ValueError(f"slice {z} is outside the image of {self.depth} slice(s)")
        y0, y1, x0, x1 = self._clip(region)
        check = None if cancel is None else cancel.raise_if_cancelled
        probs = np.zeros((y1 - y0, x1 - x0, self.model.num_classes), np.float32)  # [h, w, K]
        for window, (cy0, cy1, cx0, cx1) in self._cells(z, y0, y1, x0, x1):
            if check is not None:
                check()
            _, wy0, _, wx0, _ = window
            view = self.features(window)[cy0 - wy0:cy1 - wy0, cx0 - wx0:cx1 - wx0]
            probs[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = self.model.predict_proba(np.ascontiguousarray(view),
                                                                                   check=check)
        lut = np.asarray(self.label_values)
        labels = lut[probs.argmax(-1)].astype(labels_dtype(int(lut.max())))
        return labels, (np.ascontiguousarray(probs.transpose(2, 0, 1)) if probabilities else None)

    def update(self, labels: Any, z: int = 0, region: tuple[int, int, int, int] | None = None,
               probabilities: bool = False, cancel: CancelToken | None = None) -> LiveResult:
        """Refit on the current strokes (when they changed) and predict the view: what the widget calls after
        every stroke or move to another slice."""
        started = time.perf_counter()
        computed_before = self.windows_computed
        n = self.fit(labels, cancel)
        fitted = time.perf_counter()
        labels_out, probs = self.predict(z, region, probabilities, cancel)
        done = time.perf_counter()
        timings = {"fit_s": fitted - started, "predict_s": done - fitted, "total_s": done - started,
                   "new_windows": self.windows_computed - computed_before}
        return LiveResult(labels_out, probs, z, self._clip(region), timings, n)

    # ------------------------------------------------------------------------------------------ keeping

    def to_package(self, class_names: list[str] | None = None) -> ModelPackage:
        """The fitted live model as a segmentation package (`engine.segment` runs it on whole stacks)."""
        if not self.fitted:
            raise RuntimeError("nothing to keep yet: paint strokes of two classes and let the preview train first")
        given = list(class_names or [])  # names of label values 1, 2, ... (the widget's class table)
        names = [given[v - 1] if 0 < v <= len(given) else f"class {v}" for v in self.label_values]
        shares = None if self.class_shares is None else [round(float(v), 4) for v in self.class_shares]
        provenance = {"job": "live preview", "trained_pixels": int(self.model.config.n_samples),
                      "estimated_class_shares": shares,
                      "encoder_package": None if self.package is None else str(self.package.path or ""),
                      "encoder_model": None if self.package is None else self.package.model_name,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        package = ModelPackage.from_model(self.model, normalization=self.stats, class_names=names,
                                          label_mode="sparse", label_values=self.label_values, provenance=provenance)
        package.normalization_scope = "slice" if self.config.slice_normalization else "image"
        return package

    def save(self, path: str | Path, class_names: list[str] | None = None) -> Path:
        """Write the live model as a package (``.affmae`` file or directory); returns its path."""
        return save_package(self.to_package(class_names), path)


def _balanced_subsample(x: np.ndarray, y: np.ndarray, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` rows, the same share for each class where possible (deterministic in ``seed``)."""
    if len(y) <= limit:
        return x, y
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = limit // len(classes)
    keep = []
    for c in classes:
        rows = np.flatnonzero(y == c)
        keep.append(rows if len(rows) <= per_class else rng.choice(rows, per_class, replace=False))
    rows = np.sort(np.concatenate(keep))
    return x[rows], y[rows]


__all__ = ["LiveConfig", "LivePreview", "LiveResult", "JobCancelled", "MAX_CLASSES"]
