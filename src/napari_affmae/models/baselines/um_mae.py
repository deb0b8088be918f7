"""UM-MAE baseline: Uniform Masking for a Swin-style pyramid.

- Uniform Sampling: in every 2x2 block of 8-px patches exactly one patch stays visible (75 %
  masked), so the visible patches pack into a dense quarter-size image: block (i, j) -> compact
  cell (i, j).
- One gather index ``[B, h/2 * w/2]`` (row-major lattice index of block (i, j)'s visible patch)
  does everything: it compacts the patches, gives each compact token its true lattice position
  (for the relative-position bias) and tells the decoder where each token goes back to.
  (Using the row-major order of the visible patches instead would pair compact cells with the
  wrong positions whenever a block row mixes top and bottom picks.)
- Secondary Masking: a random 25 % of the compact tokens are replaced by a learnable token
  inside the encoder; the loss still covers only the primary (uniform) mask.
- The pyramid's stage outputs are fused per compact token (fusion neck), scattered back to the
  full lattice with mask tokens elsewhere, and a light decoder predicts every patch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..common import PATCH_SIZE, lattice_positions, patchify, validate_image
from ..masking import UNIFORM_RATIO, MaskedAutoencoder, MaskSpec, uniform_sampling_mask  # noqa: F401
from .base import PATCH_PIXELS, check_image_multiple, init_weights, reconstruction_loss, register_family
from .hierarchical import PatchEmbed, PyramidConfig, PyramidSegmenter, build_pyramid, pyramid_sizes
from .swin import FusionNeck, TokenSet

#: Input side multiple for pretraining: 2x2 blocks of 8-px patches.
BLOCK_PIXELS = 2 * PATCH_SIZE


@dataclass(frozen=True)
class UMMAEConfig(PyramidConfig):
    """`PyramidConfig` + the share of compact tokens hidden by Secondary Masking."""

    secondary_mask_ratio: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.secondary_mask_ratio < 1.0:
            raise ValueError(f"secondary_mask_ratio must be in [0, 1); got {self.secondary_mask_ratio}")

    def bias_range(self) -> tuple[float, int]:
        # compaction roughly doubles true offsets, and merged positions are fractional
        return float(2 * self.window), 4


def uniform_gather_index(mask: torch.Tensor) -> torch.Tensor:
    """Row-major lattice index of each 2x2 block's visible cell, blocks in row-major order:
    mask ``[B, h, w]`` -> ``[B, h/2 * w/2]``. Raises unless every block has exactly one visible cell."""
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"mask must be a bool tensor [B, H/8, W/8]; got {mask.dtype} {tuple(mask.shape)}")
    b, h, w = mask.shape
    if h % 2 or w % 2:
        raise ValueError(f"UM-MAE masks need an even lattice (2x2 blocks); got {h} x {w}")
    blocks = (~mask).reshape(b, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, h // 2, w // 2, 4)
    per_block = blocks.sum(-1)  # [B, h/2, w/2]
    if (per_block != 1).any():
        bad = int((per_block != 1).sum())
        raise ValueError(
            f"UM-MAE needs exactly one visible patch in every 2x2 block (uniform sampling); {bad} block(s) "
            "break this. Build masks with model.random_mask or pass mask=None."
        )
    pick = blocks.to(torch.uint8).argmax(-1)  # [B, h/2, w/2] in 0..3 = dy * 2 + dx
    cells = lattice_positions(h // 2, w // 2, device=mask.device).reshape(h // 2, w // 2, 2)
    rows = 2 * cells[..., 0] + pick // 2
    cols = 2 * cells[..., 1] + pick % 2
    return (rows * w + cols).reshape(b, -1)


def secondary_mask(batch: int, n: int, ratio: float, device=None) -> torch.Tensor:
    """``[B, n]`` bool: ``round(n * ratio)`` random tokens per sample are True (replaced)."""
    count = round(n * ratio)
    order = torch.argsort(torch.rand(batch, n, device=device), dim=1)
    hidden = torch.zeros(batch, n, dtype=torch.bool, device=device)
    hidden.scatter_(1, order[:, :count], True)
    return hidden


class UMMAE(MaskedAutoencoder, nn.Module):
    """UM-MAE pretraining model. ``forward(x [B, 1, H, W], mask=None)`` with H, W multiples of 16
    -> dict(loss, pred ``[B, h*w, 64]``, mask ``[B, h, w]``, secondary_mask ``[B, h/2 * w/2]``).
    A given mask must keep exactly one visible patch per 2x2 block (`uniform_sampling_mask`)."""

    patch_size = PATCH_SIZE
    size_multiple = BLOCK_PIXELS
    default_mask = MaskSpec(UNIFORM_RATIO, "uniform")
    mask_kinds = ("uniform",)

    def __init__(self, config: UMMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = PatchEmbed(config.dims[0])
        self.secondary_token = nn.Parameter(torch.zeros(config.dims[0]))
        self.pyramid = build_pyramid(config)
        self.neck = FusionNeck(config.dims, config.neck_dim)
        self.decoder = config.make_decoder(config.neck_dim)
        init_weights(self)
        nn.init.normal_(self.secondary_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        validate_image(x)
        check_image_multiple(x, BLOCK_PIXELS, "UM-MAE samples one 8-px patch per 2x2 block")
        b = x.shape[0]
        h, w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        if mask is None:
            mask = self.random_mask(b, h, w, device=x.device)
        elif tuple(mask.shape) != (b, h, w):
            raise ValueError(f"mask must have shape [B, H/8, W/8] = {(b, h, w)}; got {tuple(mask.shape)}")
        gather = uniform_gather_index(mask)  # [B, n]: compaction, true positions and decoder placement
        patches = patchify(x).gather(1, gather[..., None].expand(-1, -1, PATCH_PIXELS))  # [B, n, 64]
        tokens = self.embed(patches)  # [B, n, C0]
        hidden = secondary_mask(b, gather.shape[1], self.config.secondary_mask_ratio, device=x.device)
        tokens = torch.where(hidden[..., None], self.secondary_token.to(tokens.dtype), tokens)
        true_pos = lattice_positions(h, w, device=x.device)[gather].float()  # [B, n, 2]
        compact = TokenSet(lattice_positions(h // 2, w // 2, device=x.device), (h // 2, w // 2), true_pos)
        feats = self.neck(self.pyramid(tokens, compact))  # [B, n, neck_dim]
        pred = self.decoder(feats, gather, (h, w))  # [B, h*w, 64]
        loss = reconstruction_loss(x, pred, mask, self.config.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask, "secondary_mask": hidden}


class UMMAESegmenter(PyramidSegmenter):
    """UM-MAE encoder on the full (uncompacted) lattice + fusion neck + per-patch head."""

    mae_class = UMMAE


#: The shared pyramid sizes; UM-MAE decodes every patch of the lattice, and base is one block deeper to match
#: the parameter count.
SIZES = pyramid_sizes(UMMAEConfig, tiny=dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
                      base=dict(depths=(2, 2, 15, 2)))

register_family("um_mae", SIZES, UMMAE, UMMAESegmenter)
