"""Sparse scribble labels drawn from dense labels, as a user would paint them in napari.

`sparse_strokes` turns a dense label image (every pixel of interest has a class) into a few
brush strokes per class: each stroke is a smooth random walk that never leaves its class
region, stamped with a small square brush and clipped to the class, so every painted pixel
carries the true class of that pixel. Everything else is 0 (= unlabelled). Used by the demo,
the tests and the real-EM evaluation (fine-tuning on sparse labels of a few slices).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# 8-connected steps (dy, dx) and their unit directions
_STEPS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], dtype=np.int64)
_UNIT = _STEPS / np.linalg.norm(_STEPS, axis=1, keepdims=True)


def sparse_strokes(
    labels: np.ndarray,
    fraction: float = 0.02,
    *,
    seed: int = 0,
    classes: Iterable[int] | None = None,
    stroke_width: int = 3,
    stroke_length: int = 48,
    slices: Sequence[int] | None = None,
) -> np.ndarray:
    """Draw deterministic scribbles inside each class of a dense label image.

    Args:
        labels: integer labels ``[Y, X]`` or ``[Z, Y, X]`` (any array-like; read once into memory).
        fraction: target share of the pixels of each drawn slice that gets painted, split equally
            between the classes (a class never gets more than half of its own pixels).
        seed: random seed; equal arguments give identical strokes.
        classes: label values to paint; default every non-zero value present.
        stroke_width: brush size in pixels (square brush, clipped to the class).
        stroke_length: maximum number of steps (pixels) of one stroke.
        slices: for a 3D stack, the z indices to paint (others stay 0); default all slices.

    Returns:
        Painted labels with the shape and dtype of ``labels``: the class value on stroke pixels
        (always equal to ``labels`` there), 0 elsewhere.
    """
    dense = np.asarray(labels)
    if dense.ndim not in (2, 3):
        raise ValueError(f"labels must be [Y, X] or [Z, Y, X]; got shape {dense.shape}")
    if not np.issubdtype(dense.dtype, np.integer):
        raise ValueError(f"labels must be an integer array; got dtype {dense.dtype}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be between 0 and 1 (e.g. 0.02 for 2 % of the pixels); got {fraction}")
    if stroke_width < 1 or stroke_length < 1:
        raise ValueError(f"stroke_width and stroke_length must be >= 1; got {stroke_width}, {stroke_length}")
    volume = dense if dense.ndim == 3 else dense[None]
    depth = volume.shape[0]
    z_indices = list(range(depth)) if slices is None else [int(z) for z in slices]
    for z in z_indices:
        if not 0 <= z < depth:
            raise ValueError(f"slice index {z} is outside the stack of {depth} slices")
    if classes is None:
        values = np.unique(volume[z_indices]) if z_indices else np.array([], dtype=volume.dtype)
        class_values = [int(v) for v in values if v != 0]
    else:
        class_values = sorted({int(c) for c in classes})
        if 0 in class_values:
            raise ValueError("class 0 means 'unlabelled' and cannot be painted; remap your labels to 1..K first")

    rng = np.random.default_rng(seed)
    out = np.zeros_like(volume)
    brush = _brush_offsets(stroke_width)
    for z in sorted(set(z_indices)):
        plane = volume[z]
        budget = fraction * plane.size / max(len(class_values), 1)
        for value in class_values:
            region = plane == value
            target = min(budget, 0.5 * int(region.sum()))
            if target < 1:
                continue
            _paint_class(out[z], region, value, int(round(target)), brush, stroke_length, rng)
    return out if dense.ndim == 3 else out[0]


def _brush_offsets(width: int) -> np.ndarray:
    """Offsets ``[K, 2]`` of a square brush of side ``width`` centred on the stroke."""
    lo = -(width // 2)
    r = np.arange(lo, lo + width)
    return np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1).reshape(-1, 2)


def _paint_class(
    out: np.ndarray,
    region: np.ndarray,
    value: int,
    target: int,
    brush: np.ndarray,
    stroke_length: int,
    rng: np.random.Generator,
) -> None:
    """Add strokes of ``value`` inside ``region`` to ``out`` (in place) until ~``target`` pixels are painted."""
    candidates = np.flatnonzero(region)
    height, width = region.shape
    painted = 0
    for _ in range(200):  # bounded: thin or tiny regions may not reach the target
        if painted >= target:
            break
        start = np.unravel_index(candidates[rng.integers(len(candidates))], region.shape)
        path = _random_walk(region, start, stroke_length, rng)  # [L, 2]
        stamped = (path[:, None, :] + brush[None]).reshape(-1, 2)
        keep = (stamped[:, 0] >= 0) & (stamped[:, 0] < height) & (stamped[:, 1] >= 0) & (stamped[:, 1] < width)
        ys, xs = stamped[keep, 0], stamped[keep, 1]
        inside = region[ys, xs] & (out[ys, xs] == 0)
        ys, xs = ys[inside], xs[inside]
        # cap the last stroke so the total stays near the target
        flat = np.unique(ys * width + xs)[: max(target - painted, 0)]
        out.flat[flat] = value
        painted += len(flat)


def _random_walk(region: np.ndarray, start: tuple, length: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth walk of up to ``length`` 8-connected steps that stays inside ``region``; returns ``[L, 2]``."""
    height, width = region.shape
    y, x = int(start[0]), int(start[1])
    angle = rng.uniform(0, 2 * np.pi)
    heading = np.array([np.sin(angle), np.cos(angle)])
    path = [(y, x)]
    for _ in range(length - 1):
        score = _UNIT @ heading + rng.normal(0.0, 0.35, size=len(_UNIT))
        moved = False
        for k in np.argsort(-score):
            ny, nx = y + _STEPS[k, 0], x + _STEPS[k, 1]
            if 0 <= ny < height and 0 <= nx < width and region[ny, nx] and score[k] > -0.2:
                y, x = int(ny), int(nx)
                heading = 0.75 * heading + 0.25 * _UNIT[k]
                heading /= np.linalg.norm(heading) + 1e-9
                moved = True
                break
        if not moved:
            break
        path.append((y, x))
    return np.asarray(path, dtype=np.int64)
