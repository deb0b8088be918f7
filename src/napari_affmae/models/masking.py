"""Mask generators on the patch lattice. True = masked (see `models.common`).

Every sample of a batch gets exactly ``n_visible = round(h * w * (1 - ratio))`` visible
patches (at least one), so visible tokens stack into one dense ``[B, n_visible, C]`` tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_TYPES = ("blob", "random")
#: Blob scales, in lattice cells per noise cell (8/16/32/64 pixels with 8-pixel patches).
BLOB_CELLS = (1, 2, 4, 8)


def visible_count(h: int, w: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1); got {ratio}")
    return max(1, min(h * w, round(h * w * (1.0 - ratio))))


def mask_from_scores(scores: torch.Tensor, n_visible: int) -> torch.Tensor:
    """Keep the ``n_visible`` lowest scores per sample visible. scores ``[B, h, w]`` -> bool mask."""
    b, h, w = scores.shape
    order = torch.argsort(scores.reshape(b, -1), dim=1)
    mask = torch.ones(b, h * w, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :n_visible], False)
    return mask.reshape(b, h, w)


def random_mask(batch: int, h: int, w: int, ratio: float = 0.5, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """i.i.d. uniform masking (argsort of noise, as in MAE): ``[B, h, w]`` bool."""
    noise = torch.rand(batch, h, w, generator=generator, device=_gen_device(generator, device))
    return mask_from_scores(noise, visible_count(h, w, ratio)).to(device)


def blob_mask(batch: int, h: int, w: int, ratio: float = 0.5, generator: torch.Generator | None = None,
              device=None, cells: tuple[int, ...] = BLOB_CELLS) -> torch.Tensor:
    """Blob-shaped masks from smooth (Perlin-style value) noise, one scale per sample.

    Sample i uses a random grid of noise values with ``cells[i % len(cells)]`` lattice cells per
    grid step, bicubically upsampled to ``h x w``; the lowest ``n_visible`` values stay visible,
    so visible and masked regions form blobs of that scale.
    """
    gdev = _gen_device(generator, device)
    scores = torch.empty(batch, h, w, device=gdev)
    for i in range(batch):
        cell = cells[i % len(cells)]
        gh, gw = -(-h // cell) + 1, -(-w // cell) + 1
        grid = torch.rand(1, 1, gh, gw, generator=generator, device=gdev)
        up = F.interpolate(grid, size=(gh * cell, gw * cell), mode="bicubic", align_corners=True)
        # tiny i.i.d. jitter breaks ties on flat regions
        jitter = 1.0e-4 * torch.rand(h, w, generator=generator, device=gdev)
        scores[i] = up[0, 0, :h, :w] + jitter
    return mask_from_scores(scores, visible_count(h, w, ratio)).to(device)


def make_mask(kind: str, batch: int, h: int, w: int, ratio: float = 0.5,
              generator: torch.Generator | None = None, device=None,
              cells: tuple[int, ...] = BLOB_CELLS) -> torch.Tensor:
    """Dispatch on ``kind`` in `MASK_TYPES`; ``cells``: the blob scales (see `blob_mask`)."""
    if kind == "blob":
        return blob_mask(batch, h, w, ratio, generator, device, cells=tuple(cells))
    if kind == "random":
        return random_mask(batch, h, w, ratio, generator, device)
    raise ValueError(f"unknown mask type {kind!r}; use one of {MASK_TYPES}")


def _gen_device(generator, device):
    return generator.device if generator is not None else device
