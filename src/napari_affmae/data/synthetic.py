"""Deterministic synthetic EM: cells with dark membranes, mitochondria with cristae, texture, noise.

`synthetic_em` draws a 2D image ``[Y, X]`` or a coherent 3D stack ``[Z, Y, X]`` (uint8) together with
dense class labels of the same shape (uint8, every pixel labelled):

====  ==============
1     membrane
2     mitochondrion
3     cytoplasm
====  ==============

How it is drawn (numpy/scipy only):

* cells are the Voronoi regions of jittered-grid seed points, seen through a smooth domain warp so the
  walls bend; seeds drift slowly with z so neighbouring slices show the same cells slightly moved;
* a pixel is membrane when its distance to the bisector of its two nearest seeds is below half the
  (smoothly varying) membrane width;
* mitochondria are ellipsoids attached to some cells, kept away from the membranes; their
  cross-section in a slice is an ellipse with a dark outer membrane and striped cristae inside;
* cytoplasm gets a per-cell grey level, smooth and fine texture and small vesicles; then an in-plane
  blur, Gaussian noise and a slight per-slice brightness change, as in serial-section TEM.

All randomness comes from one seeded ``numpy.random.Generator``: the same arguments give the
same arrays on every machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

MEMBRANE = 1
MITOCHONDRION = 2
CYTOPLASM = 3
CLASS_NAMES: tuple[str, ...] = ("membrane", "mitochondrion", "cytoplasm")
"""Class names; class ``i + 1`` is ``CLASS_NAMES[i]`` (0 is reserved for 'unlabelled')."""


@dataclass(frozen=True)
class _Mito:
    """One mitochondrion: an ellipsoid attached to a cell seed. Lengths in pixels/slices."""

    cell: int  # index of the seed it belongs to
    offset_y: float  # centre offset from the seed, in-plane
    offset_x: float
    z0: float  # centre slice
    half_z: float  # half extent along z in slices
    long_axis: float  # semi-axes in pixels
    short_axis: float
    angle: float  # orientation at z0 (radians)
    twist: float  # orientation change per slice (radians)
    cristae_period: float  # pixels between cristae
    cristae_phase: float


def _as_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """Validate ``(Y, X)`` or ``(Z, Y, X)`` and return it as ``(Z, Y, X)``."""
    dims = tuple(int(s) for s in shape)
    if len(dims) not in (2, 3) or any(d != s for d, s in zip(dims, shape)):
        raise ValueError(f"shape must be (Y, X) or (Z, Y, X) integers; got {shape!r}")
    if len(dims) == 2:
        dims = (1, *dims)
    if dims[0] < 1 or dims[1] < 8 or dims[2] < 8:
        raise ValueError(f"shape {tuple(shape)} is too small: need Z >= 1 and Y, X >= 8 pixels")
    return dims  # type: ignore[return-value]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], scale: float, z_scale: float) -> np.ndarray:
    """Smooth zero-mean, unit-ish noise ``[Z, Y, X]`` float32 with features of ``scale`` px in-plane and
    ``z_scale`` slices along z: random values on a coarse grid, lightly blurred, then linearly upsampled."""
    z, y, x = shape
    coarse = (
        max(2, math.ceil(z / z_scale) + 2),
        max(2, math.ceil(y / scale) + 2),
        max(2, math.ceil(x / scale) + 2),
    )
    grid = rng.standard_normal(coarse).astype(np.float32)
    grid = ndimage.gaussian_filter(grid, sigma=0.7, mode="wrap")
    grid /= grid.std() + 1e-6
    # sample positions of the output pixels on the coarse grid (the +1 margin avoids edge effects)
    cz = np.linspace(1.0, 1.0 + (z - 1) / z_scale, z, dtype=np.float32) if z > 1 else np.ones(1, np.float32)
    cy = np.linspace(1.0, 1.0 + (y - 1) / scale, y, dtype=np.float32)
    cx = np.linspace(1.0, 1.0 + (x - 1) / scale, x, dtype=np.float32)
    # separable linear interpolation (much cheaper than map_coordinates on the full grid)
    out = _interp_axis(grid, cz, axis=0)
    out = _interp_axis(out, cy, axis=1)
    return _interp_axis(out, cx, axis=2)


def _interp_axis(values: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` at fractional ``coords``."""
    lo = np.clip(np.floor(coords).astype(np.int64), 0, values.shape[axis] - 2)
    frac = (coords - lo).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(values, lo, axis=axis) * (1 - frac) + np.take(values, lo + 1, axis=axis) * frac


