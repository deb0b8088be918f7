"""The real-EM few-label protocol: tasks, fixed slice splits, label regimes and metrics.

Everything here is deterministic and written down so a figure can state exactly what was
trained and what was scored:

* **Tasks** (`TASKS`): VNC mitochondria (``vnc/stack1_raw`` + ``stack1_mito``), VNC membranes
  (``stack1_membranes``), ISBI 2012 membranes (``isbi2012/train_raw`` + ``train_membranes``).
  Each is a binary problem: class 1 = background, class 2 = the structure (painted-label
  convention of `engine.finetune`: 0 = unlabelled).
* **Splits** (`make_split`): the first half of the stack (rounded down) is the *training pool*,
  the second half the *evaluation slices*; evaluation slices are never labelled. Within the pool,
  slices are labelled in a fixed, spread-out order (middle first, then the slice farthest from
  all chosen ones), so the k = 1 slice is part of the k = 2 set, and so on (nested sets).
* **Label regimes** (`training_labels`): ``"dense"`` = every pixel of the k slices labelled;
  ``"sparse"`` = deterministic simulated brush strokes (`data.sparse_strokes`) of both classes,
  background included, inside their class only, covering ``SPARSE_FRACTION`` (1 %) of each slice.
* **Metrics**: per-class IoU and Dice over all evaluation pixels (`segmentation_scores`), boundary
  F1 with a pixel tolerance for membranes (`boundary_f1`), mean and spread over seeds (`summarise`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..data.strokes import sparse_strokes

BACKGROUND, FOREGROUND = 1, 2  # painted label values (0 = unlabelled)
REGIMES = ("dense", "sparse")
SPARSE_FRACTION = 0.01  # share of a slice covered by strokes (both classes together)
BOUNDARY_TOLERANCE = 2  # pixels
DATA_ENV = "AFFMAE_DATA"


@dataclass(frozen=True)
class EMTask:
    """One benchmark task: a raw stack, its binary ground truth, unlabelled stacks for pretraining."""

    name: str
    title: str
    raw: str  # path relative to the data directory
    truth: str  # 1 = structure, 0 = everything else
    unlabelled: tuple[str, ...]  # extra raw stacks (no labels) usable for pretraining
    class_names: tuple[str, str]  # names of painted classes 1 and 2
    boundary: bool  # score boundary F1 (thin structures: membranes)
    citation: str


_VNC = ("S. Gerhard, J. Funke, J. Martel, A. Cardona, R. Fetter: Segmented anisotropic ssTEM dataset of "
        "neural tissue, figshare 2013, doi:10.6084/m9.figshare.856713 (CC BY-NC-SA 3.0)")
_ISBI = ("ISBI 2012 EM segmentation challenge: A. Cardona et al., PLoS Biol. 2010; I. Arganda-Carreras et al., "
         "Front. Neuroanat. 2015")

TASKS: dict[str, EMTask] = {
    "vnc_mito": EMTask("vnc_mito", "VNC mitochondria", "vnc/stack1_raw.tif", "vnc/stack1_mito.tif",
                       ("vnc/stack2_raw.tif",), ("background", "mitochondrion"), False, _VNC),
    "vnc_membranes": EMTask("vnc_membranes", "VNC membranes", "vnc/stack1_raw.tif", "vnc/stack1_membranes.tif",
                            ("vnc/stack2_raw.tif",), ("cell interior", "membrane"), True, _VNC),
    "isbi_membranes": EMTask("isbi_membranes", "ISBI 2012 membranes", "isbi2012/train_raw.tif",
                             "isbi2012/train_membranes.tif", ("isbi2012/test_raw.tif",),
                             ("cell interior", "membrane"), True, _ISBI),
}


# ----------------------------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class SliceSplit:
    """Training pool (in labelling order) and evaluation slices (z indices) of a stack."""

    depth: int
    label_order: tuple[int, ...]  # training pool, in the order slices get labelled
    eval_slices: tuple[int, ...]

    def labelled(self, k: int | str) -> list[int]:
        """The z indices labelled with ``k`` slices (``"all"`` = the whole pool), sorted."""
        n = len(self.label_order)
        if k == "all":
            count = n
        else:
            count = int(k)
            if not 1 <= count <= n:
                raise ValueError(f"k must be between 1 and {n} (the training pool of this stack) or 'all'; "
                                 f"got {k!r}")
        return sorted(self.label_order[:count])

    def describe(self, k: int | str) -> str:
        return (f"labelled z = {self.labelled(k)} (of training pool {sorted(self.label_order)}); "
                f"evaluated z = {list(self.eval_slices)}")


def make_split(depth: int) -> SliceSplit:
    """Fixed split of a ``depth``-slice stack: first half = training pool, second half = evaluation.

    The pool is ordered spread-out: its middle slice first, then repeatedly the slice farthest
    from all chosen ones (ties -> the lower index), so the labelled sets for growing k are nested.
    """
    if depth < 2:
        raise ValueError(f"a stack needs at least 2 slices (one to label, one to evaluate); got {depth}")
    pool = list(range(depth // 2))
    evaluation = tuple(range(depth // 2, depth))
    order = [pool[(len(pool) - 1) // 2]]
    while len(order) < len(pool):
        rest = [z for z in pool if z not in order]
        order.append(max(rest, key=lambda z: (min(abs(z - c) for c in order), -z)))
    return SliceSplit(depth, tuple(order), evaluation)


def parse_k(value: str) -> int | str:
    """``"all"`` or a positive integer (number of labelled slices)."""
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"k must be a positive integer or 'all'; got {value!r}") from None
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    return k


# ----------------------------------------------------------------------------------------------- labels

def painted_classes(truth: np.ndarray) -> np.ndarray:
    """Binary truth (0/1, any shape) -> painted class values (1 = background, 2 = structure), uint8."""
    return np.where(np.asarray(truth) > 0, FOREGROUND, BACKGROUND).astype(np.uint8)


def training_labels(truth: np.ndarray, slices: Sequence[int], regime: str, *, seed: int = 0,
                    fraction: float = SPARSE_FRACTION) -> np.ndarray:
    """Labels for fine-tuning from binary truth ``[Z, Y, X]``: only ``slices`` carry labels.

    ``"dense"``: every pixel of those slices is 1 (background) or 2 (structure).
    ``"sparse"``: strokes of both classes covering about ``fraction`` of each slice, strokes only
    inside their class; the brush is 3 px and strokes are up to a tenth of the slice side long.
    Everything else is 0 (unlabelled). Deterministic in ``seed``.
    """
    truth = np.asarray(truth)
    if truth.ndim != 3:
        raise ValueError(f"truth must be a [Z, Y, X] stack; got shape {truth.shape}")
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}; got {regime!r}")
    bad = [z for z in slices if not 0 <= int(z) < truth.shape[0]]
    if bad:
        raise ValueError(f"slices {bad} are outside the stack of {truth.shape[0]} slices")
    out = np.zeros(truth.shape, np.uint8)
    chosen = sorted({int(z) for z in slices})
    if regime == "dense":
        out[chosen] = painted_classes(truth[chosen])
        return out
    for z in chosen:  # one call per slice, seeded per slice: a slice's strokes do not depend on k
        out[z] = sparse_strokes(painted_classes(truth[z]), fraction, seed=seed * 1009 + z,
                                classes=(BACKGROUND, FOREGROUND), stroke_width=3,
                                stroke_length=max(16, max(truth.shape[1:]) // 10))
    return out


CORRECTION_FRACTION = 0.0025  # share of a slice painted per correction round


def correction_seed(seed: int, round_index: int, slice_index: int = 0) -> int:
    """The `correction_strokes` seed of a round on the ``slice_index``-th labelled slice of a stroke seed."""
    return seed * 31 + round_index + 7919 * slice_index


def correction_strokes(labels: np.ndarray, pred: np.ndarray, truth: np.ndarray, *, seed: int = 0,
                       fraction: float = CORRECTION_FRACTION) -> np.ndarray:
    """One correction round on a labelled slice, as a person paints where the preview is wrong.

    ``labels`` ``[Y, X]`` painted so far (0 / 1 = background / 2 = structure), ``pred`` and ``truth``
    binary ``[Y, X]`` (nonzero = structure). New strokes (same 3 px brush as `training_labels`,
    about ``fraction`` of the slice, split between the two error kinds) go inside the false
    positives, painted as background, and inside the false negatives, painted as structure —
    in the largest error regions first (each error pixel weighted by the size of its connected
    error region, so one-pixel slivers along a boundary are rarely chosen). Existing strokes are
    kept. Deterministic in ``seed``. Returns the new labels (a copy).
    """
    labels, pred, truth = np.asarray(labels), np.asarray(pred) > 0, np.asarray(truth) > 0
    if not labels.shape == pred.shape == truth.shape or labels.ndim != 2:
        raise ValueError(f"labels, prediction and truth must be [Y, X] slices of one shape; got {labels.shape}, "
                         f"{pred.shape}, {truth.shape}")
    errors = np.zeros(labels.shape, np.uint8)
    errors[pred & ~truth] = BACKGROUND  # false positive: paint as background
    errors[~pred & truth] = FOREGROUND  # false negative: paint as structure
    errors[labels > 0] = 0  # never repaint a stroke
    if not errors.any():
        return labels.copy()
    # keep the larger half (by pixels) of the error regions of each kind: where the preview is most wrong
    for value in (BACKGROUND, FOREGROUND):
        regions, n = ndimage.label(errors == value)
        if n == 0:
            continue
        sizes = np.bincount(regions.ravel())[1:]  # [n]
        order = np.argsort(-sizes)
        covered = np.cumsum(sizes[order]) <= 0.5 * sizes.sum()
        keep = order[: max(1, int(covered.sum()))] + 1
        errors[(regions > 0) & ~np.isin(regions, keep) & (errors == value)] = 0
    new = sparse_strokes(errors, fraction, seed=seed, classes=(BACKGROUND, FOREGROUND), stroke_width=3,
                         stroke_length=max(16, max(labels.shape) // 10))
    return np.where(labels > 0, labels, new).astype(labels.dtype)


# ----------------------------------------------------------------------------------------------- threshold

THRESHOLD_SIGMA = 2.0  # px: Gaussian smoothing before the intensity threshold


@dataclass(frozen=True)
class IntensityThreshold:
    """The simplest lab baseline: smooth, then one grey-value cut fitted on the painted pixels."""

    threshold: float  # on the smoothed grey values
    dark_foreground: bool  # True: pixels darker than the threshold are the structure
    sigma: float = THRESHOLD_SIGMA

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Binary structure mask (uint8, 1 = structure) of ``[Y, X]`` or ``[Z, Y, X]`` (per slice)."""
        smooth = _smooth_slices(image, self.sigma)
        return ((smooth < self.threshold) if self.dark_foreground else (smooth >= self.threshold)).astype(np.uint8)


