"""Fine-tune an AFFMAE segmentation model on painted labels (or train one from scratch).

Labels (same shape as the image):

* ``label_mode="sparse"`` (default): 0 = unlabelled (ignored by the loss), classes 1..K painted
  as strokes; at least two classes must be painted. The model predicts K classes; segmentation
  writes labels 1..K.
* ``label_mode="dense"``: every pixel is labelled, 0 = background is a class (K = max + 1).

Training: crops sampled around painted pixels (class-balanced), flips / rot90 / intensity
augmentation, loss = cross-entropy + Dice on painted pixels only, AdamW (optionally with layer-wise lr
decay of a pretrained encoder, ``layer_decay`` < 1) and warm-up + cosine schedule. The encoder
(and decoder body) start from a pretrained package when one is given. Given a segmentation package
instead, training continues from that model (same classes, every layer at the full rate): the
paint-look-correct loop, where corrections are painted on the model's result and training goes on.
With sparse labels the strokes are joined by a teacher's confident pixels of the painted slices
(`teacher_labels`); what the teacher gave is kept beside the package (``<package>.taught_labels.npz``), so
that a continued run learns from it again, with the corrections winning (`taught_labels`).

Validation: ``val_slices`` (z indices) or ``val_fraction`` (of the painted slices of a 3D stack,
or a bottom band of rows of a 2D image) are held out of training; at the end they are segmented
with tiled inference and per-class IoU / Dice on their labelled pixels are reported.

Cancellation, checkpoints and resume work as in `engine.pretrain`: on cancel a checkpoint and a
package are written and `JobCancelled` is raised with ``.result`` = `FinetuneResult` (cancelled).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..data.augment import AugmentConfig, augment_batch
from ..data.normalize import NormalizationStats, compute_stats
from ..data.sampling import LabeledPatchSampler, as_crop_shape
from ..models import create_model, list_models
from .checkpoint import Checkpoint, RngStates
from .device import precision_name
from .inputs import InputImage, as_input_image, as_label_array, check_crop_fits, check_has_contrast, \
    image_pixel_size, source_name
from .package import LABEL_MODES, ModelPackage, load_package
from .painted import MAX_CLASSES, some_values, check_labels
from .progress import CancelToken, ProgressCallback, ProgressEvent
from .pseudo_labels import (DEFAULT_CONFIDENCE, add_model_pseudo_labels, add_pseudo_labels, check_confidence,
                            painted_slices)
from .taught_labels import add_taught_labels, load_taught_labels, save_taught_labels, teacher_only
from .segment import TiledPredictor, model_predictor
from .settings import TrainingSettings, check_training_settings, parse_int_list, parse_name_list, \
    parse_optional_probability, parse_size, setting
from .training import TrainingLoop, TrainingTask, check_output_not_input, run_training

log = logging.getLogger(__name__)
FINETUNE_PACKAGE = "segmentation.affmae"
IGNORE = -1


@dataclass
class FinetuneConfig(TrainingSettings):
    """Options of a fine-tuning run. Sizes in pixels; ``crop_size`` is (height, width), multiples of 8."""

    #: MAE package to start from; a segmentation package to continue training (same classes); None = scratch
    pretrained: str | Path | ModelPackage | None = None
    model: str = setting("affmae_tiny", "architecture when training --scratch")
    model_options: dict[str, Any] = field(default_factory=dict)  # model config fields (e.g. refine=False);
    # from scratch they configure ``model``, with a package they override its config
    class_names: list[str] | None = setting(None, "comma-separated names of classes 1..K (sparse) or 0..K-1 "
                                            "(dense)", parse=parse_name_list)
    label_mode: str = setting("sparse", "sparse: 0 = unlabelled; dense: 0 = background", choices=LABEL_MODES)
    crop_size: tuple[int, int] = setting((128, 128), "crop HxW, multiples of 8", parse=parse_size)
    batch_size: int = setting(8, "global batch size")
    steps: int = setting(500, "optimiser steps")
    lr: float = setting(1e-3, "peak learning rate")
    weight_decay: float = setting(0.05, "AdamW weight decay")
    #: 1 = off. With 0.75 a package pretrained on VNC (300 steps) and fine-tuned on few strokes scored 0.131 fg
    #: IoU on VNC mitochondria, against 0.348 from scratch (docs/few-strokes.md): the stem, which the head reads
    #: at full resolution, learned at 13 % of the rate.
    layer_decay: float = setting(1.0, "layer-wise lr decay of a pretrained encoder (e.g. 0.75): each encoder layer "
                                 "closer to the input gets this factor (default 1: every layer at the full rate)")
    warmup_steps: int = setting(20, "warm-up steps")
    min_lr_ratio: float = 0.01
    dice_weight: float = setting(1.0, "weight of the Dice term next to CE")
    load_decoder: bool = True  # also start the decoder body from the pretrained package
    balance_classes: bool = True
    pseudo_label_confidence: float | None = setting(
        DEFAULT_CONFIDENCE, "sparse labels: also train on the pixels of the painted slices that the live "
        "preview's forest assigns to a class with at least this probability (0.5-1); 'off': strokes only",
        parse=parse_optional_probability)
    augment: bool = setting(True, "disable flips/rot90/intensity augmentation")
    val_slices: Sequence[int] | None = setting(None, "comma-separated z indices held out for validation "
                                               "(IoU/Dice reported at the end)", parse=parse_int_list)
    val_fraction: float = setting(0.0, "hold out this fraction of the labelled slices (2D: a bottom band) for "
                                  "validation")
    output_dir: str | Path = "runs/finetune"
    tile_size: tuple[int, int] = (256, 256)  # for validation inference

    def __post_init__(self) -> None:
        self.crop_size = as_crop_shape(self.crop_size)
        self.tile_size = as_crop_shape(self.tile_size)
        self.validate()

    def validate(self) -> None:
        if self.pretrained is None and self.model in list_models(trainable=False):
            raise ValueError(f"{self.model} is not trained by fine-tuning (the Live preview fits it on the strokes); "
                             f"choose one of {', '.join(list_models(task='segmentation', trainable=True))}")
        check_training_settings(self)
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}; got {self.label_mode!r}")
        if not self.lr > 0 or not 0 < self.layer_decay <= 1 or self.dice_weight < 0:
            raise ValueError(f"need lr > 0, 0 < layer_decay <= 1, dice_weight >= 0; got {self.lr}, "
                             f"{self.layer_decay}, {self.dice_weight}")
        check_confidence(self.pseudo_label_confidence)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, pretrained=None))
        pre = self.pretrained
        data["pretrained"] = (str(pre.path) if isinstance(pre, ModelPackage) else None if pre is None else str(pre))
        data["crop_size"], data["tile_size"] = list(self.crop_size), list(self.tile_size)
        data["output_dir"] = str(self.output_dir)
        data["resume"] = self.resume if isinstance(self.resume, bool) else str(self.resume)
        data["val_slices"] = None if self.val_slices is None else [int(z) for z in self.val_slices]
        return data


@dataclass
class FinetuneResult:
    package_path: Path
    checkpoint_path: Path
    step: int
    total_steps: int
    final_loss: float
    metrics: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- labels

def class_values(values: list[int], label_mode: str, class_names: Sequence[str] | None) -> list[int]:
    """The label value of each model class. With ``class_names`` for classes 1..K (dense: 0..K-1) that cover
    every value, those K classes (unpainted ones included); otherwise one class per value found."""
    if class_names is None:
        return values
    first = 1 if label_mode == "sparse" else 0
    full = list(range(first, first + len(class_names)))
    if set(values) <= set(full) and len(full) <= MAX_CLASSES:
        return full
    if len(class_names) == len(values):
        return values
    raise ValueError(f"class_names has {len(class_names)} names but the labels need {len(values)} (values "
                     f"{some_values(values)}); give one name per class")


def to_internal(labels: np.ndarray, label_mode: str, values: Sequence[int] | None = None) -> np.ndarray:
    """Internal labels: 0 = not used for training, ``c + 1`` for model class ``c`` (label value ``values[c]``;
    default: classes 1..K in sparse mode, 0..K-1 in dense mode)."""
    if values is None:
        values = [int(v) for v in np.unique(labels) if label_mode == "dense" or v != 0]
    lut = np.asarray(values, dtype=np.int64)
    index = np.searchsorted(lut, labels).clip(0, len(lut) - 1)
    known = lut[index] == labels
    internal = np.where(known, index + 1, 0).astype(np.uint16)
    if label_mode == "sparse":
        internal[labels == 0] = 0
    return internal


def split_validation(internal: np.ndarray, config: FinetuneConfig) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Training and validation parts of internal labels (0 = unused), plus a description of the split."""
    if config.val_slices is None and config.val_fraction <= 0:
        return internal, None, {}
    train, val = internal.copy(), np.zeros_like(internal)
    if internal.ndim == 3:
        painted = [z for z in range(internal.shape[0]) if internal[z].any()]
        if config.val_slices is not None:
            held = sorted({int(z) for z in config.val_slices})
            bad = [z for z in held if not 0 <= z < internal.shape[0]]
            if bad:
                raise ValueError(f"validation slices {bad} are outside the stack of {internal.shape[0]} slices")
        else:
            if len(painted) < 2:
                raise ValueError("val_fraction needs labels on at least two slices (one to train, one to validate)")
            n = min(max(int(round(config.val_fraction * len(painted))), 1), len(painted) - 1)
            rng = np.random.default_rng(config.seed + 7)
            held = sorted(int(z) for z in rng.choice(painted, size=n, replace=False))
        train[held] = 0
        val[held] = internal[held]
        info = {"val_slices": held}
    else:
        if config.val_slices is not None:
            raise ValueError("val_slices only apply to 3D stacks; use val_fraction for a 2D image")
        rows = internal.shape[0]
        cut = rows - max(8, int(round(config.val_fraction * rows)))
        train[cut:] = 0
        val[cut:] = internal[cut:]
        info = {"val_rows": [cut, rows]}
    if len(np.unique(train[train > 0])) < 2:
        raise ValueError("after holding out the validation part, fewer than two classes remain painted for "
                         "training: at least two classes must be painted outside the validation slices")
    return train, val, info


