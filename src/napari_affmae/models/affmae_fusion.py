"""Full-resolution segmentation head of AFFMAE: U-Net-style fusion of the decoder's lattice features with
the stem's stride-4 and stride-2 maps and the image itself.

The decoder predicts one feature vector per 8 x 8 lattice cell. A per-cell logit patch can draw fine
structure (membranes 2-4 px wide, mitochondria edges) only through that vector; the fusion instead
upsamples the lattice features 2x at a time and mixes in, at each scale, the features of the same pixels
that the (unmasked) conv stem already computed:

    lattice [B, D, h, w] -> s4 [B, 4c, H/4, W/4] (+ stem level 2) -> s2 [B, 2c, H/2, W/2] (+ stem level 1)
    -> s1 [B, c, H, W] (+ 3x3 conv features of the image) -> logits [B, K, H, W]

(``depth`` 3x3 convs per step at stride 2 and 1 and on the image; one at stride 4.)

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
    """``depth`` x (3x3 conv, per-pixel LayerNorm, GELU): ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, c_in: int, c_out: int, depth: int = 1) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), ChannelNorm(c_out), nn.GELU()]
        super().__init__(*layers)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x upsampling ``[B, C, H, W] -> [B, C, 2H, 2W]`` (half-pixel centres)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class FusionHead(nn.Module):
    """Decoder lattice features + stem maps + image -> full-resolution logits (see the module docstring)."""

    def __init__(self, decoder_dim: int, stem_channels: int, num_classes: int, width: int = 16,
                 depth: int = 1) -> None:
        """``depth``: 3x3 convs of the stride-2 and full-resolution steps and of the image's own features
        (the steps that draw fine structure; the stride-4 step has one)."""
        super().__init__()
        self.depth = depth
        self.lattice = nn.Sequential(nn.LayerNorm(decoder_dim), nn.Linear(decoder_dim, 4 * width))
        self.s4 = FuseStep(4 * width + stem_channels, 4 * width)
        self.s2 = FuseStep(4 * width + stem_channels, 2 * width, depth)
        self.pixels = FuseStep(1, width, depth)
        self.s1 = FuseStep(2 * width + width, width, depth)
        self.out = nn.Conv2d(width, num_classes, 1)

    @property
    def reach(self) -> int:
        """Pixels of input an output pixel can depend on, above or below it (a bound, checked in the tests):
        per scale its 3x3 convs and one bilinear step, 1-2 rows of that scale each, summed over the scales."""
        return 3 * PATCH_SIZE + 4 * (self.depth - 1)

    @property
    def fine_margin(self) -> int:
        """Stride-2 rows of margin `fine_in_strips` takes around a strip: 1 for the bilinear step, and the
        2 ``depth`` pixels of the full-resolution convs (``depth`` on the image, then ``depth`` on the fused
        features), in stride-2 rows."""
        return 1 + self.depth

    def forward(self, lattice: torch.Tensor, level2: torch.Tensor, level1: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        """lattice ``[B, h, w, D]`` (decoder features per cell), level2 ``[B, S, H/4, W/4]``, level1
        ``[B, S, H/2, W/2]`` (stem maps), x ``[B, 1, H, W]`` -> logits ``[B, K, H, W]``."""
        return self.fine(self.coarse(lattice, level2, level1), x)

    def coarse(self, lattice: torch.Tensor, level2: torch.Tensor, level1: torch.Tensor) -> torch.Tensor:
        """The stride-4 and stride-2 steps -> features ``[B, 2c, H/2, W/2]``."""
        feat = self.lattice(lattice).permute(0, 3, 1, 2)  # [B, 4c, h, w]
        feat = self.s4(torch.cat([upsample2(feat), level2], dim=1))  # [B, 4c, H/4, W/4]
        return self.s2(torch.cat([upsample2(feat), level1], dim=1))  # [B, 2c, H/2, W/2]

    def fine(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution step: stride-2 features ``[B, 2c, H/2, W/2]`` + image ``[B, 1, H, W]`` -> logits."""
        feat = self.s1(torch.cat([upsample2(feat), self.pixels(x)], dim=1))  # [B, c, H, W]
        return self.out(feat)


def fine_in_strips(head: FusionHead, feat: torch.Tensor, x: torch.Tensor, row0: int, rows: int) -> torch.Tensor:
    """``head.fine`` for image rows ``[2 row0, 2 row0 + 2 n)`` in strips of ``rows`` pixel rows.

    feat: stride-2 features ``[B, 2c, n, W/2]``, rows ``[row0, row0 + n)`` of the whole map; x: the whole
    image ``[B, 1, H, W]``. Each strip reads up to `FusionHead.fine_margin` stride-2 rows beyond it, as far as ``feat``
    goes: every output row is exact except the first and last ``2 fine_margin`` of ``feat``'s rows, which
    are exact only where they are the image border (there the whole computation pads the same way)."""
    n, margin = feat.shape[-2], head.fine_margin
    top, bottom = 2 * row0, 2 * (row0 + n)
    out = None
    for p0 in range(top, bottom, rows):
        p1 = min(bottom, p0 + rows)
        s0, s1 = max(row0, p0 // 2 - margin), min(row0 + n, (p1 + 1) // 2 + margin)
        strip = head.fine(feat[:, :, s0 - row0:s1 - row0], x[:, :, 2 * s0:2 * s1])  # pixel rows [2 s0, 2 s1)
        if out is None:
            out = strip.new_empty(strip.shape[0], strip.shape[1], bottom - top, x.shape[-1])
        out[:, :, p0 - top:p1 - top] = strip[:, :, p0 - 2 * s0:p1 - 2 * s0]
    return out


def fuse_in_bands(head: FusionHead, lattice: torch.Tensor, x: torch.Tensor,
                  stem_rows: Callable[[int, int, int], torch.Tensor], rows: int,
                  strip_rows: int | None = None) -> torch.Tensor:
    """``head(lattice, level2, level1, x)`` computed ``rows`` lattice rows at a time -> ``[B, K, H, W]``.

    lattice ``[B, h, w, D]``; x ``[B, 1, H, W]``; ``stem_rows(level, start, stop)`` returns rows
    ``[start, stop)`` of the stem's level-``level`` map (1: stride 2, 2: stride 4). Each band's coarse steps
    are computed with `FusionHead.reach` pixels (rounded up to lattice rows) of real neighbours above and
    below, which makes its own rows exact; rows outside the image are the whole computation's padding. The
    full-resolution step then runs on ``strip_rows`` pixel rows at a time (`fine_in_strips`; default: the
    band at once)."""
    p = PATCH_SIZE
    h = lattice.shape[1]
    halo = -(-head.reach // p)  # lattice rows
    out = None
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        a, b = max(0, r0 - halo), min(h, r1 + halo)
        feat = head.coarse(lattice[:, a:b], stem_rows(2, 2 * a, 2 * b), stem_rows(1, 4 * a, 4 * b))
        # keep the band's own stride-2 rows plus the margin its full-resolution strips read (exact: the halo
        # is wider than the coarse steps' reach)
        k0, k1 = max(4 * a, 4 * r0 - head.fine_margin), min(4 * b, 4 * r1 + head.fine_margin)
        fine = fine_in_strips(head, feat[:, :, k0 - 4 * a:k1 - 4 * a], x, k0, strip_rows or p * (r1 - r0))
        if out is None:
            out = fine.new_empty(fine.shape[0], fine.shape[1], h * p, x.shape[-1])
        out[:, :, p * r0:p * r1] = fine[:, :, p * r0 - 2 * k0:p * r1 - 2 * k0]
    return out