def _smooth_slices(image: np.ndarray, sigma: float) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        return ndimage.gaussian_filter(image, sigma) if sigma > 0 else image
    return np.stack([_smooth_slices(s, sigma) for s in image])


def fit_threshold(image: np.ndarray, labels: np.ndarray, sigma: float = THRESHOLD_SIGMA) -> IntensityThreshold:
    """Fit the cut maximising balanced accuracy on the painted pixels (1 = background, 2 = structure);
    among equally good cuts, the middle one.

    ``image`` and ``labels``: same shape, ``[Y, X]`` or ``[Z, Y, X]``; only slices with paint are smoothed.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} must have the image's shape {image.shape}")
    if labels.ndim == 3:  # smooth only the painted slices
        painted = np.flatnonzero((labels > 0).any(axis=(1, 2)))
        image, labels = image[painted], labels[painted]
    smooth = _smooth_slices(image, sigma)
    fg, bg = smooth[labels == FOREGROUND], smooth[labels == BACKGROUND]
    if fg.size == 0 or bg.size == 0:
        raise ValueError("a threshold needs painted pixels of both classes (1 = background, 2 = structure)")
    dark = bool(np.median(fg) < np.median(bg))
    cuts = np.unique(np.quantile(np.concatenate([fg, bg]), np.linspace(0, 1, 257)))
    fg_sorted, bg_sorted = np.sort(fg), np.sort(bg)
    below_fg = np.searchsorted(fg_sorted, cuts, side="left") / fg.size  # share strictly below each cut
    below_bg = np.searchsorted(bg_sorted, cuts, side="left") / bg.size
    balanced = (below_fg + 1 - below_bg) / 2 if dark else (1 - below_fg + below_bg) / 2
    # the middle of the first run of best cuts: the widest margin between the classes, not the edge of one
    start = int(np.argmax(balanced))
    end = start
    while end + 1 < len(cuts) and balanced[end + 1] >= balanced[start] - 1e-12:
        end += 1
    return IntensityThreshold(float(cuts[start] + cuts[end]) / 2, dark, sigma)


# ----------------------------------------------------------------------------------------------- metrics

def segmentation_scores(pred: np.ndarray, truth: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU and Dice of a binary prediction against binary truth (same shape, any ndim).

    ``pred`` and ``truth``: nonzero = structure. Classes: ``class_names[0]`` = background (0),
    ``class_names[1]`` = structure. A class absent from both gets ``None``.
    Returns ``{"iou": {name: v}, "dice": {name: v}, "fg_iou", "fg_dice", "pixels"}``.
    """
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} must have the same shape")
    iou, dice = {}, {}
    for name, p, t in ((class_names[0], ~pred, ~truth), (class_names[1], pred, truth)):
        tp = int(np.count_nonzero(p & t))
        fp = int(np.count_nonzero(p & ~t))
        fn = int(np.count_nonzero(~p & t))
        union = tp + fp + fn
        iou[name] = None if union == 0 else tp / union
        dice[name] = None if union == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"iou": iou, "dice": dice, "fg_iou": iou[class_names[1]], "fg_dice": dice[class_names[1]],
            "pixels": int(truth.size)}