def _targets(internal: np.ndarray) -> np.ndarray:
    """Internal labels -> class indices ``0..K-1``, unused pixels -> IGNORE (-1)."""
    return internal.astype(np.int64) - 1


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy + soft Dice over labelled pixels only.

    logits ``[B, K, H, W]``; target ``[B, H, W]`` int64 with class indices, IGNORE for unlabelled.
    Dice is averaged over the classes present in the labelled pixels of the batch.
    """
    logits = logits.float()
    labelled = target != IGNORE  # [B, H, W]
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target.clamp_min(0), reduction="none")  # [B, H, W]
    ce = (ce * labelled).sum() / labelled.sum()
    if dice_weight == 0:
        return ce
    k = logits.shape[1]
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1)[labelled]  # [P, K]
    onehot = F.one_hot(target[labelled], k).float()  # [P, K]
    inter = (probs * onehot).sum(0)
    denom = probs.sum(0) + onehot.sum(0)
    present = onehot.sum(0) > 0
    dice = 1.0 - (2.0 * inter[present] + 1.0) / (denom[present] + 1.0)
    return ce + dice_weight * dice.mean()


def confusion(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """``[K, K]`` confusion counts (rows = truth) over pixels with ``0 <= target < K``."""
    keep = (target >= 0) & (target < k)
    index = target[keep].astype(np.int64) * k + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=k * k).reshape(k, k)


def scores_from_confusion(conf: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU and Dice (None for classes absent from truth and prediction), accuracy, means."""
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    iou, dice = {}, {}
    for i, name in enumerate(names):
        union = tp[i] + fp[i] + fn[i]
        iou[name] = None if union == 0 else float(tp[i] / union)
        dice[name] = None if union == 0 else float(2 * tp[i] / (2 * tp[i] + fp[i] + fn[i]))
    valid_iou = [v for v in iou.values() if v is not None]
    valid_dice = [v for v in dice.values() if v is not None]
    total = conf.sum()
    return {"iou": iou, "dice": dice, "mean_iou": float(np.mean(valid_iou)) if valid_iou else None,
            "mean_dice": float(np.mean(valid_dice)) if valid_dice else None,
            "accuracy": float(tp.sum() / total) if total else None, "pixels": int(total)}


