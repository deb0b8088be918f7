"""AFFMAE: masked-autoencoder pretraining and segmentation with an adaptive off-grid encoder.

Shapes: x ``[B, 1, H, W]`` with H, W multiples of p = 8; lattice ``h = H/8``, ``w = W/8``;
mask ``[B, h, w]`` bool, True = masked (see `models.common`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .affmae_decoder import AFFMAEDecoder
from .affmae_encoder import AFFMAEEncoder, StageOutput
from .affmae_fusion import FusionHead
from .affmae_inference import segment_in_chunks
from .clustering import NEIGHBORHOOD_MODES, gather_tokens
from .common import PATCH_SIZE, check_target_pool, lattice_positions, masked_mse, patch_targets, patchify, \
    split_by_mask, target_values, unpatchify, validate_image, validate_mask
from .layers import INFERENCE_CHUNK_BYTES
from .masking import BLOB_CELLS, LATTICE_MASK_KINDS, MaskedAutoencoder, MaskSpec
from .registry import register_model


SEG_HEADS = ("fusion", "patch")


@dataclass
class AFFMAEConfig:
    """Architecture and pretraining-target options (all sizes in channels unless noted). Masking is not here:
    it is an argument of pretraining (`MaskSpec`, `PretrainConfig.mask_ratio`)."""

    dims: tuple[int, ...] = (48, 96, 192, 256)
    depths: tuple[int, ...] = (1, 1, 3, 1)
    heads: tuple[int, ...] = (3, 6, 12, 16)
    mlp_ratio: float = 2.0
    decoder_dim: int = 128
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    keep_rate: float = 0.4  # fraction of tokens kept by each merge
    cluster_size: int = 8
    nearest_clusters: int = 8  # neighbourhood = members of this many nearest clusters (M = 64)
    neighborhood: str = "token"  # "token" | "cluster" (queries of a cluster share neighbours)
    #: Add a learnable ALiBi-style distance penalty (per head, slopes 2 ... 1/8) to every attention's
    #: relative-position bias, so attention starts local. Without it attention over the 64 neighbours
    #: starts uniform and short runs on EM never learn to read the nearest visible patches.
    locality_prior: bool = False
    #: Nearest token clusters each decoder query reads in cross-attention (None: ``nearest_clusters``).
    #: Fewer means nearer: 2 clusters = 16 tokens instead of 8 = 64 (about half a 128-px crop at res2).
    decoder_nearest_clusters: int | None = None
    blob_cells: tuple[int, ...] = BLOB_CELLS  # blob scales in lattice cells, one per sample in turn
    norm_pix_loss: bool = True
    #: Side in pixels of the squares averaged into one reconstruction target value. 1: every pixel of the
    #: 8 x 8 patch is a target (MAE); 2: the patch is predicted as 4 x 4 means, 4: as 2 x 2 means. At
    #: 4-5 nm/px most of a per-patch-normalised pixel's variance is shot noise that no model can predict
    #: from the neighbouring patches, so pooled targets ask for the patch's structure instead.
    target_pool: int = 1
    #: Gaussian sigma (pixels) applied to the image before the targets are taken (0: none).
    target_blur: float = 0.0
    #: With norm_pix_loss: this fraction of the crop's variance is added to every patch's variance before
    #: dividing (0: plain MAE normalisation), so flat, noise-only patches keep small targets.
    target_norm_floor: float = 0.0
    loss_weights: dict[str, float] = field(default_factory=lambda: {"res2": 1.0, "res4": 0.12, "res5": 0.05})
    #: Segmentation head. "fusion": U-Net-style upsampling of the decoder's lattice features through the
    #: stem's stride-4 and stride-2 maps and the image (`affmae_fusion`); "patch": an 8 x 8 logit patch per
    #: lattice cell, plus the thin `Refinement` when ``refine`` (the head of packages written before fusion).
    seg_head: str = "fusion"
    fusion_width: int = 16  # channels of the fusion head at full resolution (x2 at stride 2, x4 at stride 4)
    #: 3x3 convs per fine step of the fusion head (stride 2, full resolution, the image's own features). Two
    #: instead of one: VNC membranes k = 1 0.515 / 0.515 vs 0.514 / 0.509 (seeds 1 / 2), 1.5x the time.
    fusion_depth: int = 1
    refine: bool = True  # "patch" head: full-resolution refinement from the stem

    def __post_init__(self) -> None:
        self.dims, self.depths, self.heads = tuple(self.dims), tuple(self.depths), tuple(self.heads)
        if self.neighborhood not in NEIGHBORHOOD_MODES:
            raise ValueError(f"neighborhood must be one of {NEIGHBORHOOD_MODES}; got {self.neighborhood!r}")
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1]; got {self.keep_rate}")
        if len(self.dims) != 4:
            raise ValueError("AFFMAE has 4 stages (res2..res5): give 4 dims, depths and heads")
        self.blob_cells = tuple(int(c) for c in self.blob_cells)
        if not self.blob_cells or min(self.blob_cells) < 1:
            raise ValueError(f"blob_cells must be positive lattice-cell counts; got {self.blob_cells}")
        check_target_pool(self.target_pool, PATCH_SIZE)
        self.target_pool = int(self.target_pool)
        if self.norm_pix_loss and target_values(PATCH_SIZE, self.target_pool) < 2:
            raise ValueError(f"target_pool={self.target_pool} leaves one value per patch: per-patch "
                             "normalisation (norm_pix_loss) needs at least two; use a smaller target_pool")
        if self.target_blur < 0:
            raise ValueError(f"target_blur must be >= 0; got {self.target_blur}")
        if self.decoder_nearest_clusters is not None and int(self.decoder_nearest_clusters) < 1:
            raise ValueError(f"decoder_nearest_clusters must be >= 1; got {self.decoder_nearest_clusters}")
        if self.target_norm_floor < 0:
            raise ValueError(f"target_norm_floor must be >= 0; got {self.target_norm_floor}")
        if self.seg_head not in SEG_HEADS:
            raise ValueError(f"seg_head must be one of {SEG_HEADS}; got {self.seg_head!r}")
        if int(self.fusion_width) < 1 or int(self.fusion_depth) < 1:
            raise ValueError(f"fusion_width and fusion_depth must be >= 1; got {self.fusion_width}, "
                             f"{self.fusion_depth}")
        unknown = set(self.loss_weights) - {"res2", "res3", "res4", "res5"}
        if unknown:
            raise ValueError(f"loss_weights keys must be res2..res5; got {sorted(unknown)}")


#: Config fields added after the first packages were written, with the behaviour those packages were
#: trained with. A package whose stored config lacks one is rebuilt with this value, not today's default
#: (see `with_package_defaults`).
PACKAGE_LEGACY_CONFIG: dict[str, object] = {
    "blob_cells": BLOB_CELLS, "target_pool": 1, "target_blur": 0.0, "target_norm_floor": 0.0,
    "locality_prior": False, "decoder_nearest_clusters": None,
}


#: The same for fields that only segmentation packages use: a pretraining package's segmentation model is
#: built with today's default head.
SEGMENTATION_LEGACY_CONFIG: dict[str, object] = {"seg_head": "patch"}


def with_package_defaults(config: dict, task: str = "mae") -> dict:
    """A stored AFFMAE config of a ``task`` ("mae" / "segmentation") package with the fields it predates
    filled in as they behaved then."""
    legacy = {**PACKAGE_LEGACY_CONFIG, **(SEGMENTATION_LEGACY_CONFIG if task == "segmentation" else {})}
    return {**legacy, **config}


def _build_parts(cfg: AFFMAEConfig) -> tuple[AFFMAEEncoder, AFFMAEDecoder]:
    encoder = AFFMAEEncoder(cfg.dims, cfg.depths, cfg.heads, cfg.mlp_ratio, cfg.keep_rate, cfg.cluster_size,
                            cfg.nearest_clusters, cfg.neighborhood, locality=cfg.locality_prior)
    decoder = AFFMAEDecoder(cfg.dims, cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_mlp_ratio, cfg.cluster_size,
                            cfg.nearest_clusters, cfg.neighborhood, locality=cfg.locality_prior,
                            cross_clusters=cfg.decoder_nearest_clusters)
    return encoder, decoder


class _Head(nn.Sequential):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, out))


# decoder layer i attends to stage (3 - i): res5, res4, res3, res2
_LAYER_OF = {"res5": 0, "res4": 1, "res3": 2, "res2": 3}


class AFFMAEPretrain(MaskedAutoencoder, nn.Module):
    """MAE pretraining: encode visible patches, reconstruct masked ones with deep supervision. Masks: 50 %
    blobs by default (``random_mask(batch, h, w, MaskSpec(...))`` draws others)."""

    default_mask = MaskSpec(0.5, "blob")
    mask_kinds = LATTICE_MASK_KINDS

    def __init__(self, config: AFFMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = PATCH_SIZE
        self.encoder, self.decoder = _build_parts(config)
        self.target_size = target_values(PATCH_SIZE, config.target_pool)  # values predicted per masked patch
        self.heads = nn.ModuleDict({name: _Head(config.decoder_dim, self.target_size) for name in config.loss_weights})

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor) -> list[StageOutput]:
        """Per-stage tokens ``[B, N_i, C_i]`` with integer lattice positions ``[B, N_i, 2]`` (res2..res5)."""
        validate_image(x, self.patch_size)
        b, _, hh, ww = x.shape
        validate_mask(mask, b, hh // self.patch_size, ww // self.patch_size)
        return self.encoder(x, mask)

    def mask_geometry(self) -> dict[str, tuple[int, ...]]:
        return {"cells": self.config.blob_cells}  # blob scales of this model's masks

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction targets of every patch ``[B, h*w, target_size]`` (see `AFFMAEConfig.target_pool`)."""
        cfg = self.config
        return patch_targets(x, self.patch_size, cfg.norm_pix_loss, pool=cfg.target_pool, blur=cfg.target_blur,
                             norm_floor=cfg.target_norm_floor)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x ``[B, 1, H, W]`` -> dict(loss, pred ``[B, h*w, target_size]`` (masked cells filled, rest 0), mask,
        losses, reference_loss (`trivial_loss`))."""
        validate_image(x, self.patch_size)
        b, _, hh, ww = x.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        if mask is None:
            mask = self.random_mask(b, h, w, device=x.device)
        else:
            validate_mask(mask.to(x.device), b, h, w)
            mask = mask.to(x.device)
        if bool(mask.all(dim=(1, 2)).any()) or not bool(mask.any()):
            raise ValueError("the mask must hide some patches and keep some visible in every sample")
        stages = self.encoder(x, mask)
        _, masked = split_by_mask(mask)  # [B, Nm] row-major masked cells
        query_pos = lattice_positions(h, w, device=x.device)[masked]  # [B, Nm, 2]
        layers = self.decoder(query_pos, stages, (h, w))
        all_targets = self.targets(x)  # [B, h*w, T]
        target = gather_tokens(all_targets, masked)  # [B, Nm, T]
        losses, preds = {}, {}
        for name, weight in self.config.loss_weights.items():
            preds[name] = self.heads[name](layers[_LAYER_OF[name]])  # [B, Nm, T]
            losses[name] = masked_mse(preds[name], target)
        loss = sum(self.config.loss_weights[n] * losses[n] for n in losses)
        reference = self.trivial_loss(x, mask, target, all_targets)
        pred = torch.zeros(b, h * w, self.target_size, device=x.device, dtype=preds["res2"].dtype)
        pred = pred.scatter(1, masked[..., None].expand(-1, -1, pred.shape[-1]), preds["res2"])
        return {"loss": loss, "pred": pred, "mask": mask, "losses": {k: v.detach() for k, v in losses.items()},
                "reference_loss": reference}

    @torch.no_grad()
    def trivial_loss(self, x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
                     all_targets: torch.Tensor | None = None) -> torch.Tensor:
        """The loss a model without any image understanding gets: every masked patch predicted flat. With
        per-patch normalised targets that is 0 (the best constant for a zero-mean patch); otherwise the mean
        of the sample's visible target values. Same target (pooling, blur) and weighting as ``loss``.

        x ``[B, 1, H, W]``, mask ``[B, h, w]`` (True = masked), target ``[B, Nm, T]`` (the masked cells'
        targets), all_targets ``[B, h*w, T]`` (every cell's, computed from x when not given). A pretrained
        model has learned something about the images only where its loss is below this."""
        if self.config.norm_pix_loss:
            flat = torch.zeros_like(target)
        else:
            values = (self.targets(x) if all_targets is None else all_targets).float()  # [B, h*w, T]
            visible = (~mask.reshape(mask.shape[0], -1, 1)).float()  # [B, h*w, 1]
            mean = (values * visible).sum((1, 2)) / (visible.sum((1, 2)) * values.shape[-1])  # [B]
            flat = mean[:, None, None].expand_as(target)
        return masked_mse(flat, target) * sum(self.config.loss_weights.values())

    def reconstruct(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image ``[B, 1, H, W]``: visible patches from x, masked ones from the prediction (de-normalised)."""
        b, _, hh, ww = x.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        patches = patchify(x, self.patch_size)
        pred = out["pred"].to(patches.dtype)
        pool = self.config.target_pool
        if pool > 1:  # coarse targets: each value fills its pool x pool square
            side = self.patch_size // pool
            pred = pred.reshape(b, h * w, side, 1, side, 1).expand(-1, -1, -1, pool, -1, pool)
            pred = pred.reshape(b, h * w, self.patch_size**2)
        if self.config.norm_pix_loss:
            mean = patches.mean(-1, keepdim=True)
            std = (patches.var(-1, keepdim=True) + 1.0e-6).sqrt()
            pred = pred * std + mean  # uses the true patch statistics: a visualisation aid only
        flat_mask = out["mask"].reshape(b, -1, 1)
        return unpatchify(torch.where(flat_mask, pred, patches), h, w, self.patch_size)


class Refinement(nn.Module):
    """Full-resolution correction of logits from the image and the stem's first feature map."""

    def __init__(self, num_classes: int, stem_channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes + stem_channels + 1, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, num_classes, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, logits: torch.Tensor, x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(first, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits + self.conv2(F.gelu(self.conv1(torch.cat([logits, up, x], dim=1))))


class AFFMAESegmentation(nn.Module):
    """Segmentation: unmasked encoder, decoder queries at every lattice cell, then the `FusionHead` (or a
    p*p*K logit patch per query, ``seg_head="patch"``)."""

    def __init__(self, config: AFFMAEConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.patch_size = PATCH_SIZE
        self.encoder, self.decoder = _build_parts(config)
        self.stem_to_query = nn.Linear(config.dims[0], config.decoder_dim)
        self.fusion = self.head = self.refine = None
        if config.seg_head == "fusion":
            self.fusion = FusionHead(config.decoder_dim, config.dims[0] // 2, num_classes, config.fusion_width,
                                     config.fusion_depth)
        else:
            self.head = _Head(config.decoder_dim, PATCH_SIZE**2 * num_classes)
            self.refine = Refinement(num_classes, config.dims[0] // 2) if config.refine else None
        #: No-grad forwards go through image rows and tokens in pieces whose temporaries fit this many bytes
        #: (`affmae_inference`); None: whole tensors, as in training. Same logits either way.
        self.inference_chunk_bytes: int | None = INFERENCE_CHUNK_BYTES

    def load_encoder_from(self, mae: nn.Module, decoder: bool = False) -> None:
        """Copy a pretrained encoder (and optionally the decoder body) from an AFFMAE MAE model."""
        if not isinstance(mae, AFFMAEPretrain):
            raise ValueError(f"expected an AFFMAE pretraining model; got {type(mae).__name__}")
        mine, theirs = self.config, mae.config
        arch = ("dims", "depths", "heads", "mlp_ratio", "cluster_size", "nearest_clusters")
        if any(getattr(mine, a) != getattr(theirs, a) for a in arch):
            raise ValueError("the pretrained encoder has another architecture: "
                             + ", ".join(f"{a}={getattr(theirs, a)} (need {getattr(mine, a)})" for a in arch
                                         if getattr(mine, a) != getattr(theirs, a)))
        self.encoder.load_state_dict(mae.encoder.state_dict())
        if decoder:
            self.decoder.load_state_dict(mae.decoder.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, 1, H, W]`` -> logits ``[B, K, H, W]``."""
        validate_image(x, self.patch_size)
        if self.inference_chunk_bytes is not None and not torch.is_grad_enabled():
            return segment_in_chunks(self, x, self.inference_chunk_bytes)
        b, _, hh, ww = x.shape
        h, w = hh // self.patch_size, ww // self.patch_size
        tokens, pos, (level1, level2) = self.encoder.embed(x, None)  # row-major, every cell
        stages = self.encoder.forward_tokens(tokens, pos)
        layers = self.decoder(pos, stages, (h, w), query_init=self.stem_to_query(tokens))
        if self.fusion is not None:
            return self.fusion(layers[-1].reshape(b, h, w, -1), level2, level1, x)
        logits = unpatchify(self.head(layers[-1]), h, w, self.patch_size)  # [B, K, H, W]
        if self.refine is not None:
            logits = self.refine(logits, x, level1)
        return logits


SIZES = {
    "tiny": dict(dims=(48, 96, 192, 256), depths=(1, 1, 3, 1), heads=(3, 6, 12, 16), mlp_ratio=2.0,
                 decoder_dim=128, decoder_heads=4),
    "small": dict(dims=(96, 192, 384, 512), depths=(2, 3, 9, 2), heads=(3, 6, 12, 16), mlp_ratio=2.0,
                  decoder_dim=256, decoder_heads=8),
    "base": dict(dims=(128, 256, 512, 768), depths=(3, 4, 16, 2), heads=(4, 8, 16, 24), mlp_ratio=3.0,
                 decoder_dim=320, decoder_heads=10),
}


def make_config(size: str, **overrides) -> AFFMAEConfig:
    """Config of a named size with field overrides (unknown names raise a ValueError)."""
    known = {f.name for f in fields(AFFMAEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown AFFMAE option(s) {unknown}; known: {sorted(known)}")
    return replace(AFFMAEConfig(**SIZES[size]), **overrides)


def _builder(size: str):
    def build(task: str = "mae", num_classes: int | None = None, **overrides) -> nn.Module:
        cfg = make_config(size, **overrides)
        return AFFMAEPretrain(cfg) if task == "mae" else AFFMAESegmentation(cfg, num_classes)

    build.__doc__ = f"AFFMAE-{size}: {SIZES[size]}"
    return build


for _size in SIZES:
    register_model(f"affmae_{_size}", _builder(_size), masking=AFFMAEPretrain)