def boundary_f1(pred: np.ndarray, truth: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> dict[str, float]:
    """Boundary precision, recall and F1 of two boundary maps ``[Y, X]`` (nonzero = boundary pixel).

    A predicted boundary pixel is correct when a true one lies within ``tolerance`` pixels
    (Euclidean); a true one is found when a predicted one lies within ``tolerance``. For membranes
    the membrane masks themselves are the boundary maps. Both empty -> all 1; one empty -> F1 0.
    For a stack, pass slices one at a time and combine with `combine_boundary`.
    """
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"boundary maps must be two [Y, X] arrays of one shape; got {pred.shape}, {truth.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels; got {tolerance}")
    counts = boundary_counts(pred, truth, tolerance)
    return combine_boundary([counts])


def boundary_counts(pred: np.ndarray, truth: np.ndarray, tolerance: float) -> tuple[int, int, int, int]:
    """(matched predicted, predicted, matched true, true) boundary pixel counts of one slice."""
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    n_pred, n_true = int(pred.sum()), int(truth.sum())
    if n_pred == 0 or n_true == 0:
        return 0, n_pred, 0, n_true
    dist_to_true = ndimage.distance_transform_edt(~truth)  # [Y, X] px to the nearest true boundary pixel
    dist_to_pred = ndimage.distance_transform_edt(~pred)
    matched_pred = int(np.count_nonzero(pred & (dist_to_true <= tolerance)))
    matched_true = int(np.count_nonzero(truth & (dist_to_pred <= tolerance)))
    return matched_pred, n_pred, matched_true, n_true