# ----------------------------------------------------------------------------------------------- job

def starting_package(config: FinetuneConfig) -> ModelPackage | None:
    """The package ``config.pretrained`` names (loaded), or None to train from scratch."""
    pre = config.pretrained
    if pre is None or isinstance(pre, ModelPackage):
        return pre
    return load_package(pre)


def continues_training(package: ModelPackage | None) -> bool:
    """True when starting from ``package`` means training a segmentation model on, not a new head."""
    return package is not None and package.task == "segmentation"


def check_continuable(package: ModelPackage, config: FinetuneConfig, values: list[int]) -> None:
    """ValueError unless training can go on with the segmentation ``package`` on labels of ``values``."""
    if package.model_name in list_models(trainable=False):
        raise ValueError(f"{package.path} holds a {package.model_name} fitted by the Live preview; it is not "
                         "trained by fine-tuning. Start from a pretraining package or from scratch")
    if config.model_options:
        raise ValueError(f"model options {sorted(config.model_options)} cannot change the trained segmentation "
                         f"model {package.path}; leave them out, or start from a pretraining package")
    if package.output_values != list(values) or package.label_mode != config.label_mode:
        raise ValueError(f"the segmentation package {package.path} predicts label values {package.output_values} "
                         f"({package.label_mode}); these labels have {list(values)} ({config.label_mode}). Paint "
                         "the same classes to continue training it, or start from a pretraining package")


