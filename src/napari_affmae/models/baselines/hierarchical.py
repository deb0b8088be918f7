"""What the two hierarchical families (UM-MAE, GreenMIM) share: the config fields, the patch
embedding, and the segmentation model (dense Swin pyramid + fusion neck + per-patch head)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.nn as nn

from ..common import lattice_positions, patchify
from .base import PATCH_PIXELS, DecoderHeadConfig, PatchSegmenter, check_encoder_source, check_heads, init_weights
from .swin import FusionNeck, SwinPyramid, TokenSet

#: Config fields that define the encoder (must match between a MAE model and its segmenter).
ENCODER_FIELDS = ("dims", "depths", "heads", "mlp_ratio", "window", "neck_dim")


@dataclass(frozen=True)
class PyramidConfig(DecoderHeadConfig):
    """Swin pyramid (per-stage ``dims``/``depths``/``heads``, window side in tokens) and fusion neck
    width; light MAE decoder, MAE targets and segmentation head width as in `DecoderHeadConfig`."""

    dims: tuple[int, ...] = (96, 192, 384, 512)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 16)
    mlp_ratio: float = 4.0
    window: int = 8
    neck_dim: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "heads", tuple(self.heads))
        if not (len(self.dims) == len(self.depths) == len(self.heads)) or not self.dims:
            raise ValueError(
                f"dims, depths and heads need one entry per stage; got {self.dims}, {self.depths}, {self.heads}"
            )
        for dim, nh in zip(self.dims, self.heads):
            check_heads(dim, nh, "stage")
        if min(self.depths) < 1:
            raise ValueError(f"every stage needs at least one block; got depths {self.depths}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 token; got {self.window}")
        super().__post_init__()

    @property
    def unit(self) -> int:
        """Lattice cells per side of one final-stage token (``2 ** (stages - 1)``)."""
        return 2 ** (len(self.dims) - 1)

    def bias_range(self) -> tuple[float, int]:
        """(max offset in stage units, quantisation steps per unit) of the relative-position tables."""
        return float(self.window - 1), 1


class PatchEmbed(nn.Module):
    """8x8 patches ``[B, N, 64]`` -> LayerNorm(Linear) tokens ``[B, N, C]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(PATCH_PIXELS, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(patches))


C = TypeVar("C", bound=PyramidConfig)

#: The Swin pyramid of each size, shared by the hierarchical families and matched in parameter count (MAE
#: model, encoder + decoder) to the AFFMAE sizes; a family adds what differs (its decoder, base depths).
PYRAMID_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dims=(48, 96, 192, 256), depths=(1, 1, 3, 1), heads=(2, 3, 6, 8), mlp_ratio=4.0, neck_dim=96,
                 seg_hidden=128),
    "small": dict(dims=(96, 192, 384, 512), depths=(2, 2, 7, 2), heads=(3, 6, 12, 16), mlp_ratio=4.0),
    "base": dict(dims=(128, 256, 512, 768), heads=(4, 8, 16, 24), mlp_ratio=4.0, neck_dim=192, decoder_dim=256),
}


def pyramid_sizes(config_cls: type[C], **changes: dict[str, Any]) -> dict[str, C]:
    """``{size: config_cls(...)}`` from `PYRAMID_SIZES`, with ``changes[size]`` (a dict of fields) applied."""
    unknown = sorted(set(changes) - set(PYRAMID_SIZES))
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; the pyramid sizes are {', '.join(PYRAMID_SIZES)}")
    return {size: replace(config_cls(**fields), **changes.get(size, {})) for size, fields in PYRAMID_SIZES.items()}


def build_pyramid(config: PyramidConfig) -> SwinPyramid:
    max_offset, steps = config.bias_range()
    return SwinPyramid(config.dims, config.depths, config.heads, config.mlp_ratio, config.window, max_offset, steps)


def dense_tokens(h: int, w: int, device: torch.device) -> TokenSet:
    """Every cell of an ``h x w`` lattice, at its own position."""
    cells = lattice_positions(h, w, device=device)  # [h*w, 2]
    return TokenSet(cells, (h, w), cells[None].float())


class PyramidSegmenter(PatchSegmenter):
    """Segmentation with a hierarchical baseline's encoder: all patches -> Swin pyramid -> fusion
    neck -> ``p*p*K`` logits per patch. ``forward(x [B, 1, H, W]) -> [B, K, H, W]``, H and W
    multiples of 8. Subclasses name the MAE class whose encoder they can load."""

    mae_class: type = nn.Module

    def __init__(self, config: PyramidConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.embed = PatchEmbed(config.dims[0])
        self.pyramid = build_pyramid(config)
        self.neck = FusionNeck(config.dims, config.neck_dim)
        self.head = config.make_seg_head(config.neck_dim, num_classes)
        init_weights(self)

    def logits(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        stages = self.pyramid(self.embed(patchify(x)), dense_tokens(*grid, x.device))
        return self.head(self.neck(stages), grid)  # [B, K, H, W]

    def load_encoder_from(self, mae_model: nn.Module) -> None:
        """Copy patch embedding and pyramid (and the fusion neck where the MAE model has one)."""
        check_encoder_source(self, mae_model, self.mae_class, ENCODER_FIELDS)
        self.embed.load_state_dict(mae_model.embed.state_dict())
        self.pyramid.load_state_dict(mae_model.pyramid.state_dict())
        if isinstance(getattr(mae_model, "neck", None), FusionNeck):
            self.neck.load_state_dict(mae_model.neck.state_dict())