def _vesicle_field(rng: np.random.Generator, shape: tuple[int, int, int], density: float) -> np.ndarray:
    """Grey-level offsets ``[Z, Y, X]`` of small vesicles: thin dark rings (radius ~2.6 px) around a
    slightly lighter lumen; each vesicle spans two neighbouring slices."""
    if density <= 0:
        return np.zeros(shape, np.float32)
    centres = rng.random(shape) < density / 2
    if shape[0] > 1:
        centres[1:] |= centres[:-1]
    out = np.zeros(shape, np.float32)
    radius = 2.6
    for z in range(shape[0]):
        if not centres[z].any():
            continue
        dist = ndimage.distance_transform_edt(~centres[z]).astype(np.float32)
        ring = np.exp(-(((dist - radius) / 0.8) ** 2))
        out[z] = -85.0 * ring + 15.0 * (dist < radius - 0.9)
    return out


def _seed_points(rng: np.random.Generator, height: int, width: int, cell_size: float) -> np.ndarray:
    """Jittered-grid seeds ``[N, 2]`` (y, x) covering the image plus a one-cell margin."""
    cell_size = float(cell_size)
    margin = cell_size
    ys = np.arange(-margin, height + margin, cell_size)
    xs = np.arange(-margin, width + margin, cell_size)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)  # [N, 2]
    # staggered rows give hexagon-like cells; the jitter makes sizes and shapes vary
    row = np.round((grid[:, 0] + margin) / cell_size).astype(np.int64)
    grid[:, 1] += (row % 2) * cell_size * 0.5
    grid += rng.uniform(-0.42, 0.42, size=grid.shape) * cell_size
    return grid


def _make_mitochondria(
    rng: np.random.Generator, n_cells: int, depth: int, cell_size: float, probability: float
) -> list[_Mito]:
    mitos: list[_Mito] = []
    for cell in range(n_cells):
        if rng.uniform() >= probability:
            continue
        long_axis = cell_size * rng.uniform(0.2, 0.36)
        short_axis = long_axis * rng.uniform(0.4, 0.65)
        radius = rng.uniform(0.0, 0.12) * cell_size
        phi = rng.uniform(0, 2 * np.pi)
        mitos.append(
            _Mito(
                cell=cell,
                offset_y=radius * math.sin(phi),
                offset_x=radius * math.cos(phi),
                z0=rng.uniform(-3.0, depth + 2.0) if depth > 1 else 0.0,
                half_z=rng.uniform(2.5, 7.0),
                long_axis=long_axis,
                short_axis=short_axis,
                angle=rng.uniform(0, np.pi),
                twist=rng.normal(0.0, 0.05),
                cristae_period=rng.uniform(4.0, 6.5),
                cristae_phase=rng.uniform(0, 2 * np.pi),
            )
        )
    return mitos


@dataclass
class _SliceFields:
    """Smooth random fields of a synthetic stack, each ``[Z, Y, X]`` float32 (``cell_tone``: ``[N]``)."""

    warp_y: np.ndarray  # px
    warp_x: np.ndarray  # px
    membrane_width: np.ndarray  # px
    texture_coarse: np.ndarray
    texture_fine: np.ndarray
    vesicles: np.ndarray  # grey levels
    cell_tone: np.ndarray  # per-cell cytoplasm shade


