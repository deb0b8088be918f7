"""A plain small U-Net (the usual lab baseline), segmentation only, trained from scratch.

Registered as ``unet_tiny`` / ``unet_small`` so the engine's fine-tuning loop, packages and tiled
inference treat it like every other model. It has no masked-autoencoder form: asking for
``task="mae"`` raises a ValueError.

Shapes: input ``[B, 1, H, W]`` with H, W multiples of ``2 ** levels`` pixels (8 for the default
3 levels, the patch grid of the other models); output logits ``[B, K, H, W]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import validate_image
from ..registry import register_model
from .base import with_overrides


@dataclass
class UNetConfig:
    """``width`` channels at full resolution, doubled at each of ``levels`` 2x downsamplings."""

    width: int = 16
    levels: int = 3
    groups: int = 8  # GroupNorm groups (batch-size independent, unlike BatchNorm)

    def __post_init__(self) -> None:
        if self.width < 1 or self.levels < 1 or self.groups < 1 or self.width % self.groups:
            raise ValueError(f"UNet needs width, levels, groups >= 1 and width a multiple of groups; got "
                             f"width={self.width}, levels={self.levels}, groups={self.groups}")


class ConvBlock(nn.Module):
    """Two 3x3 conv + GroupNorm + GELU: ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out), nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(groups, c_out), nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet(nn.Module):
    """Encoder of conv blocks with max-pooling, decoder with bilinear upsampling and skip concatenation."""

    patch_size = 1

    def __init__(self, config: UNetConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.size_multiple = 2 ** config.levels
        widths = [config.width * 2 ** i for i in range(config.levels + 1)]
        self.down = nn.ModuleList([ConvBlock(1, widths[0], config.groups)] + [
            ConvBlock(widths[i], widths[i + 1], config.groups) for i in range(config.levels)])
        self.up = nn.ModuleList([
            ConvBlock(widths[i + 1] + widths[i], widths[i], config.groups) for i in reversed(range(config.levels))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        validate_image(x, patch=self.size_multiple)  # H, W multiples of 2 ** levels
        skips = []
        feat = x
        for i, block in enumerate(self.down):
            feat = block(feat if i == 0 else F.max_pool2d(feat, 2))  # [B, w_i, H / 2^i, W / 2^i]
            skips.append(feat)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            feat = F.interpolate(feat, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            feat = block(torch.cat([feat, skip], dim=1))
        return self.head(feat)  # [B, K, H, W]

    def load_encoder_from(self, mae_model: nn.Module, decoder: bool = False) -> None:
        raise ValueError("the U-Net baseline has no pretrained (MAE) form; train it from scratch "
                         "(fine-tuning without a pretrained package)")


SIZES = {"tiny": UNetConfig(width=16, levels=3), "small": UNetConfig(width=32, levels=3)}


def _make_builder(base: UNetConfig):
    def builder(task: str = "segmentation", num_classes: int | None = None, **overrides: Any) -> nn.Module:
        if task == "mae":
            raise ValueError("the U-Net baseline is a segmentation model only: it cannot be pretrained as a "
                             "masked autoencoder (task='mae'); use it with task='segmentation' from scratch")
        return UNet(with_overrides(base, overrides), int(num_classes))

    return builder


for _size, _config in SIZES.items():
    register_model(f"unet_{_size}", _make_builder(_config), tasks=("segmentation",))
