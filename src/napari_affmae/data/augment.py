"""Augmentations for fine-tuning crops: the same geometry on image and labels, intensity on the image only.

Works on numpy arrays and torch tensors (``[..., H, W]``; leading axes such as channel are
carried along). Geometry: random flips along y and x and a random rotation by a multiple of
90 degrees. An odd multiple swaps height and width, so it is only drawn for square crops unless
``allow_transpose=True`` (then a ``[H, W]`` crop may come back ``[W, H]``). Intensity (image
only, assumed normalised to about [0, 1]): gamma, contrast around the mean, brightness shift,
optional Gaussian noise. Labels are never interpolated: only flipped/rotated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to draw and their ranges."""

    flip: bool = True
    rot90: bool = True
    allow_transpose: bool = False  # allow odd rot90 on non-square crops (shape becomes [W, H])
    gamma: tuple[float, float] = (0.75, 1.35)  # x -> sign(x) |x| ** gamma
    contrast: tuple[float, float] = (0.8, 1.25)  # (x - mean) * c + mean
    brightness: tuple[float, float] = (-0.08, 0.08)  # x + b
    noise_std: float = 0.0  # additive Gaussian noise std (normalised units)


@dataclass(frozen=True)
class AugmentParams:
    """One drawn augmentation (so it can be replayed, logged or tested)."""

    flip_y: bool
    flip_x: bool
    k_rot90: int  # counter-clockwise quarter turns in the (y, x) plane
    gamma: float
    contrast: float
    brightness: float
    noise_std: float


def draw_params(rng: np.random.Generator, config: AugmentConfig, height: int, width: int) -> AugmentParams:
    """Draw one `AugmentParams` for a crop of ``height x width``."""
    flip_y = bool(config.flip and rng.random() < 0.5)
    flip_x = bool(config.flip and rng.random() < 0.5)
    if not config.rot90:
        k = 0
    elif height == width or config.allow_transpose:
        k = int(rng.integers(4))
    else:
        k = 2 * int(rng.integers(2))  # 0 or 180 degrees keep a non-square shape
    return AugmentParams(
        flip_y=flip_y,
        flip_x=flip_x,
        k_rot90=k,
        gamma=float(rng.uniform(*config.gamma)),
        contrast=float(rng.uniform(*config.contrast)),
        brightness=float(rng.uniform(*config.brightness)),
        noise_std=float(config.noise_std),
    )


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def apply_geometry(x: Any, params: AugmentParams) -> Any:
    """Flip and rotate the last two axes of a numpy array or torch tensor."""
    if _is_torch(x):
        import torch

        if params.flip_y:
            x = torch.flip(x, dims=(-2,))
        if params.flip_x:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, k=params.k_rot90, dims=(-2, -1)) if params.k_rot90 else x
    x = np.asarray(x)
    if params.flip_y:
        x = np.flip(x, axis=-2)
    if params.flip_x:
        x = np.flip(x, axis=-1)
    if params.k_rot90:
        x = np.rot90(x, k=params.k_rot90, axes=(-2, -1))
    return np.ascontiguousarray(x)


def apply_intensity(x: Any, params: AugmentParams, rng: np.random.Generator | None = None) -> Any:
    """Gamma, contrast, brightness (and noise) on a float image; numpy or torch, any shape."""
    if _is_torch(x):
        import torch

        if not x.is_floating_point():
            raise ValueError(f"intensity augmentation needs a float (normalised) image; got {x.dtype}")
        out = torch.sign(x) * x.abs() ** params.gamma
        mean = out.mean()
        out = (out - mean) * params.contrast + mean + params.brightness
        if params.noise_std > 0:
            seed = int((rng or np.random.default_rng()).integers(2**31))
            gen = torch.Generator(device="cpu").manual_seed(seed)
            out = out + params.noise_std * torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        return out
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"intensity augmentation needs a float (normalised) image; got {x.dtype}")
    out = np.sign(x) * np.abs(x) ** params.gamma
    mean = out.mean()
    out = (out - mean) * params.contrast + mean + params.brightness
    if params.noise_std > 0:
        out = out + (rng or np.random.default_rng()).normal(0.0, params.noise_std, size=out.shape)
    return out.astype(x.dtype, copy=False)


def augment_pair(
    image: Any,
    labels: Any | None,
    rng: np.random.Generator,
    config: AugmentConfig = AugmentConfig(),
) -> tuple[Any, Any | None]:
    """Augment one crop: ``image [..., H, W]`` float and optional ``labels [..., H, W]`` with the same
    geometry; intensity changes touch the image only. Returns ``(image, labels)``."""
    height, width = image.shape[-2:]
    if labels is not None and tuple(labels.shape[-2:]) != (height, width):
        raise ValueError(f"labels {tuple(labels.shape)} and image {tuple(image.shape)} must have the same H x W")
    params = draw_params(rng, config, height, width)
    image = apply_intensity(apply_geometry(image, params), params, rng)
    return image, (apply_geometry(labels, params) if labels is not None else None)


def augment_batch(
    images: Any,
    labels: Any | None,
    rng: np.random.Generator,
    config: AugmentConfig = AugmentConfig(),
) -> tuple[Any, Any | None]:
    """Augment each sample of ``images [B, ..., H, W]`` (and ``labels [B, ..., H, W]``) independently.

    For non-square crops with ``allow_transpose`` the samples could disagree in shape, so the
    batch version always keeps the crop shape (only even rotations for non-square crops)."""
    height, width = images.shape[-2:]
    if height != width and config.allow_transpose:
        config = AugmentConfig(**{**config.__dict__, "allow_transpose": False})
    out_images, out_labels = [], []
    for b in range(images.shape[0]):
        img, lab = augment_pair(images[b], None if labels is None else labels[b], rng, config)
        out_images.append(img)
        out_labels.append(lab)
    if _is_torch(images):
        import torch

        stacked = torch.stack(out_images)
        return stacked, (torch.stack(out_labels) if labels is not None else None)
    return np.stack(out_images), (np.stack(out_labels) if labels is not None else None)