def _render_slice(z: int, centres: np.ndarray, fields: _SliceFields, mitos: list) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``z`` of the stack: grey values ``[Y, X]`` float32 (before blur and noise) and labels ``[Y, X]``
    uint8, from the cell centres ``[N, 2]`` of this slice (a Voronoi tessellation with warped walls)."""
    height, width = fields.warp_y.shape[1:]
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    tree = cKDTree(centres)
    query = np.stack([yy + fields.warp_y[z], xx + fields.warp_x[z]], axis=-1).reshape(-1, 2)  # [Y*X, 2]
    dist, idx = tree.query(query, k=2)
    d1, d2 = dist[:, 0] ** 2, dist[:, 1] ** 2
    gap = np.linalg.norm(centres[idx[:, 0]] - centres[idx[:, 1]], axis=-1)
    wall = ((d2 - d1) / (2.0 * np.maximum(gap, 1e-6))).reshape(height, width).astype(np.float32)  # px to the wall
    cell = idx[:, 0].reshape(height, width)
    half = 0.5 * fields.membrane_width[z]

    membrane = wall < half
    # membrane darkness: soft profile across the wall so edges are anti-aliased
    darkness = np.clip(1.0 - (wall - half) / 1.2, 0.0, 1.0)
    darkness = np.where(membrane, 1.0, darkness * (wall < half + 1.2))

    fine = fields.texture_fine[z]
    cyto = 168.0 + 11.0 * fields.cell_tone[cell] + 12.0 * fields.texture_coarse[z] + 10.0 * fine + fields.vesicles[z]
    plane = cyto * (1.0 - darkness) + (62.0 + 8.0 * fine) * darkness
    label = np.where(membrane, MEMBRANE, CYTOPLASM).astype(np.uint8)
    for mito in mitos:
        _draw_mitochondrion(mito, z, centres, wall, half, cell, plane, label, fine)
    return plane, label


def synthetic_em(
    shape: tuple[int, ...] | list[int] = (8, 256, 256),
    seed: int = 0,
    *,
    cell_size: float = 40.0,
    membrane_width: float = 3.0,
    mito_probability: float = 0.6,
    noise_std: float = 12.0,
    blur_sigma: float = 0.8,
    z_drift: float = 1.0,
    vesicle_density: float = 0.003,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a synthetic EM image or stack with dense class labels.

    Args:
        shape: ``(Y, X)`` or ``(Z, Y, X)``; any rectangle (Y, X >= 8).
        seed: random seed; equal arguments give identical outputs.
        cell_size: mean cell diameter in pixels.
        membrane_width: mean membrane width in pixels (varies +-25 % along the walls).
        mito_probability: probability that a cell carries a mitochondrion.
        noise_std: standard deviation of the additive Gaussian noise, in grey levels (0..255).
        blur_sigma: in-plane Gaussian blur (pixels) applied before the noise.
        z_drift: typical in-plane movement of a cell centre between neighbouring slices, in pixels.
        vesicle_density: small vesicles (dark rings, light centre) per pixel in the cytoplasm.

    Returns:
        ``(image, labels)``: both uint8 with ``shape``; labels 1 = membrane, 2 = mitochondrion,
        3 = cytoplasm (see `CLASS_NAMES`).
    """
    if cell_size < 8 or membrane_width <= 0 or not 0.0 <= mito_probability <= 1.0 or noise_std < 0 or blur_sigma < 0:
        raise ValueError(
            "need cell_size >= 8, membrane_width > 0, 0 <= mito_probability <= 1, noise_std >= 0 and "
            f"blur_sigma >= 0; got cell_size={cell_size}, membrane_width={membrane_width}, "
            f"mito_probability={mito_probability}, noise_std={noise_std}, blur_sigma={blur_sigma}"
        )
    depth, height, width = _as_shape(shape)
    rng = np.random.default_rng(seed)

    seeds = _seed_points(rng, height, width, cell_size)  # [N, 2]
    n_cells = len(seeds)
    velocity = rng.normal(0.0, z_drift, size=(n_cells, 2))  # [N, 2] px per slice
    cell_tone = rng.normal(0.0, 1.0, size=n_cells).astype(np.float32)  # per-cell cytoplasm shade
    mitos = _make_mitochondria(rng, n_cells, depth, cell_size, mito_probability)

    volume = (depth, height, width)
    warp_y = _smooth_noise(rng, volume, cell_size * 0.7, 4.0) * (cell_size * 0.11)
    warp_x = _smooth_noise(rng, volume, cell_size * 0.7, 4.0) * (cell_size * 0.11)
    width_field = membrane_width * (1.0 + 0.25 * np.tanh(_smooth_noise(rng, volume, cell_size * 0.5, 3.0)))
    texture_coarse = _smooth_noise(rng, volume, 6.0, 2.0)
    texture_fine = ndimage.gaussian_filter(
        rng.standard_normal(volume).astype(np.float32), sigma=(0.0, 0.9, 0.9)
    )
    texture_fine /= texture_fine.std() + 1e-6
    slice_gain = rng.normal(0.0, 2.5, size=depth).astype(np.float32)
    vesicles = _vesicle_field(rng, volume, density=vesicle_density)

    fields = _SliceFields(warp_y, warp_x, width_field, texture_coarse, texture_fine, vesicles, cell_tone)
    image = np.empty(volume, dtype=np.float32)
    labels = np.empty(volume, dtype=np.uint8)
    for z in range(depth):
        plane, labels[z] = _render_slice(z, seeds + velocity * z, fields, mitos)
        image[z] = plane + slice_gain[z]

    if blur_sigma > 0:
        image = ndimage.gaussian_filter(image, sigma=(0.0, blur_sigma, blur_sigma))
    if noise_std > 0:
        image += rng.normal(0.0, noise_std, size=volume).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    out_shape = tuple(int(s) for s in shape)
    return image.reshape(out_shape), labels.reshape(out_shape)


