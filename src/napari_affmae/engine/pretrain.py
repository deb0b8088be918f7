"""Self-supervised AFFMAE pretraining on one or more 2D/3D stacks.

AdamW with a warm-up + cosine schedule, gradient clipping and accumulation, bf16/fp16 autocast on
GPUs (with a GradScaler for fp16), a checkpoint every ``checkpoint_every`` steps (atomic), exact
resume (model, optimiser, scheduler, step, RNG), and DDP under torchrun (``batch_size`` is the
global batch; see `engine.distributed`).

Cancellation: the token is checked before every step. On cancel the job writes a checkpoint and a
model package of the current weights, then raises `JobCancelled`; the exception's ``result``
attribute is the `PretrainResult` (``cancelled=True``) with both paths, so a caller can say
"cancelled, checkpoint saved at ...".
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import __version__
from ..data.augment import AugmentConfig, augment_batch
from ..data.normalize import NormalizationStats
from ..data.sampling import PatchSampler, as_crop_shape
from ..models import create_model, list_models, masking_of
from ..models.masking import MASK_KINDS, MaskSpec, check_no_mask_fields
from .checkpoint import Checkpoint, RngStates
from .device import precision_name
from .inputs import InputImage, as_input_image, check_crop_fits, check_has_contrast, combined_stats, \
    image_pixel_size, source_name
from .package import ModelPackage
from .progress import CancelToken, ProgressCallback, ProgressEvent
from .settings import TrainingSettings, check_training_settings, parse_size, setting
from .training import TrainingLoop, TrainingTask, run_training

log = logging.getLogger(__name__)
PRETRAIN_PACKAGE = "pretrained.affmae"
# geometry-only augmentation for pretraining (the reconstruction target follows the pixels)
_GEOMETRY_ONLY = AugmentConfig(gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=(0.0, 0.0))


def family_masks() -> str:
    """Each pretrainable family's default masking, e.g. ``affmae 0.5 blob, vit_mae 0.75 random`` (for help texts)."""
    shown: dict[str, str] = {}
    for name in list_models(task="mae"):
        spec = masking_of(name).default_mask
        shown.setdefault(name.rsplit("_", 1)[0], f"{spec.ratio:g} {spec.kind}")
    return ", ".join(f"{family} {text}" for family, text in shown.items())


@dataclass
class PretrainConfig(TrainingSettings):
    """Options of a pretraining run. Sizes in pixels; ``crop_size`` is (height, width), multiples of 8."""

    model: str = setting("affmae_tiny", "architecture: affmae_tiny (~3 M parameters, CPU friendly), affmae_small, "
                         "affmae_base")
    crop_size: tuple[int, int] = setting((128, 128), "training crop HxW in pixels, multiples of 8", parse=parse_size)
    batch_size: int = setting(8, "global batch size, split across torchrun processes")
    steps: int = setting(1000, "optimiser steps")
    epochs: float | None = setting(None, "instead of --steps: passes over the data (one epoch ~ every pixel seen "
                                   "once)", parse=float)
    lr: float = setting(5e-4, "peak learning rate of AdamW")
    weight_decay: float = setting(0.05, "AdamW weight decay")
    warmup_steps: int = setting(50, "linear warm-up steps before cosine decay")
    min_lr_ratio: float = 0.01
    mask_ratio: float | None = setting(None, "fraction of 8x8 patches hidden; none: the model family's own "
                                       f"({family_masks()})", parse=float)
    mask_type: str | None = setting(None, "blob: Perlin-style blobs, random: i.i.d., unit: GreenMIM's shared units, "
                                    "uniform: UM-MAE's one per 2x2 block; none: the family's own", choices=MASK_KINDS)
    keep_rate: float | None = setting(None, "AFFMAE: fraction of tokens kept by each adaptive merge; none: the "
                                      "model's own", parse=float)
    model_options: dict[str, Any] = field(default_factory=dict)  # other model config fields
    augment: bool = True  # flips / rot90 of the crops
    output_dir: str | Path = "runs/pretrain"

    def __post_init__(self) -> None:
        self.crop_size = as_crop_shape(self.crop_size)
        self.validate()

    def validate(self) -> None:
        check_training_settings(self)
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive; got {self.epochs}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {self.lr}, "
                             f"{self.weight_decay}, {self.warmup_steps}")
        check_no_mask_fields(self.model_options)
        self.mask_spec()
        if self.keep_rate is not None and not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate must be in (0, 1]; got {self.keep_rate}")
        if "keep_rate" in self.model_options:
            raise ValueError("set keep_rate as the PretrainConfig option (--keep-rate), not in model_options")

    def mask_spec(self) -> MaskSpec:
        """The masks every step draws: the model family's default (`models.masking_of`) with ``mask_ratio`` and
        ``mask_type`` where given. Raises a ValueError naming the bad value."""
        family = masking_of(self.model)
        try:
            return family.mask_spec(self.mask_ratio, self.mask_type)
        except ValueError as err:
            raise ValueError(f"{self.model}: {err}") from None

    def model_overrides(self) -> dict[str, Any]:
        """Config overrides of the model: ``model_options`` and ``keep_rate`` where given."""
        keep = {} if self.keep_rate is None else {"keep_rate": self.keep_rate}
        return {**self.model_options, **keep}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["crop_size"] = list(self.crop_size)
        data["output_dir"] = str(self.output_dir)
        data["resume"] = self.resume if isinstance(self.resume, bool) else str(self.resume)
        return data


