"""GreenMIM baseline: a Swin pyramid that runs on visible tokens only.

- Masking at the coarsest unit: ``u = 2 ** (stages - 1)`` lattice cells per side (64 px for four
  stages), one random mask shared by the whole batch, so every 2x2 merge of visible tokens is
  whole (only the image border can leave children out) and every sample has the same tokens.
- Group Window Attention (`grouping`): windows of visible tokens have unequal sizes; they are
  packed into equal-size groups by a cost-minimising greedy packing, with a block-diagonal
  attention mask inside each group.
- Sparse patch merging: only 2x2 blocks that hold visible tokens are merged.
- Decoder: the last stage has one token per visible unit; a light MAE decoder on the unit grid
  (mask tokens for hidden units) predicts the ``u x u`` patches of every unit, 64 pixels each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import PATCH_SIZE, patchify, validate_image
from ..masking import MaskedAutoencoder, MaskSpec, unit_mask  # noqa: F401  (unit_mask: re-exported)
from .base import PATCH_PIXELS, init_weights, reconstruction_loss, register_family
from .hierarchical import PatchEmbed, PyramidConfig, PyramidSegmenter, build_pyramid, pyramid_sizes
from .swin import TokenSet


@dataclass(frozen=True)
class GreenMIMConfig(PyramidConfig):
    """`PyramidConfig` (GreenMIM adds nothing to it: the share of units masked is a `MaskSpec`)."""


def check_unit_mask(mask: torch.Tensor, batch: int, h: int, w: int, unit: int) -> None:
    """Raise unless ``mask`` is ``[B, h, w]`` bool, shared by the batch, constant on every unit
    and leaves at least one unit visible."""
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, h, w):
        raise ValueError(
            f"mask must be a bool tensor [B, H/8, W/8] = {(batch, h, w)}; got {mask.dtype} {tuple(mask.shape)}"
        )
    if (mask != mask[:1]).any():
        raise ValueError("GreenMIM needs one mask shared by the whole batch (group windows are planned once per batch)")
    pad = (0, -w % unit, 0, -h % unit)
    grid = F.pad(mask[:1, None].float(), pad, value=-1.0)  # [1, 1, hu*u, wu*u], -1 outside the image
    hidden = F.max_pool2d(grid, unit)  # 1 if any cell of the unit is masked
    shown = F.max_pool2d(grid.masked_fill(grid < 0, 1.0).neg(), unit).neg()  # 0 if any cell is visible
    if (hidden != shown).any():
        raise ValueError(
            f"GreenMIM masks must be constant on {unit}x{unit}-patch units ({unit * PATCH_SIZE} px) so 2x2 merges "
            "stay whole; build masks with model.random_mask or pass mask=None"
        )
    if bool(mask[0].all()):
        raise ValueError("mask hides every patch: at least one unit must stay visible")


class GreenMIM(MaskedAutoencoder, nn.Module):
    """GreenMIM pretraining model. ``forward(x [B, 1, H, W], mask=None)`` -> dict(loss, pred
    ``[B, h*w, 64]``, mask ``[B, h, w]``). A given mask must be shared by the batch and constant
    on ``config.unit``-patch units (`unit_mask`; default: 75 % of the units)."""

    patch_size = PATCH_SIZE
    size_multiple = PATCH_SIZE
    default_mask = MaskSpec(0.75, "unit")
    mask_kinds = ("unit",)

    def __init__(self, config: GreenMIMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = PatchEmbed(config.dims[0])
        self.pyramid = build_pyramid(config)
        unit = config.unit
        self.decoder = config.make_decoder(config.dims[-1], unit * unit * PATCH_PIXELS)
        init_weights(self)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def mask_geometry(self) -> dict[str, int]:
        return {"unit": self.config.unit}  # masks are shared by the batch and constant on these units

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        validate_image(x)
        b = x.shape[0]
        h, w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        unit = self.config.unit
        if mask is None:
            mask = self.random_mask(b, h, w, device=x.device)
        else:
            check_unit_mask(mask, b, h, w, unit)
        cells = torch.nonzero(~mask[0])  # [N, 2] visible cells, row-major
        visible_idx = cells[:, 0] * w + cells[:, 1]  # [N]
        patches = patchify(x)[:, visible_idx]  # [B, N, 64]: masked patches never enter
        tokens = TokenSet(cells, (h, w), cells[None].float())
        last = self.pyramid(self.embed(patches), tokens)[-1]  # one token per visible unit
        hu, wu = last.tokens.grid
        unit_idx = (last.tokens.cells[:, 0] * wu + last.tokens.cells[:, 1]).expand(b, -1)  # [B, N_units]
        per_unit = self.decoder(last.x, unit_idx, (hu, wu))  # [B, hu*wu, u*u*64]
        pred = per_unit.reshape(b, hu, wu, unit, unit, PATCH_PIXELS).permute(0, 1, 3, 2, 4, 5)
        pred = pred.reshape(b, hu * unit, wu * unit, PATCH_PIXELS)[:, :h, :w].reshape(b, h * w, PATCH_PIXELS)
        loss = reconstruction_loss(x, pred, mask, self.config.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}


class GreenMIMSegmenter(PyramidSegmenter):
    """GreenMIM encoder on all patches (groups = whole windows) + fusion neck + per-patch head."""

    mae_class = GreenMIM


#: The shared pyramid sizes; GreenMIM's decoder reads one token per unit, so tiny's is lighter.
SIZES = pyramid_sizes(GreenMIMConfig, tiny=dict(decoder_dim=96, decoder_depth=1, decoder_heads=3),
                      base=dict(depths=(2, 2, 14, 2)))

register_family("greenmim", SIZES, GreenMIM, GreenMIMSegmenter)
