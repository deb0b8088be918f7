"""What a segmentation model was taught beyond the strokes, kept next to its package for the next round.

Fine-tuning on a few strokes trains on the strokes plus a teacher's confident pixels of the painted slices
(`pseudo_labels`). When a person then paints corrections and training goes on from that package, the
teacher's pixels it learned from should stay its labels, with every stroke (the corrections among them)
winning. Taking the continued model's own confident pixels instead lost 0.02-0.05 IoU per round on VNC
mitochondria even without any correction, and a forest refitted on strokes painted on errors was a worse
teacher still (docs/few-strokes.md).

``taught_labels.npz`` in the folder of ``segmentation.affmae`` holds, per painted slice, the teacher's
labels only (internal values, 0 on strokes and unlabelled pixels) and a SHA-1 of the image slice they
belong to: they are used again only for the same image.
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

TAUGHT_LABELS_NAME = "taught_labels.npz"
#: Painted-slice pixels above which no taught labels are kept (the next round then asks the model instead).
MAX_TAUGHT_PIXELS = 256 * 1024 * 1024


def slice_fingerprint(image: Any, z: int | None) -> str:
    """SHA-1 of the pixels (and dtype and shape) of slice ``z`` of ``image`` (``None``: a 2D image)."""
    plane = np.ascontiguousarray(np.asarray(image[...] if z is None else image[z]))
    return hashlib.sha1(f"{plane.dtype.str}{plane.shape}".encode() + plane.tobytes()).hexdigest()


def teacher_only(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The labels a teacher added: ``after`` where ``before`` (the strokes) is 0, else 0 (same shape)."""
    return np.where(before == 0, after, 0).astype(after.dtype)


def save_taught_labels(folder: str | Path, image: Any, taught: np.ndarray, slices: list[int | None]) -> Path | None:
    """Write the teacher's labels ``taught`` (internal labels, image-shaped) of ``slices`` to
    ``folder/taught_labels.npz``; None (and nothing written) when they are too large to keep."""
    planes = [taught if z is None else taught[z] for z in slices]
    if not planes or sum(p.size for p in planes) > MAX_TAUGHT_PIXELS:
        log.info("taught labels of %d slice(s) not kept (over %d pixels): a continued run asks the model instead",
                 len(planes), MAX_TAUGHT_PIXELS)
        return None
    path = Path(folder) / TAUGHT_LABELS_NAME
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, slices=np.array([-1 if z is None else z for z in slices], np.int64),
                            planes=np.stack(planes), fingerprints=np.array([slice_fingerprint(image, z)
                                                                            for z in slices]))
    replace_path(tmp, path)
    return path


def load_taught_labels(package_path: str | Path | None, image: Any) -> dict[int | None, np.ndarray]:
    """The taught labels kept next to ``package_path`` for slices of ``image`` whose pixels are unchanged:
    ``{z: plane [Y, X]}`` (``None``: a 2D image). Empty when there are none or they do not fit the image."""
    if package_path is None:
        return {}
    path = Path(package_path).parent / TAUGHT_LABELS_NAME
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            slices, planes, prints = data["slices"], data["planes"], data["fingerprints"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        log.warning("taught labels in %s not used: %s", path, err)
        return {}
    depth = None if np.ndim(image) == 2 else len(image)
    kept: dict[int | None, np.ndarray] = {}
    for z, plane, fingerprint in zip(slices.tolist(), planes, prints.tolist()):
        key = None if z < 0 else int(z)
        if (key is None) != (depth is None) or (key is not None and key >= depth):
            continue
        if plane.shape == np.shape(image)[-2:] and slice_fingerprint(image, key) == fingerprint:
            kept[key] = plane
    return kept


def add_taught_labels(internal: np.ndarray, taught: dict[int | None, np.ndarray], slices: list[int | None]
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
