"""Pieces the baseline families share: config overrides, global-attention ViT blocks, the light
MAE decoder on a lattice, the per-patch segmentation head, the loss and family registration.

Shapes: ``B`` batch, ``h x w`` patch lattice (8-px patches), ``N`` tokens, ``C`` channels,
``K`` classes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import (PATCH_SIZE, lattice_positions, masked_mse, patch_targets, sincos_position_code, unpatchify,
                      validate_image)
from ..layers import Mlp
from ..registry import register_model

#: Pixels per patch (one channel): the length of every reconstruction target.
PATCH_PIXELS = PATCH_SIZE * PATCH_SIZE


def with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the dataclass ``config`` with ``overrides`` applied; unknown field names raise."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown {type(config).__name__} field(s) {', '.join(map(repr, unknown))}; "
            f"valid fields: {', '.join(sorted(names))}"
        )
    return dataclasses.replace(config, **overrides)


def check_heads(dim: int, heads: int, what: str) -> None:
    if dim <= 0 or heads <= 0 or dim % heads:
        raise ValueError(f"{what}: dim {dim} must be a positive multiple of heads {heads}")


def check_image_multiple(x: torch.Tensor, multiple: int, why: str) -> None:
    """Raise unless H and W are multiples of ``multiple`` pixels (after `validate_image`)."""
    hh, ww = x.shape[-2:]
    if hh % multiple or ww % multiple:
        up = lambda n: -(-n // multiple) * multiple  # noqa: E731
        raise ValueError(
            f"height and width must be multiples of {multiple} pixels ({why}); got {hh} x {ww} "
            f"(pad to {up(hh)} x {up(ww)})"
        )


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms (as in MAE/Swin)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Global multi-head self-attention through ``F.scaled_dot_product_attention``
    (FlashAttention / memory-efficient kernels on GPU): ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        check_heads(dim, heads, "attention")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, C/heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-LN ViT block: global attention, then MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LatticeDecoder(nn.Module):
    """Light MAE decoder on an ``h x w`` lattice.

    Visible features ``[B, n, C_in]`` are projected and scattered back to their row-major lattice
    cells ``visible_idx [B, n]``; every other cell holds a learned mask token. Sine-cosine codes of
    the cell positions (normalised by the real canvas ``h x w``) are added, global-attention
    blocks run, and a linear head predicts ``out_dim`` values per cell: ``[B, h*w, out_dim]``.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, out_dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"decoder dim must be divisible by 4 (sine-cosine code); got {dim}")
        self.dim = dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, visible: torch.Tensor, visible_idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b = visible.shape[0]
        h, w = grid
        src = self.embed(visible)  # [B, n, D]
        tokens = self.mask_token.to(src.dtype).expand(b, h * w, self.dim)
        tokens = tokens.scatter(1, visible_idx[..., None].expand(-1, -1, self.dim), src)  # [B, h*w, D]
        pos = sincos_position_code(lattice_positions(h, w, device=src.device), self.dim, (h, w))  # [h*w, D]
        x = tokens + pos.to(src.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class SegHead(nn.Module):
    """Per-patch classifier: ``[B, h*w, C]`` features -> ``p*p*K`` logits per patch -> ``[B, K, H, W]``."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, hidden, PATCH_PIXELS * num_classes)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        return unpatchify(self.mlp(self.norm(feats)), h, w, PATCH_SIZE)  # [B, K, H, W]


@dataclass(frozen=True)
class DecoderHeadConfig:
    """The config fields every baseline family shares: its light MAE decoder (`LatticeDecoder`), the
    MAE targets (per-patch normalised pixels or not) and the hidden width of the segmentation head."""

    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    seg_hidden: int = 256

    def __post_init__(self) -> None:
        check_heads(self.decoder_dim, self.decoder_heads, "decoder")

    def make_decoder(self, in_dim: int, out_dim: int = PATCH_PIXELS) -> LatticeDecoder:
        """The MAE decoder: ``in_dim`` encoder features -> ``out_dim`` values per lattice cell."""
        return LatticeDecoder(in_dim, self.decoder_dim, self.decoder_depth, self.decoder_heads,
                              self.decoder_mlp_ratio, out_dim)

    def make_seg_head(self, in_dim: int, num_classes: int) -> SegHead:
        return SegHead(in_dim, self.seg_hidden, num_classes)


class PatchSegmenter(nn.Module, ABC):
    """Base of the baselines' segmentation models on 8-px patches: ``forward(x [B, 1, H, W]) ->
    [B, K, H, W]`` validates x and returns `logits` of its ``h x w`` patch lattice."""

    patch_size = PATCH_SIZE
    size_multiple = PATCH_SIZE

    def __init__(self, config: Any, num_classes: int) -> None:
        super().__init__()
        if num_classes is None or num_classes < 2:
            raise ValueError(f"segmentation needs num_classes >= 2; got {num_classes}")
        self.config = config
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        validate_image(x)
        return self.logits(x, (x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE))

    @abstractmethod
    def logits(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` of x ``[B, 1, H, W]`` whose patch lattice is ``grid = (h, w)``."""


def reconstruction_loss(x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MSE between ``pred [B, h*w, 64]`` and the (normalised) pixel targets on masked patches only."""
    masked = mask.reshape(mask.shape[0], -1)  # [B, h*w]
    if not bool(masked.any()):
        raise ValueError(
            "the mask hides no patch, so there is nothing to reconstruct; use a larger tile or a higher "
            "mask ratio (GreenMIM masks whole units of 2**(stages-1) patches)"
        )
    target = patch_targets(x, PATCH_SIZE, norm_pix)  # [B, h*w, 64]
    return masked_mse(pred[masked], target[masked])


def check_encoder_source(seg: nn.Module, mae: nn.Module, mae_cls: type, fields: tuple[str, ...]) -> None:
    """``load_encoder_from`` guard: same family and identical encoder hyper-parameters."""
    if not isinstance(mae, mae_cls):
        raise ValueError(
            f"{type(seg).__name__}.load_encoder_from expects a {mae_cls.__name__} (same family); "
            f"got {type(mae).__name__}"
        )
    differ = [f for f in fields if getattr(seg.config, f) != getattr(mae.config, f)]
    if differ:
        detail = ", ".join(f"{f}: {getattr(mae.config, f)} vs {getattr(seg.config, f)}" for f in differ)
        raise ValueError(f"encoder configs differ ({detail}); build the segmentation model with the same size")


def register_family(prefix: str, sizes: dict[str, Any], mae_cls: type, seg_cls: type) -> None:
    """Register ``{prefix}_{size}`` for every size; builders apply config overrides and pick the task."""

    def make_builder(base: Any) -> Callable[..., nn.Module]:
        def builder(task: str = "mae", num_classes: int | None = None, **overrides: Any) -> nn.Module:
            config = with_overrides(base, overrides)
            return mae_cls(config) if task == "mae" else seg_cls(config, num_classes)

        return builder

    for size, config in sizes.items():
        register_model(f"{prefix}_{size}", make_builder(config), masking=mae_cls)
