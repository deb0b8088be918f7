"""Pieces every model family shares: input checks, patchify, MAE loss, position codes.

Mask convention (stated once, used everywhere): ``mask`` is a bool tensor ``[B, h, w]`` on the
patch lattice (``h = H / p``, ``w = W / p``) and **True means masked** (hidden from the
encoder, reconstructed by the decoder).
"""
from __future__ import annotations

import math

import torch

PATCH_SIZE = 8


def validate_image(x: torch.Tensor, patch: int = PATCH_SIZE, min_size: int | None = None) -> None:
    """Raise a ValueError naming the problem unless ``x`` is a finite ``[B, 1, H, W]`` float tensor
    with H and W multiples of ``patch`` (and at least ``min_size`` pixels, default one patch)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor [B, 1, H, W]; got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (add batch and channel axes: x[None, None])" if x.dim() == 2 else ""
        raise ValueError(f"expected a 4-D tensor [B, 1, H, W]; got {x.dim()}-D shape {tuple(x.shape)}{hint}")
    if x.shape[1] != 1:
        what = "an RGB/multi-channel image" if x.shape[1] in (3, 4) else f"{x.shape[1]} channels"
        raise ValueError(
            f"expected one-channel EM input [B, 1, H, W]; got {what} (shape {tuple(x.shape)}). "
            "Convert to grayscale first."
        )
    if not x.dtype.is_floating_point:
        raise ValueError(f"expected a floating-point tensor; got {x.dtype} (normalise the image first)")
    h, w = x.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(
            f"height and width must be multiples of the patch size {patch}; got {h} x {w} "
            f"(pad to {math.ceil(h / patch) * patch} x {math.ceil(w / patch) * patch})"
        )
    min_size = patch if min_size is None else min_size
    if h < min_size or w < min_size:
        raise ValueError(f"image {h} x {w} is too small: at least {min_size} x {min_size} pixels are needed")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")


def validate_mask(mask: torch.Tensor, batch: int, h: int, w: int) -> None:
    """The given mask must be bool ``[B, h, w]`` with the same number of visible patches per sample."""
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, h, w):
        raise ValueError(f"mask must be a bool tensor [B, H/8, W/8] = {(batch, h, w)}; got {mask.dtype} {tuple(mask.shape)}")
    visible = (~mask).flatten(1).sum(1)
    if (visible != visible[0]).any():
        raise ValueError(f"every sample must have the same number of visible patches; got {visible.tolist()}")
    if int(visible[0]) == 0:
        raise ValueError("mask hides every patch: at least one patch must stay visible")


def patchify(x: torch.Tensor, patch: int = PATCH_SIZE) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, h*w, p*p*C]`` in row-major lattice order."""
    b, c, hh, ww = x.shape
    h, w = hh // patch, ww // patch
    x = x.reshape(b, c, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
    return x.reshape(b, h * w, patch * patch * c)


def unpatchify(patches: torch.Tensor, h: int, w: int, patch: int = PATCH_SIZE) -> torch.Tensor:
    """``[B, h*w, p*p*C]`` -> ``[B, C, h*p, w*p]``."""
    b, _, d = patches.shape
    c = d // (patch * patch)
    x = patches.reshape(b, h, w, patch, patch, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
    return x.reshape(b, c, h * patch, w * patch)


def smooth_image(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (reflect padding, kernel radius ``ceil(3 sigma)``);
    ``sigma <= 0`` returns ``x`` unchanged."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3.0 * sigma))
    radius = min(radius, x.shape[-2] - 1, x.shape[-1] - 1)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def target_values(patch: int = PATCH_SIZE, pool: int = 1) -> int:
    """Number of target values per patch: ``(patch / pool) ** 2``."""
    check_target_pool(pool, patch)
    return (patch // pool) ** 2


def check_target_pool(pool: int, patch: int = PATCH_SIZE) -> None:
    if int(pool) != pool or pool < 1 or patch % int(pool):
        raise ValueError(f"target_pool must be a positive divisor of the patch size {patch} (1, 2, 4 or 8); got {pool}")


def patch_targets(x: torch.Tensor, patch: int = PATCH_SIZE, norm_pix: bool = True, pool: int = 1,
                  blur: float = 0.0, norm_floor: float = 0.0) -> torch.Tensor:
    """Reconstruction targets ``[B, h*w, (p/pool)**2]`` of ``x`` ``[B, 1, H, W]``.

    ``blur`` > 0: the image is first smoothed with a Gaussian of that sigma (pixels). ``pool`` > 1: each
    ``pool x pool`` square of a patch is averaged, so a patch is described by ``(p/pool)**2`` means (its
    coarse structure) instead of ``p*p`` single pixels. With ``norm_pix`` each patch's values are then
    standardised (MAE): zero mean, unit (unbiased) variance; ``norm_floor`` > 0 adds that fraction of the
    sample's variance (of the target values over all its patches) to each patch's variance before dividing,
    so a flat patch (noise only) keeps small targets instead of noise blown up to unit variance.
    """
    check_target_pool(pool, patch)
    x = smooth_image(x, blur)
    if pool > 1:
        x = torch.nn.functional.avg_pool2d(x, pool)
    target = patchify(x, patch // pool)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        if norm_floor > 0:
            var = var + norm_floor * target.flatten(1).var(dim=1)[:, None, None]
        target = (target - mean) / (var + 1.0e-6).sqrt()
    return target


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels of the given (masked) patches: pred, target ``[B, n, p*p]``."""
    return ((pred.float() - target.float()) ** 2).mean()


def lattice_positions(h: int, w: int, device=None) -> torch.Tensor:
    """Integer (y, x) of every lattice cell in row-major order: ``[h*w, 2]`` int64."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1)


def split_by_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major lattice indices of visible and of masked cells: ``[B, n_vis]``, ``[B, n_mask]``.

    Sorting puts visible (False) before masked (True) and keeps row-major order within each.
    """
    b = mask.shape[0]
    flat = mask.reshape(b, -1)
    order = torch.sort(flat.to(torch.int8), dim=1, stable=True).indices
    n_vis = int((~flat[0]).sum())
    return order[:, :n_vis], order[:, n_vis:]


def sincos_position_code(pos: torch.Tensor, dim: int, canvas: tuple[int, int]) -> torch.Tensor:
    """Sine-cosine code of (y, x) positions normalised by the canvas size (not the tensor max).

    pos ``[..., 2]`` in lattice units, canvas ``(h, w)`` -> ``[..., dim]``; dim divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"position code dim must be divisible by 4; got {dim}")
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=pos.device, dtype=torch.float32) / quarter)
    h, w = canvas
    y = pos[..., 0].float() / max(h, 1) * 2 * math.pi * 32  # [..]
    x = pos[..., 1].float() / max(w, 1) * 2 * math.pi * 32
    ang_y = y[..., None] * freq
    ang_x = x[..., None] * freq
    return torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=-1)
