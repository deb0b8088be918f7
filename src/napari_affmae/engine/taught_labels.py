"""What a segmentation model was taught beyond the strokes, kept next to its package for the next round.

Fine-tuning on a few strokes trains on the strokes plus a teacher's confident pixels of the painted slices
(`pseudo_labels`). When a person then paints corrections and training goes on from that package, the
teacher's pixels it learned from should stay its labels, with every stroke (the corrections among them)
winning. Taking the continued model's own confident pixels instead lost IoU round after round on VNC
mitochondria even without any correction, and a forest refitted on strokes painted on errors was a worse
teacher still (docs/few-strokes.md, "Correction rounds").

``<package>.taught_labels.npz`` beside the package (``segmentation.taught_labels.npz`` beside
``segmentation.affmae``) holds, per painted slice, the teacher's labels only (internal values, 0 on strokes
and unlabelled pixels), a SHA-1 of the image slice they belong to and the number of classes: they are used
again only for the same image and classes, and only with that package (a copied or renamed package goes on
without them: the continued model labels its slices itself). They keep the confidence they were made with.
"""
from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..io.files import replace_path

log = logging.getLogger(__name__)

SUFFIX = ".taught_labels.npz"
#: Painted-slice pixels above which no taught labels are kept (the next round then asks the model instead).
MAX_TAUGHT_PIXELS = 256 * 1024 * 1024

Planes = dict[int | None, np.ndarray]  # slice index (None: a 2D image) -> labels [Y, X]


def taught_labels_path(package_path: str | Path) -> Path:
    """Where the taught labels of the package at ``package_path`` are kept (beside it)."""
    path = Path(package_path)
    return path.with_name(path.stem + SUFFIX)


def slice_fingerprint(image: Any, z: int | None) -> str:
    """SHA-1 of the pixels (and dtype and shape) of slice ``z`` of ``image`` (``None``: a 2D image)."""
    plane = np.ascontiguousarray(np.asarray(image[...] if z is None else image[z]))
    return hashlib.sha1(f"{plane.dtype.str}{plane.shape}".encode() + plane.tobytes()).hexdigest()


def teacher_only(strokes: np.ndarray, labels: np.ndarray, slices: list[int | None]) -> Planes:
    """Per slice of ``slices``: ``labels`` where ``strokes`` is 0 (what a teacher added), else 0."""
    planes = {}
    for z in slices:
        before, after = (strokes, labels) if z is None else (strokes[z], labels[z])
        planes[z] = np.where(before == 0, after, 0).astype(after.dtype, copy=False)
    return planes


def save_taught_labels(package_path: str | Path, image: Any, taught: Planes, num_classes: int) -> Path | None:
    """Keep ``taught`` (internal labels per slice of ``image``) beside the package; None when nothing is kept
    (none given, too large, or the file could not be written: logged, and no older file is left)."""
    path = taught_labels_path(package_path)
    tmp = path.with_name(path.name + ".tmp")
    if not taught or sum(p.size for p in taught.values()) > MAX_TAUGHT_PIXELS:
        if taught:
            log.info("taught labels of %d slice(s) not kept (over %d pixels): a continued run asks the model",
                     len(taught), MAX_TAUGHT_PIXELS)
        path.unlink(missing_ok=True)
        return None
    try:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, slices=np.array([-1 if z is None else z for z in taught], np.int64),
                                planes=np.stack(list(taught.values())), num_classes=np.int64(num_classes),
                                fingerprints=np.array([slice_fingerprint(image, z) for z in taught]))
        replace_path(tmp, path)
    except (OSError, MemoryError) as err:
        log.warning("taught labels not kept in %s (%s): a continued run asks the model instead", path, err)
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        return None
    return path


def load_taught_labels(package_path: str | Path | None, image: Any, slices: list[int | None],
                       num_classes: int) -> Planes:
    """The taught labels kept beside ``package_path`` for those ``slices`` of ``image`` whose pixels are
    unchanged, if they are for ``num_classes`` classes. Empty when there are none or they do not fit."""
    path = None if package_path is None else taught_labels_path(package_path)
    if path is None or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            stored, planes, prints = data["slices"].tolist(), data["planes"], data["fingerprints"].tolist()
            classes = int(data["num_classes"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        log.warning("taught labels in %s not used: %s", path, err)
        return {}
    if classes != num_classes or planes.max(initial=0) > num_classes:
        log.warning("taught labels in %s are for %d classes, not %d: not used", path, classes, num_classes)
        return {}
    if not stored or planes.shape[1:] != tuple(np.shape(image)[-2:]) \
            or (min(stored) < 0) != (np.ndim(image) == 2):
        return {}  # another slice shape, or a 2D image's labels for a stack (or the other way round)
    kept: Planes = {}
    for z, plane, fingerprint in zip(stored, planes, prints):
        key = None if z < 0 else int(z)
        if key in slices and slice_fingerprint(image, key) == fingerprint:
            kept[key] = plane
    return kept


def add_taught_labels(internal: np.ndarray, taught: Planes, slices: list[int | None]
                      ) -> tuple[np.ndarray, list[int | None]]:
    """Internal labels ``internal`` with the taught labels of those ``slices`` that have some filled in where
    nothing is painted now. Returns the new labels and the slices of ``slices`` that had none."""
    out = internal.copy()
    missing = []
    for z in slices:
        if z not in taught:
            missing.append(z)
            continue
        plane = out if z is None else out[z]
        plane[...] = np.where(plane > 0, plane, taught[z])
    return out, missing