@dataclass
class PretrainResult:
    package_path: Path
    checkpoint_path: Path
    step: int
    total_steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)  # one per step, from step 1
    cancelled: bool = False
    seconds: float = 0.0


def total_steps_for(config: PretrainConfig, images: Sequence[InputImage]) -> int:
    """``config.steps``, or with ``epochs``: enough global batches to cover every pixel ``epochs`` times."""
    if config.epochs is None:
        return int(config.steps)
    h, w = config.crop_size
    crops = sum((img.shape[0] if img.ndim == 3 else 1) * math.ceil(img.shape[-2] / h) * math.ceil(img.shape[-1] / w)
                for img in images)
    return max(1, math.ceil(config.epochs * crops / (config.batch_size * config.grad_accum)))


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("pretrain needs at least one image")
        return list(images)
    return [images]


def package_mask(package: ModelPackage) -> MaskSpec:
    """The masks a pretraining package was trained with (its provenance's ``mask``), else its family's default."""
    recorded = package.provenance.get("mask")
    return MaskSpec(**recorded) if recorded else masking_of(package.model_name).default_mask


def normalised_batch(sampler: PatchSampler, stats: list[NormalizationStats], n: int) -> np.ndarray:
    """``n`` crops ``[n, h, w]`` float32, each normalised with its own image's statistics."""
    crops = []
    for location in sampler.sample_locations(n):
        crops.append(stats[location.source].apply(sampler.read(location), mode="percentile"))
    return np.stack(crops).astype(np.float32)


def pretrain(images: Any, config: PretrainConfig | None = None, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None) -> PretrainResult:
    """Pretrain ``config.model`` as a masked autoencoder on ``images``.

    Args:
        images: one or a list of 2D ``[Y, X]`` / 3D ``[Z, Y, X]`` arrays (numpy, zarr, dask) or paths
            (TIFF, OME-Zarr, .npy).
        config: `PretrainConfig`.
        progress: called with a `ProgressEvent` (job "pretrain") every ``log_every`` steps.
        cancel: checked before every step; see the module docstring for what happens on cancel.

    Returns a `PretrainResult`; the package (``pretrained.affmae``) and checkpoint live in
    ``config.output_dir``.
    """
    config = config or PretrainConfig()
    config.validate()
    started = time.perf_counter()
    inputs = [as_input_image(item, what=f"image {i}") for i, item in enumerate(_as_list(images))]
    check_crop_fits(inputs, config.crop_size)
    return run_training(PretrainTask(config, inputs), config, progress, cancel,
                        sources=[img.source for img in inputs if img.source], started=started)