def _starting_model(config: FinetuneConfig, num_classes: int, values: list[int] | None = None,
                    package: ModelPackage | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model to train and where it came from; ``package``: `starting_package` (loaded when not given)."""
    package = package or starting_package(config)
    if package is None:
        model = create_model(config.model, task="segmentation", num_classes=num_classes, **config.model_options)
        return model, {"pretrained": None}
    if continues_training(package):
        check_continuable(package, config, list(range(1, num_classes + 1)) if values is None else values)
        info = {"pretrained": None, "continued_from": None if package.path is None else str(package.path),
                "continued_provenance": {k: package.provenance.get(k) for k in (
                "job", "steps", "labelled_pixels", "pretrained", "continued_from")}}
        return package.build_model("cpu"), info
    if package.task != "mae":
        raise ValueError(f"the starting package {package.path} is a {package.task} package; fine-tuning starts "
                         "from a pretraining (MAE) package or continues a segmentation package")
    mae = package.build_model("cpu")
    model = create_model(package.model_name, task="segmentation", num_classes=num_classes,
                         **{**package.config, **config.model_options})
    if "decoder" in inspect.signature(model.load_encoder_from).parameters:
        model.load_encoder_from(mae, decoder=config.load_decoder)
    else:  # the baselines transfer their encoder only
        model.load_encoder_from(mae)
    info = {"pretrained": None if package.path is None else str(package.path), "pretrained_model": package.model_name,
            "pretrained_provenance": {k: package.provenance.get(k) for k in ("job", "steps", "final_loss", "sources")}}
    return model, info


def _load_labels(labels: Any, img: InputImage) -> np.ndarray:
    array = as_label_array(labels, img)
    if hasattr(array, "compute"):
        array = array.compute()
    return np.asarray(array[...])


def finetune(image: Any, labels: Any, config: FinetuneConfig | None = None, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None) -> FinetuneResult:
    """Fine-tune (or train from scratch) a segmentation model on ``image`` with painted ``labels``.

    Args:
        image: 2D ``[Y, X]`` or 3D ``[Z, Y, X]`` array (numpy, zarr, dask) or path.
        labels: integer array or path with the image's shape (see the module docstring).
        config: `FinetuneConfig`.
        progress: `ProgressEvent` (job "finetune") every ``log_every`` steps.
        cancel: checked before every step.

    Returns a `FinetuneResult`; ``segmentation.affmae`` and the checkpoint are in ``output_dir``.
    """
    config = config or FinetuneConfig()
    config.validate()
    started = time.perf_counter()
    img = as_input_image(image, what="image")
    label_array = _load_labels(labels, img)
    _, painted = check_labels(label_array, config.label_mode)
    values = class_values(painted, config.label_mode, config.class_names)
    train_labels, val_labels, split_info = split_validation(to_internal(label_array, config.label_mode, values),
                                                            config)
    check_crop_fits([img], config.crop_size)
    start = starting_package(config)
    if start is not None and start.path is not None:  # an --overwrite there would delete the starting package
        check_output_not_input(config.output_dir, [start.path], option="output folder", nested_inputs=True)
    continuing = continues_training(start)
    if continuing:
        check_continuable(start, config, values)  # before the pseudo-labels' forest: fail fast
    stats = compute_stats(img.array, seed=config.seed)
    check_has_contrast(stats, source_name(img, 0))
    taught = None
    if config.pseudo_label_confidence is not None and config.label_mode == "sparse":
        strokes = train_labels
        train_labels, pseudo = teacher_labels(config, img, strokes, start, stats, progress, cancel)
        taught = teacher_only(strokes, train_labels, painted_slices(strokes))
        del strokes
        split_info = {**split_info, "pseudo_labels": pseudo}
    sources = [p for p in (img.source, labels if isinstance(labels, (str, Path)) else None) if p]
    task = FinetuneTask(config, img, PaintedLabels(train_labels, val_labels, split_info, values, painted), start,
                        stats, taught=taught)
    return run_training(task, config, progress, cancel, sources=sources, started=started)


def teacher_labels(config: FinetuneConfig, img: InputImage, strokes: np.ndarray, start: ModelPackage | None,
                   stats: NormalizationStats, progress: ProgressCallback | None, cancel: CancelToken | None
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """Internal labels ``strokes`` plus a teacher's confident pixels of the painted slices, and a summary.

    A first fine-tuning asks the live preview's forest (`pseudo_labels.add_pseudo_labels`). Going on from a
    segmentation package keeps the labels it was taught (`taught_labels`, same image), the strokes winning;
    slices painted since then are labelled by the model itself."""
    def announce(teacher: str) -> None:
        if progress is not None:
            progress(ProgressEvent("finetune", 0, int(config.steps),
                                   message=f"labelling the confident pixels of the painted slices with {teacher}"))

    if not continues_training(start):
        announce("the live preview's forest")
        return add_pseudo_labels(img.array, strokes, config.pseudo_label_confidence, config.seed, cancel, stats=stats)
    slices = painted_slices(strokes)
    labels, missing = add_taught_labels(strokes, load_taught_labels(start.path, img.array, slices,
                                                                    start.num_classes), slices)
    taught = [z for z in slices if z not in missing]
    teacher = ("the labels the continued model was taught" if not missing else "the model training continued from"
               if not taught else "the labels the continued model was taught, and the model itself on new slices")
    announce(teacher)
    info: dict[str, Any] = {"taught_slices": taught,
                            "taught_pixels": int(np.count_nonzero(labels) - np.count_nonzero(strokes))}
    if missing:
        labels, by_model = add_model_pseudo_labels(start, img.array, labels, config.pseudo_label_confidence,
                                                   tile_size=config.tile_size, device=config.device, cancel=cancel,
                                                   slices=missing)
        info = {**by_model, **info, "model_slices": missing}
    info["teacher"] = teacher
    return labels, info


@dataclass
class PaintedLabels:
    """The labels a fine-tuning run learns from, after `check_labels` and `split_validation`."""

    train: np.ndarray  # internal labels (0 = unused, c + 1 = model class c), validation part zeroed
    val: np.ndarray | None  # internal labels of the held-out part, or None without validation
    split_info: dict[str, Any]  # how the validation part was chosen (val_slices / val_rows)
    values: list[int]  # label value of each model class
    painted: list[int]  # label values painted


class FinetuneTask(TrainingTask):
    """Fine-tuning's part of the `TrainingLoop`: augmented crops around painted pixels, cross-entropy + Dice
    on painted pixels, running train confusion, validation at the end, and the segmentation package."""

    job, verb, package_name = "finetune", "fine-tuning", FINETUNE_PACKAGE
    save_last_step = False  # `finish` validates first, so the last package holds the metrics

    def __init__(self, config: FinetuneConfig, image: InputImage, labels: PaintedLabels,
                 start: ModelPackage | None = None, stats: NormalizationStats | None = None, *,
                 taught: dict[int | None, np.ndarray] | None = None) -> None:
        """``start``: the loaded `starting_package` of ``config`` (loaded here when not given); ``stats``: the
        image's intensity statistics when the caller computed them (else computed in `prepare`); ``taught``: a
        teacher's labels per painted slice, kept beside the package (`taught_labels`)."""
        self.config, self.image, self.labels, self.taught = config, image, labels, taught
        self.start = start or starting_package(config)
        self.image_stats = stats
        # layer-wise decay protects pretrained features; from scratch (or going on with a trained model) it
        # would only slow the stem, which the full-resolution head reads
        self.layer_decay = config.layer_decay if self.start is not None and self.start.task == "mae" else 1.0
        self.num_classes = len(labels.values)
        inherited = self.start.class_names if continues_training(self.start) else None
        self.class_names = list(config.class_names or inherited or [f"class {v}" for v in labels.values])
        self.augment = AugmentConfig() if config.augment else None
        self.metrics: dict[str, Any] = {}

    def total_steps(self) -> int:
        return int(self.config.steps)

    def build_model(self) -> torch.nn.Module:
        self.model, self.start_info = _starting_model(self.config, self.num_classes, self.labels.values, self.start)
        return self.model

    def check_resume(self, checkpoint: Checkpoint) -> None:
        values = self.labels.values
        if checkpoint.meta.get("num_classes") != self.num_classes or checkpoint.extra.get("label_values",
                                                                                           values) != values:
            raise ValueError(f"the checkpoint at {checkpoint.path} was trained on label values "
                             f"{checkpoint.extra.get('label_values', checkpoint.meta.get('num_classes'))}, these "
                             f"labels have {values}; resume with the same labels or start again with --overwrite")

    def prepare(self, rngs: RngStates) -> None:
        config = self.config
        self.rngs = rngs
        if continues_training(self.start) and self.start.stats is not None:
            self.stats = self.start.stats  # the model goes on with the intensities it was trained on
        else:  # the contrast check's (deterministic in the seed), or computed the same way
            self.stats = self.image_stats or compute_stats(self.image.array, seed=config.seed)
        self.sampler = LabeledPatchSampler(self.image.array, self.labels.train, config.crop_size, seed=config.seed,
                                           pad=True, balance_classes=config.balance_classes)
        self.sampler.rng = rngs.numpy
        self.conf_train = np.zeros((self.num_classes, self.num_classes), np.int64)

    def begin(self, run: TrainingLoop) -> None:
        # before any package of this run exists, so no package sits beside another run's taught labels
        save_taught_labels(run.package_path, self.image.array, self.taught or {}, self.num_classes)

    def restore(self, extra: dict[str, Any]) -> None:
        self.stats = NormalizationStats.from_dict(extra["stats"])
        self.conf_train = np.asarray(extra.get("confusion", self.conf_train.tolist()), np.int64)

    def provenance(self, run: TrainingLoop) -> dict[str, Any]:
        labels = self.labels
        return {
            "job": "finetune", "napari_affmae": __version__, "torch": torch.__version__,
            "config": self.config.to_dict(), "source": source_name(self.image, 0), "shape": list(self.image.shape),
            "painted_classes": labels.painted, "labelled_pixels": int((labels.train > 0).sum()),
            "device": run.device.type, "precision": precision_name(run.dtype), "world_size": run.context.world_size,
            "layer_decay_used": self.layer_decay, **self.start_info, **labels.split_info,
        }

    def start_message(self, run: TrainingLoop) -> str:
        start = ("continued" if "continued_from" in self.start_info else
                 "pretrained" if self.config.pretrained is not None else "from scratch")
        return f"fine-tuning {type(self.model).__name__} ({self.num_classes} classes, {start}) on {run.device.type}"

    def batch(self, shard: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised crops ``[b, 1, h, w]`` and class targets ``[b, h, w]`` (IGNORE = unpainted)."""
        crops, crop_labels = self.sampler.sample(self.config.batch_size)  # [B, h, w] raw, [B, h, w] int
        crops = self.stats.apply(crops).astype(np.float32)
        if self.augment is not None:
            crops, crop_labels = augment_batch(crops, crop_labels, self.rngs.numpy, self.augment)
        x = torch.from_numpy(np.ascontiguousarray(crops[shard]))[:, None].to(device)  # [b, 1, h, w]
        target = torch.from_numpy(_targets(np.ascontiguousarray(crop_labels[shard]))).to(device)  # [b, h, w]
        return x, target

    def forward(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(batch[0])  # logits [b, K, h, w]

    def loss(self, out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return segmentation_loss(out, batch[1], self.config.dice_weight)

    def observe(self, out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        with torch.no_grad():
            pred = out.argmax(1).cpu().numpy()
            self.conf_train += confusion(pred, batch[1].cpu().numpy(), self.num_classes)
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"stats": self.stats.to_dict(), "confusion": self.conf_train.tolist(),
                "label_values": self.labels.values}

    def package(self, run: TrainingLoop, done: int) -> ModelPackage:
        return ModelPackage.from_model(
            self.model, normalization=self.stats, class_names=self.class_names, label_mode=self.config.label_mode,
            label_values=self.labels.values, pixel_size=image_pixel_size(self.image),
            provenance=dict(run.provenance, steps=done, total_steps=run.total, metrics=self.metrics,
                            final_loss=run.losses[-1] if run.losses else None))

    def on_cancel(self, run: TrainingLoop) -> None:
        self.metrics["train"] = scores_from_confusion(self.conf_train, self.class_names)

    def finish(self, run: TrainingLoop) -> None:
        """Train scores over every process, validation on the held-out labels, then the outputs."""
        self.metrics["train"] = scores_from_confusion(run.context.sum_array(self.conf_train, run.device),
                                                      self.class_names)
        val_labels = self.labels.val
        if val_labels is not None and run.context.is_main:
            run.emit(ProgressEvent("finetune", run.step, run.total, message="validating on held-out labels"))
            self.metrics["val"] = _validate(self.model, self.image, val_labels, self.stats, self.num_classes,
                                            self.config, run.device, run.dtype, self.class_names, run.cancel)
            self.metrics["val"].update(self.labels.split_info)
        run.write_outputs(run.step)

    def result(self, run: TrainingLoop, cancelled: bool) -> FinetuneResult:
        return FinetuneResult(run.package_path, run.checkpoint_path, run.step, run.total, run.final_loss,
                              self.metrics, run.losses, cancelled=cancelled,
                              seconds=time.perf_counter() - run.started)


def _validate(model, img: InputImage, val_labels: np.ndarray, stats: NormalizationStats, num_classes: int,
              config: FinetuneConfig, device, dtype, class_names, cancel) -> dict[str, Any]:
    """Segment the held-out region and score it on its labelled pixels."""
    model.eval()
    predictor = TiledPredictor(model_predictor(model, device, dtype), num_classes, config.tile_size, 0.25,
                               config.batch_size, stats.apply, device, cancel=cancel)
    conf = np.zeros((num_classes, num_classes), np.int64)
    slices = [z for z in range(val_labels.shape[0]) if val_labels[z].any()] if val_labels.ndim == 3 else [0]
    for z in slices:
        truth = val_labels[z] if val_labels.ndim == 3 else val_labels
        pred = np.zeros(truth.shape, np.int64)

        def write(r0: int, r1: int, logits: np.ndarray, pred=pred) -> None:
            pred[r0:r1] = logits.argmax(0)

        predictor.run_slice(img.array, z, write)
        conf += confusion(pred, _targets(truth), num_classes)
    model.train()
    return scores_from_confusion(conf, class_names)