def combine_boundary(counts: Sequence[tuple[int, int, int, int]]) -> dict[str, float]:
    """Pool per-slice `boundary_counts` into precision, recall, F1."""
    mp, npred, mt, ntrue = (sum(c[i] for c in counts) for i in range(4))
    if npred == 0 and ntrue == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision = mp / npred if npred else 0.0
    recall = mt / ntrue if ntrue else 0.0
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


def evaluate_stack(pred: np.ndarray, truth: np.ndarray, task: EMTask, slices: Sequence[int],
                   tolerance: float = BOUNDARY_TOLERANCE) -> dict[str, Any]:
    """All metrics of a predicted binary stack on the evaluation ``slices`` (pixels pooled over slices)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    chosen = sorted({int(z) for z in slices})
    scores = segmentation_scores(pred[chosen], truth[chosen], task.class_names)
    if task.boundary:
        scores["boundary"] = combine_boundary([boundary_counts(pred[z], truth[z], tolerance) for z in chosen])
        scores["boundary_f1"] = scores["boundary"]["f1"]
    scores["eval_slices"] = chosen
    return scores


def summarise(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, spread (sample standard deviation; 0 for one value), min, max and count of the non-None values."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    arr = np.asarray(kept)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": len(kept)}


# ----------------------------------------------------------------------------------------------- data

def resolve_data_dir(data_dir: str | Path | None = None, fallback: str | Path | None = None) -> Path:
    """The EM data folder: ``data_dir`` (``--data-dir``), else ``$AFFMAE_DATA``, else ``fallback`` if it exists.

    Raises FileNotFoundError naming the option and the variable when none of them gives a folder.
    """
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    if fallback is not None and Path(fallback).is_dir():
        return Path(fallback)
    looked = f" (nor is there {fallback})" if fallback is not None else ""
    raise FileNotFoundError(f"no EM data folder given{looked}: pass --data-dir or set ${DATA_ENV} to the folder "
                            "holding vnc/ and isbi2012/")


def default_data_dir(repo_root: Path | None = None) -> Path:
    """``$AFFMAE_DATA``, else ``<repo_root>/../shared/data`` when a source checkout ``repo_root`` is given.

    Raises FileNotFoundError naming the option and the variable when neither gives a folder.
    """
    return resolve_data_dir(None, None if repo_root is None else Path(repo_root).parent / "shared" / "data")


def load_task(data_dir: str | Path, task: EMTask | str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Read a task's raw stack ``[Z, Y, X]`` and binary truth (uint8 0/1); list its unlabelled stacks.

    Raises FileNotFoundError naming the missing file and the option to fix it.
    """
    import tifffile  # noqa: PLC0415  (only needed for real data)

    spec = TASKS[task] if isinstance(task, str) else task
    root = Path(data_dir)
    paths = [root / spec.raw, root / spec.truth]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"task {spec.name}: missing {', '.join(missing)}; point --data-dir (or "
                                f"${DATA_ENV}) at the folder holding vnc/ and isbi2012/")
    raw = np.asarray(tifffile.imread(paths[0]))
    truth = (np.asarray(tifffile.imread(paths[1])) > 0).astype(np.uint8)
    if raw.ndim != 3 or raw.shape != truth.shape:
        raise ValueError(f"task {spec.name}: raw {raw.shape} and truth {truth.shape} must be [Z, Y, X] stacks "
                         "of one shape")
    extra = [root / p for p in spec.unlabelled if (root / p).is_file()]
    return raw, truth, extra
