"""ViT-MAE baseline: plain ViT on 8-px patches, random masking by argsort of noise, the encoder
sees visible tokens only, light global-attention decoder.

Positions: fixed 2-D sine-cosine codes of the lattice cell, normalised by the real canvas
``h x w`` (any rectangle). No class token (nothing downstream uses one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..common import (PATCH_SIZE, lattice_positions, patchify, sincos_position_code, split_by_mask, validate_image,
                      validate_mask)
from ..masking import LATTICE_MASK_KINDS, MaskedAutoencoder, MaskSpec
from .base import (PATCH_PIXELS, Block, DecoderHeadConfig, PatchSegmenter, check_encoder_source, check_heads,
                   init_weights, reconstruction_loss, register_family)

ENCODER_FIELDS = ("embed_dim", "depth", "heads", "mlp_ratio")


@dataclass(frozen=True)
class ViTMAEConfig(DecoderHeadConfig):
    """Encoder width/depth/heads; light decoder, targets and segmentation head width as in
    `DecoderHeadConfig`."""

    embed_dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        check_heads(self.embed_dim, self.heads, "encoder")
        super().__post_init__()
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 (sine-cosine code); got {self.embed_dim}")


class ViTEncoder(nn.Module):
    """Patches -> Linear + sin-cos position -> ViT blocks -> LN.

    ``forward(x [B, 1, H, W], visible_idx [B, n] | None) -> [B, n, C]``: with ``visible_idx``
    (row-major lattice indices) only those patches are embedded and processed.
    """

    def __init__(self, config: ViTMAEConfig) -> None:
        super().__init__()
        self.dim = config.embed_dim
        self.patch_embed = nn.Linear(PATCH_PIXELS, config.embed_dim)
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim)

    def forward(self, x: torch.Tensor, visible_idx: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        patches = patchify(x)  # [B, h*w, 64]
        pos = sincos_position_code(lattice_positions(h, w, device=x.device), self.dim, (h, w))  # [h*w, C]
        if visible_idx is None:
            tokens = self.patch_embed(patches) + pos.to(x.dtype)
        else:  # masked patches are dropped before any computation
            patches = patches.gather(1, visible_idx[..., None].expand(-1, -1, PATCH_PIXELS))  # [B, n, 64]
            tokens = self.patch_embed(patches) + pos[visible_idx].to(x.dtype)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class ViTMAE(MaskedAutoencoder, nn.Module):
    """ViT-MAE pretraining model. ``forward(x [B, 1, H, W], mask=None)`` -> dict with ``loss``,
    ``pred [B, h*w, 64]``, ``mask [B, h, w]`` (True = masked). Any mask with the same visible
    count per sample is accepted; the default is `default_mask`, 75 % random (argsort of uniform noise)."""

    patch_size = PATCH_SIZE
    size_multiple = PATCH_SIZE
    default_mask = MaskSpec(0.75, "random")
    mask_kinds = LATTICE_MASK_KINDS

    def __init__(self, config: ViTMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViTEncoder(config)
        self.decoder = config.make_decoder(config.embed_dim)
        init_weights(self)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output of the visible patches only: ``[B, n_visible, C]`` (row-major order)."""
        visible_idx, _ = split_by_mask(mask)
        return self.encoder(x, visible_idx)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        validate_image(x)
        b = x.shape[0]
        h, w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        if mask is None:
            mask = self.random_mask(b, h, w, device=x.device)
        else:
            validate_mask(mask, b, h, w)
        visible_idx, _ = split_by_mask(mask)  # [B, n_visible]
        latent = self.encoder(x, visible_idx)  # [B, n_visible, C]
        pred = self.decoder(latent, visible_idx, (h, w))  # [B, h*w, 64]
        loss = reconstruction_loss(x, pred, mask, self.config.norm_pix_loss)
        return {"loss": loss, "pred": pred, "mask": mask}


class ViTSegmenter(PatchSegmenter):
    """ViT encoder on all patches + per-patch head: ``forward(x [B, 1, H, W]) -> [B, K, H, W]``."""

    def __init__(self, config: ViTMAEConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.encoder = ViTEncoder(config)
        self.head = config.make_seg_head(config.embed_dim, num_classes)
        init_weights(self)

    def logits(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.head(self.encoder(x), grid)

    def load_encoder_from(self, mae_model: nn.Module) -> None:
        """Copy the pretrained encoder of a `ViTMAE` of the same size."""
        check_encoder_source(self, mae_model, ViTMAE, ENCODER_FIELDS)
        self.encoder.load_state_dict(mae_model.encoder.state_dict())


#: Sizes matched in parameter count (MAE model, encoder + decoder) to the AFFMAE sizes.
SIZES = {
    "tiny": ViTMAEConfig(embed_dim=192, depth=6, heads=3, decoder_dim=112, decoder_depth=2, seg_hidden=128),
    "small": ViTMAEConfig(embed_dim=384, depth=12, heads=6, decoder_dim=128, decoder_depth=2),
    "base": ViTMAEConfig(embed_dim=576, depth=16, heads=9, decoder_dim=256, decoder_depth=2),
}

register_family("vit_mae", SIZES, ViTMAE, ViTSegmenter)
