"""Labels a network can learn from when only a few strokes are painted: the strokes plus the live
preview's confident pixels around them.

A network trained on strokes alone that cover 1 % of one slice learns little more than a grey-value cut
(docs/results.md: AFFMAE and a U-Net from scratch score near the threshold arm at k = 1). The pixel
classifier of the live preview (filter features + a random forest, its posteriors corrected toward the
class shares it estimates near the strokes) already generalises from the same strokes. Its confident
pixels on the painted slices, with the strokes kept as painted, give the network dense labels to learn
fine structure and context from (self-training from a teacher); the network then goes past the teacher.

Internal labels here: 0 = not used for training, ``c + 1`` = model class c (`finetune.to_internal`).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..data.normalize import NormalizationStats
from .live import LiveConfig, LivePreview
from .progress import CancelToken

log = logging.getLogger(__name__)

#: Default class probability above which a teacher pixel becomes a training label (docs/results.md).
DEFAULT_CONFIDENCE = 0.8


def teacher_config(seed: int) -> LiveConfig:
    """The forest that makes pseudo-labels: ilastik's filter bank and forest, posteriors corrected once (one
    EM step) toward the class shares estimated near the strokes."""
    return LiveConfig.ilastik_style(prior_exponent=1.0, prior_iterations=1, seed=seed)


def check_confidence(confidence: float | None) -> None:
    if confidence is not None and not 0.5 <= float(confidence) < 1.0:
        raise ValueError(f"pseudo_label_confidence must be in [0.5, 1) (a class probability), or None ('off' on "
                         f"the command line) for strokes only; got {confidence}")


def painted_slices(internal: np.ndarray) -> list[int | None]:
    """The z indices of ``internal`` ``[Z, Y, X]`` that carry labels; ``[None]`` for a 2D ``[Y, X]`` image."""
    if internal.ndim == 2:
        return [None]
    return [int(z) for z in np.flatnonzero(internal.reshape(len(internal), -1).any(1))]


def label_confident(plane: np.ndarray, probs: np.ndarray, confidence: float, values: np.ndarray) -> np.ndarray:
    """In place: the unlabelled pixels of ``plane`` ``[Y, X]`` whose most likely class in ``probs`` ``[K, Y, X]``
    has probability >= ``confidence`` get that class's internal value ``values[k]``. Returns pixels added per
    class ``[K]``."""
    best = probs.argmax(0)
    sure = (probs.max(0) >= confidence) & (plane == 0)
    plane[sure] = values[best[sure]]
    return np.bincount(best[sure], minlength=len(values))


def add_pseudo_labels(image: Any, internal: np.ndarray, confidence: float, seed: int = 0,
                      cancel: CancelToken | None = None, stats: NormalizationStats | None = None
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """Internal labels ``[Y, X]`` or ``[Z, Y, X]`` plus, on every slice that carries strokes, the unpainted
    pixels to which the teacher forest (`teacher_config`) gives some class a probability >= ``confidence``,
    labelled with that class. Painted pixels keep their class. Returns a new array and a summary (pixels
    added per class, the teacher's estimated class shares). ``stats``: the image's intensity statistics when
    the caller has them (else computed here)."""
    check_confidence(confidence)
    preview = LivePreview(image, teacher_config(seed), stats=stats)
    preview.fit(internal, cancel)
    values = np.asarray(preview.label_values)  # internal class values c + 1 the forest knows
    out = internal.copy()
    added = np.zeros(len(values), np.int64)
    for z in painted_slices(internal):
        _, probs = preview.predict(0 if z is None else z, probabilities=True, cancel=cancel)  # [K, Y, X]
        added += label_confident(out if z is None else out[z], probs, confidence, values)
        if z is not None:
            preview.forget(z)
    info = {"teacher": "live preview forest", "confidence": float(confidence),
            "added_pixels": {int(v): int(n) for v, n in zip(values, added)},
            "teacher_class_shares": None if preview.class_shares is None else [float(s) for s in preview.class_shares]}
    log.info("pseudo-labels: %s pixels added per class (confidence >= %.2f)", info["added_pixels"], confidence)
    return out, info


def add_model_pseudo_labels(package: Any, image: Any, internal: np.ndarray, confidence: float, *,
                            tile_size: tuple[int, int], device: str = "auto", cancel: CancelToken | None = None,
                            slices: list[int | None] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """As `add_pseudo_labels`, with a segmentation package as the teacher: the model that training continues
    from, on ``slices`` (default: every painted slice). What it already predicts with confidence stays a label;
    the strokes win. Used where the labels it was taught are not at hand (`taught_labels`). The forest is no
    teacher here: refitted on strokes that were painted on errors, not at random, its confident pixels were
    worse (docs/few-strokes.md)."""
    from .segment import SegmentConfig, segment  # noqa: PLC0415  (segment imports the model code)

    check_confidence(confidence)
    out = internal.copy()
    values = np.arange(1, int(package.num_classes) + 1)  # model class c -> internal c + 1
    config = SegmentConfig(tile_size=tile_size, device=device, output="probabilities")
    added = np.zeros(len(values), np.int64)
    for z in painted_slices(internal) if slices is None else slices:
        plane = np.asarray(image[...] if z is None else image[z])  # [Y, X]
        probs = np.asarray(segment(package, plane, config, cancel=cancel))  # [K, Y, X]
        added += label_confident(out if z is None else out[z], probs, confidence, values)
    info = {"teacher": "the model training continued from", "confidence": float(confidence),
            "added_pixels": {int(v): int(n) for v, n in zip(values, added)}}
    log.info("pseudo-labels from the continued model: %s pixels added per class (confidence >= %.2f)",
             info["added_pixels"], confidence)
    return out, info
