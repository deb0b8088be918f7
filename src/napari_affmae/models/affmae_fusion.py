"""Full-resolution segmentation head of AFFMAE: U-Net-style fusion of the decoder's lattice features with
the stem's stride-4 and stride-2 maps and the image itself.

The decoder predicts one feature vector per 8 x 8 lattice cell. A per-cell logit patch can draw fine
structure (membranes 2-4 px wide, mitochondria edges) only through that vector; the fusion instead
upsamples the lattice features 2x at a time and mixes in, at each scale, the features of the same pixels
that the (unmasked) conv stem already computed:

    lattice [B, D, h, w] -> s4 [B, 4c, H/4, W/4] (+ stem level 2) -> s2 [B, 2c, H/2, W/2] (+ stem level 1)
    -> s1 [B, c, H, W] (+ a 3x3 conv of the image) -> logits [B, K, H, W]

Every step is local (3x3 convs, per-pixel LayerNorm, bilinear 2x upsampling): an output pixel depends on
inputs within `FusionHead.reach` pixels, so the head can run on bands of rows with that halo and give
the same values (`fuse_in_bands`, the no-grad inference path).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import PATCH_SIZE
from .layers import ChannelNorm


class FuseStep(nn.Sequential):
    """3x3 conv, per-pixel LayerNorm, GELU: ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), ChannelNorm(c_out), nn.GELU())


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling ``[B, C, H, W] -> [B, C, 2H, 2W]`` (half-pixel centres)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class FusionHead(nn.Module):
    """Decoder lattice features + stem maps + image -> full-resolution logits (see the module docstring)."""

    #: Pixels of input an output pixel can depend on, above or below it (a bound, checked in the tests):
    #: per scale one 3x3 conv and one bilinear step, 1-2 rows of that scale, summed over the scales.
    reach = 3 * PATCH_SIZE

    def __init__(self, decoder_dim: int, stem_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.lattice = nn.Sequential(nn.LayerNorm(decoder_dim), nn.Linear(decoder_dim, 4 * width))
        self.s4 = FuseStep(4 * width + stem_channels, 4 * width)
        self.s2 = FuseStep(4 * width + stem_channels, 2 * width)
        self.pixels = FuseStep(1, width)
        self.s1 = FuseStep(2 * width + width, width)
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, lattice: torch.Tensor, level2: torch.Tensor, level1: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        """lattice ``[B, h, w, D]`` (decoder features per cell), level2 ``[B, S, H/4, W/4]``, level1
        ``[B, S, H/2, W/2]`` (stem maps), x ``[B, 1, H, W]`` -> logits ``[B, K, H, W]``."""
        feat = self.lattice(lattice).permute(0, 3, 1, 2)  # [B, 4c, h, w]
        feat = self.s4(torch.cat([upsample2(feat), level2], dim=1))  # [B, 4c, H/4, W/4]
        feat = self.s2(torch.cat([upsample2(feat), level1], dim=1))  # [B, 2c, H/2, W/2]
        feat = self.s1(torch.cat([upsample2(feat), self.pixels(x)], dim=1))  # [B, c, H, W]
        return self.out(feat)


def fuse_in_bands(head: FusionHead, lattice: torch.Tensor, x: torch.Tensor,
                  stem_rows: Callable[[int, int, int], torch.Tensor], rows: int) -> torch.Tensor:
    """``head(lattice, level2, level1, x)`` computed ``rows`` lattice rows at a time -> ``[B, K, H, W]``.

    lattice ``[B, h, w, D]``; x ``[B, 1, H, W]``; ``stem_rows(level, start, stop)`` returns rows
    ``[start, stop)`` of the stem's level-``level`` map (1: stride 2, 2: stride 4). Each band is computed
    with `FusionHead.reach` pixels (rounded up to lattice rows) of real neighbours above and below, which
    makes its own border rows exact; rows outside the image are the whole computation's padding."""
    p = PATCH_SIZE
    h = lattice.shape[1]
    halo = -(-head.reach // p)  # lattice rows
    out = None
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a, b = max(0, r0 - halo), min(h, r1 + halo)
        band = head(lattice[:, a:b], stem_rows(2, 2 * a, 2 * b), stem_rows(1, 4 * a, 4 * b), x[:, :, p * a:p * b])
        if out is None:
            out = band.new_empty(band.shape[0], band.shape[1], h * p, x.shape[-1])
        out[:, :, p * r0:p * r1] = band[:, :, p * (r0 - a):p * (r1 - a)]
    return out