class PretrainTask(TrainingTask):
    """Pretraining's part of the `TrainingLoop`: geometry-augmented crops normalised per image, each model
    family's own masks, the model's reconstruction loss, and the MAE package."""

    job, verb, package_name = "pretrain", "pretraining", PRETRAIN_PACKAGE
    betas = (0.9, 0.95)

    def __init__(self, config: PretrainConfig, inputs: list[InputImage]) -> None:
        self.config, self.inputs = config, inputs
        self.mask = config.mask_spec()

    def total_steps(self) -> int:
        return total_steps_for(self.config, self.inputs)

    def build_model(self) -> torch.nn.Module:
        self.model = create_model(self.config.model, **self.config.model_overrides())
        return self.model

    def check_resume(self, checkpoint: Checkpoint) -> None:
        if checkpoint.meta.get("model_name") != self.config.model:
            raise ValueError(f"the checkpoint at {checkpoint.path} was made for {checkpoint.meta.get('model_name')}, "
                             f"not {self.config.model}; resume with the same --model or start a fresh output "
                             "directory")

    def prepare(self, rngs: RngStates) -> None:
        config, inputs = self.config, self.inputs
        self.rngs = rngs
        self.stats, self.per_image_stats = combined_stats(inputs, seed=config.seed)
        for i, (img, img_stats) in enumerate(zip(inputs, self.per_image_stats)):
            check_has_contrast(img_stats, source_name(img, i))
        self.sampler = PatchSampler([img.array for img in inputs], config.crop_size, seed=config.seed, pad=True)
        self.sampler.rng = rngs.numpy  # one generator for crops and augmentation: saved in checkpoints

    def restore(self, extra: dict[str, Any]) -> None:
        self.per_image_stats = [NormalizationStats.from_dict(s) for s in extra["per_image_stats"]]
        self.stats = NormalizationStats.from_dict(extra["stats"])

    def provenance(self, run: TrainingLoop) -> dict[str, Any]:
        inputs = self.inputs
        return {
            "job": "pretrain", "napari_affmae": __version__, "torch": torch.__version__,
            "config": self.config.to_dict(), "mask": self.mask.to_dict(),
            "sources": [source_name(img, i) for i, img in enumerate(inputs)],
            "shapes": [list(img.shape) for img in inputs], "device": run.device.type,
            "precision": precision_name(run.dtype), "world_size": run.context.world_size,
            "per_image_stats": [s.to_dict() for s in self.per_image_stats],
        }

    def start_message(self, run: TrainingLoop) -> str:
        return (f"pretraining {self.config.model} on {len(self.inputs)} image(s), {run.device.type}, "
                f"{precision_name(run.dtype)}")

    def batch(self, shard: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops ``[b, 1, h, w]`` and their masks ``[b, h/8, w/8]`` (True = masked) of this process."""
        config = self.config
        h, w = config.crop_size
        batch = normalised_batch(self.sampler, self.per_image_stats, config.batch_size)  # [B, h, w]
        if config.augment:
            batch, _ = augment_batch(batch, None, self.rngs.numpy, _GEOMETRY_ONLY)
        # each family draws masks of its own structure (UM-MAE: one per 2x2, GreenMIM: shared units)
        mask = self.model.random_mask(config.batch_size, h // 8, w // 8, self.mask,
                                      generator=self.rngs.torch)  # [B, h/8, w/8], same on every rank
        x = torch.from_numpy(np.ascontiguousarray(batch[shard]))[:, None].to(device)  # [b, 1, h, w]
        return x, mask[shard].to(device)

    def forward(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        x, mask = batch
        return model(x, mask=mask)

    def loss(self, out: dict[str, Any], batch: Any) -> torch.Tensor:
        return out["loss"].float()

    def observe(self, out: dict[str, Any], batch: Any) -> dict[str, float]:
        if "reference_loss" not in out:
            return {}
        # the flat-patch predictor's loss on the same batch (AFFMAE), averaged over the micro-batches
        return {"trivial": float(out["reference_loss"]) / self.config.grad_accum}

    def step_extra(self, out: dict[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in out.get("losses", {}).items()}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"stats": self.stats.to_dict(), "per_image_stats": [s.to_dict() for s in self.per_image_stats]}

    def package(self, run: TrainingLoop, done: int) -> ModelPackage:
        return ModelPackage.from_model(self.model, normalization=self.stats,
                                       pixel_size=image_pixel_size(self.inputs[0]),
                                       provenance=dict(run.provenance, steps=done, total_steps=run.total,
                                                       final_loss=run.losses[-1] if run.losses else None))

    def finish(self, run: TrainingLoop) -> None:
        if run.checkpoint is not None and run.checkpoint.step >= run.total:  # resumed a finished run
            run.emit(ProgressEvent("pretrain", run.step, run.total, message=(
                f"the run in {Path(self.config.output_dir)} is already complete ({run.step}/{run.total} steps); "
                f"package written to {run.package_path}")))
            run.write_package(run.step)

    def result(self, run: TrainingLoop, cancelled: bool) -> PretrainResult:
        return PretrainResult(run.package_path, run.checkpoint_path, run.step, run.total, run.final_loss, run.losses,
                              cancelled=cancelled, seconds=time.perf_counter() - run.started)