def _draw_mitochondrion(
    mito: _Mito,
    z: int,
    centres: np.ndarray,
    wall: np.ndarray,
    half_width: np.ndarray,
    cell: np.ndarray,
    plane: np.ndarray,
    label: np.ndarray,
    texture: np.ndarray,
) -> None:
    """Paint the cross-section of ``mito`` in slice ``z`` into ``plane`` (grey) and ``label`` in place."""
    dz = (z - mito.z0) / mito.half_z
    if abs(dz) >= 1.0:
        return
    shrink = math.sqrt(1.0 - dz * dz)
    a, b = mito.long_axis * shrink, mito.short_axis * max(shrink, 0.6)
    if b < 1.5:
        return
    cy = centres[mito.cell, 0] + mito.offset_y
    cx = centres[mito.cell, 1] + mito.offset_x
    height, width = plane.shape
    y0, y1 = max(0, int(cy - a - 2)), min(height, int(cy + a + 3))
    x0, x1 = max(0, int(cx - a - 2)), min(width, int(cx + a + 3))
    if y0 >= y1 or x0 >= x1:
        return
    ly, lx = np.meshgrid(np.arange(y0, y1) - cy, np.arange(x0, x1) - cx, indexing="ij")
    theta = mito.angle + mito.twist * z
    u = lx * math.cos(theta) + ly * math.sin(theta)  # along the long axis
    v = -lx * math.sin(theta) + ly * math.cos(theta)  # across
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    # keep the organelle inside its own cell and clear of the membrane
    region = (slice(y0, y1), slice(x0, x1))
    inside = (radius <= 1.0) & (cell[region] == mito.cell) & (wall[region] > half_width[region] + 2.0)
    if not inside.any():
        return
    depth_px = (1.0 - radius) * b  # approximate distance to the outline, px
    outer = depth_px < 1.6
    cristae = 0.5 + 0.5 * np.cos(2 * np.pi * u / mito.cristae_period + mito.cristae_phase + 0.8 * texture[region])
    grey = 112.0 - 38.0 * (cristae > 0.62) + 6.0 * texture[region]
    grey = np.where(outer, 58.0, grey)
    plane[region] = np.where(inside, grey, plane[region])
    label[region] = np.where(inside, MITOCHONDRION, label[region])
