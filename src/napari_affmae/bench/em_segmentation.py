"""Real-EM few-label benchmark: does "pretrain on this image" help a lab with few labels?

Protocol (tasks, slice splits, label regimes, metrics): `bench.em_protocol`. Arms, all fine-tuned
with the same budget (steps, batch, crop, optimiser, loss) through `engine.finetune` and scored
with `engine.segment` on the held-out slices:

* ``affmae_pretrained``  AFFMAE pretrained (`engine.pretrain`) on the raw stack itself plus the
  task's unlabelled stack, then fine-tuned;
* ``affmae_scratch``     the same AFFMAE fine-tuned from random weights;
* ``vit_mae_pretrained`` ViT-MAE of about the same parameter count, pretrained on the same
  images with the same step budget, then fine-tuned;
* ``unet_scratch``       a plain small U-Net (``unet_*``) from scratch, the usual lab baseline;
* ``affmae_taught``, ``unet_taught``  the same from scratch, trained on the strokes plus the pixels of the
  painted slices that the live preview's forest is confident about (`engine.pseudo_labels`,
  ``pseudo_label_confidence`` = `PSEUDO_LABEL_CONFIDENCE`);
* ``threshold``          no network: smoothed grey-value cut fitted on the painted pixels (the floor a
  network must beat to have learned more than brightness);
* ``rf_filters``         no network: ilastik's pixel classifier rebuilt — 20 multiscale filter features
  (`data.features.filter_features`) and a 100-tree random forest on the painted pixels, the tool a
  lab already has (the Live preview without encoder features, `engine.live`).

``--rounds N`` adds correction rounds to every arm: after each, the labelled slices are predicted,
about 0.25 % of each is painted where the prediction is most wrong (`em_protocol.correction_strokes`),
the forest and the threshold are refitted, and the networks train ``--round-steps`` more steps from
the previous round's package; held-out scores per round go into ``RunRecord.rounds``.

One pretraining per (task, family, seed) is shared by every k and label regime. The default
setting (VNC mitochondria, k = 1 and 4, sparse labels, one seed, tiny models) is sized for 2 CPU
cores; ``--tasks all --k 1,2,4,all --regimes sparse,dense --seeds 0,1,2 --size small`` is the full
grid for a GPU. Data: ``--data-dir`` or ``$AFFMAE_DATA``, the folder holding vnc/ and isbi2012/.
``affmae bench segmentation`` prints the scores (mean ± std over seeds) and writes the raw results
as JSON (``WORK_DIR/results.json``, or ``--out``).
"""
from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..engine.pseudo_labels import DEFAULT_CONFIDENCE, check_confidence
from . import em_protocol as P
from .tables import refuse_markdown_out, stat_text, text_table

log = logging.getLogger(__name__)

ARMS: dict[str, tuple[str, bool]] = {  # arm -> (model family, pretrained?)
    "affmae_pretrained": ("affmae", True),
    "affmae_scratch": ("affmae", False),
    "vit_mae_pretrained": ("vit_mae", True),
    "unet_scratch": ("unet", False),
    "affmae_taught": ("affmae", False),  # from scratch on the strokes + the teacher forest's confident pixels
    "unet_taught": ("unet", False),
    "threshold": ("threshold", False),  # no network: smoothed grey-value cut fitted on the painted pixels
    "rf_filters": ("rf_filters", False),  # no network: ilastik-style filter features + random forest
}
NO_NETWORK = ("threshold", "rf_filters")  # arms without a trained network
#: Arms of a run without --arms: everything but ViT-MAE (a pretraining comparison, issue of its own), so that
#: the default CPU run (VNC mitochondria, k = 1 and 4) stays within an hour on 2 cores.
DEFAULT_ARMS = ("affmae_taught", "unet_taught", "affmae_pretrained", "affmae_scratch", "unet_scratch", "threshold",
                "rf_filters")
TAUGHT = ("affmae_taught", "unet_taught")  # arms fine-tuned with `FinetuneConfig.pseudo_label_confidence`
PSEUDO_LABEL_CONFIDENCE = DEFAULT_CONFIDENCE  # the fine-tuning default; the other network arms: strokes only
UNET_SIZE = {"tiny": "tiny", "small": "small", "base": "small"}
PRETRAIN_FIELDS = ("mask_ratio", "mask_type", "keep_rate")  # set through PretrainConfig, not model_options
PRETRAINING_ONLY = ("mask_ratio", "mask_type", "norm_pix_loss", "loss_weights", "blob_cells", "target_pool",
                    "target_blur", "target_norm_floor")  # no effect on segmentation


def masking_for(family: str, affmae_options: dict[str, Any]) -> dict[str, Any]:
    """Pretraining masks of ``family``: its default (as each was published for EM / natural images, DESIGN.md
    sections 3 and 5; every size masks alike), with the AFFMAE options that are `PretrainConfig` fields applied."""
    from ..models import masking_of  # noqa: PLC0415

    spec = masking_of(f"{family}_tiny").default_mask
    masking: dict[str, Any] = {"mask_ratio": spec.ratio, "mask_type": spec.kind}
    if family == "affmae":
        masking.update({k: v for k, v in affmae_options.items() if k in PRETRAIN_FIELDS})
    return masking


def pretrain_dir(work_dir: Path, task: str, family: str, seed: int) -> Path:
    """Where the benchmark pretrains ``family`` for ``task`` and ``seed`` (the package is inside)."""
    return Path(work_dir) / task / f"pretrain_{family}_s{seed}"


@dataclass(kw_only=True)
class BenchBudget:
    """The training and evaluation budget of a real-EM run, shared by the benchmark (`EMBenchConfig`) and the
    ablation study. Sizes in pixels; steps are optimiser steps."""

    pretrain_steps: int = 300
    finetune_steps: int = 200
    batch_size: int = 8
    crop: int = 128
    tile: int = 256
    max_eval_slices: int | None = None  # evenly spaced subset of the evaluation slices (None = all)
    device: str = "auto"
    threads: int | None = None

    def budget(self) -> dict[str, Any]:
        """The budget fields as keyword arguments (for a run with the same budget)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(BenchBudget)}

    def check_budget(self) -> None:
        if min(self.pretrain_steps, self.finetune_steps, self.batch_size) < 1:
            raise ValueError("pretrain-steps, finetune-steps and batch-size must be >= 1")
        if self.crop % 8 or self.crop < 32 or self.tile % 8 or self.tile < 32:
            raise ValueError(f"crop and tile must be multiples of 8 and >= 32 px; got {self.crop}, {self.tile}")


_BUDGET_HELP = {"crop": "training crop side (px)", "tile": "inference tile side (px)",
                "max_eval_slices": "score an evenly spaced subset of the evaluation slices (default: all)",
                "device": "auto, cpu, cuda, mps", "threads": "torch CPU threads"}


def add_budget_options(p: argparse.ArgumentParser) -> None:
    """``--pretrain-steps`` ... ``--threads``: one option per `BenchBudget` field, its default from the field."""
    for f in dataclasses.fields(BenchBudget):
        kind = str if f.name == "device" else int
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=_BUDGET_HELP.get(f.name))


def budget_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `BenchBudget` fields of parsed `add_budget_options` options."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchBudget)}


@dataclass
class EMBenchConfig(BenchBudget):
    """One benchmark run: what is run (tasks, label counts, regimes, seeds, arms) on a `BenchBudget`."""

    data_dir: Path
    work_dir: Path = Path("runs/em_segmentation")
    tasks: list[str] = field(default_factory=lambda: ["vnc_mito"])
    ks: list[int | str] = field(default_factory=lambda: [1, 4])
    regimes: list[str] = field(default_factory=lambda: ["sparse"])
    seeds: list[int] = field(default_factory=lambda: [0])
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    size: str = "tiny"
    tolerance: float = P.BOUNDARY_TOLERANCE
    affmae_options: dict[str, Any] = field(default_factory=dict)  # AFFMAEConfig fields for both AFFMAE arms
    pseudo_label_confidence: float = PSEUDO_LABEL_CONFIDENCE  # of the *_taught arms
    rounds: int = 0  # correction rounds after the strokes (`em_protocol.correction_strokes`)
    round_steps: int = 50  # fine-tuning steps of each correction round, from the previous round's model

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in P.TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(P.TASKS)} or 'all'")
        bad_arms = [a for a in self.arms if a not in ARMS]
        if bad_arms:
            raise ValueError(f"unknown arm(s) {bad_arms}; choose from {', '.join(ARMS)}")
        bad_regimes = [r for r in self.regimes if r not in P.REGIMES]
        if bad_regimes:
            raise ValueError(f"unknown label regime(s) {bad_regimes}; choose from {', '.join(P.REGIMES)}")
        if self.size not in UNET_SIZE:
            raise ValueError(f"size must be one of {', '.join(UNET_SIZE)}; got {self.size!r}")
        self.check_budget()
        if self.rounds < 0 or self.round_steps < 1:
            raise ValueError(f"rounds must be >= 0 and round-steps >= 1; got {self.rounds}, {self.round_steps}")
        if self.rounds and "dense" in self.regimes:
            raise ValueError("correction rounds paint where a prediction is wrong, and dense labels leave no pixel "
                             "unpainted: run --rounds with --regimes sparse")
        if self.pseudo_label_confidence is None:
            raise ValueError("the *_taught arms need a pseudo-label confidence; the other network arms train on "
                             "the strokes only")
        check_confidence(self.pseudo_label_confidence)
        if not (self.tasks and self.ks and self.regimes and self.seeds and self.arms):
            raise ValueError("tasks, k, regimes, seeds and arms must each name at least one value")
        from ..models.affmae import AFFMAEConfig  # noqa: PLC0415

        known = {f.name for f in dataclasses.fields(AFFMAEConfig)} | set(PRETRAIN_FIELDS)
        unknown = sorted(set(self.affmae_options) - known)
        if unknown:
            raise ValueError(f"unknown AFFMAE option(s) {unknown}; choose from {', '.join(sorted(known))}")
        AFFMAEConfig(**{k: v for k, v in self.affmae_options.items() if k not in ("mask_ratio", "mask_type")})
        from ..engine import PretrainConfig  # noqa: PLC0415

        PretrainConfig(model=self.model_name("affmae"), **self.masking("affmae"))  # e.g. mask_ratio in (0, 1)

    def masking(self, family: str) -> dict[str, Any]:
        """Pretraining mask ratio / type (and AFFMAE keep rate) of ``family``: `PretrainConfig` fields."""
        return masking_for(family, self.affmae_options)

    def pretrain_options(self, family: str) -> dict[str, Any]:
        """`PretrainConfig.model_options` of ``family``: the AFFMAE options that are not `masking` fields."""
        if family != "affmae":
            return {}
        return {k: v for k, v in self.affmae_options.items() if k not in PRETRAIN_FIELDS}

    def segmentation_options(self, family: str) -> dict[str, Any]:
        """`FinetuneConfig.model_options` of ``family``, the same for the pretrained and the scratch arm:
        every AFFMAE option that shapes the segmentation model (keep rate, refine, ...)."""
        if family != "affmae":
            return {}
        return {k: v for k, v in self.affmae_options.items() if k not in PRETRAINING_ONLY}

    def model_name(self, family: str) -> str:
        if family in NO_NETWORK:
            return family
        return f"unet_{UNET_SIZE[self.size]}" if family == "unet" else f"{family}_{self.size}"


@dataclass
class RunRecord:
    """One fine-tuning run scored on the evaluation slices."""

    task: str
    regime: str
    k: int | str
    labelled_slices: list[int]
    seed: int
    arm: str
    model: str
    scores: dict[str, Any] | None = None
    labelled_fraction: float = 0.0  # labelled pixels / pixels of the k slices
    finetune_s: float = 0.0
    inference_s: float = 0.0
    pretrain_s: float = 0.0  # the arm's share: its (shared) pretraining time
    error: str | None = None
    #: per round (0 = the strokes, then each correction round): round, fg_iou, train_s (training on every
    #: stroke so far), look_s (predicting the labelled slices to correct them), labelled_fraction
    rounds: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- running

def _eval_slices(split: P.SliceSplit, limit: int | None) -> list[int]:
    slices = list(split.eval_slices)
    if limit is None or limit >= len(slices):
        return slices
    picks = np.linspace(0, len(slices) - 1, max(limit, 1)).round().astype(int)
    return sorted({slices[i] for i in picks})


def _pretrain(config: EMBenchConfig, family: str, images: list[np.ndarray], task: str, seed: int,
              device: str) -> tuple[Any, dict[str, Any]]:
    from ..engine import PretrainConfig, pretrain  # noqa: PLC0415

    out = pretrain_dir(config.work_dir, task, family, seed)
    if out.exists():
        shutil.rmtree(out)
    masking, options = config.masking(family), config.pretrain_options(family)
    started = time.perf_counter()
    result = pretrain(images, PretrainConfig(
        model=config.model_name(family), crop_size=(config.crop, config.crop), batch_size=config.batch_size,
        steps=config.pretrain_steps, warmup_steps=min(50, config.pretrain_steps // 10), seed=seed, device=device,
        output_dir=out, checkpoint_every=config.pretrain_steps, log_every=max(1, config.pretrain_steps // 10),
        model_options=options, **masking), progress=_log_progress)
    info = {"model": config.model_name(family), "steps": result.step, "seconds": time.perf_counter() - started,
            "final_loss": result.final_loss, "first_loss": result.losses[0] if result.losses else None,
            "losses": [float(v) for v in result.losses], **masking, **options}
    return result.package_path, info


class ArmRun(abc.ABC):
    """One arm's model over the correction rounds: `fit` on every stroke so far (round 0 from nothing, later
    rounds going on from the previous model), `predict` slices. Predictions are ``[Z, Y, X]`` uint8, 1 =
    structure, filled on the asked slices only."""

    def __init__(self, config: EMBenchConfig, record: RunRecord, raw: np.ndarray, pretrained: Any,
                 device: str) -> None:
        self.config, self.record, self.raw, self.pretrained, self.device = config, record, raw, pretrained, device

    @abc.abstractmethod
    def fit(self, labels: np.ndarray, round_index: int) -> None:
        """Train on ``labels`` ``[Z, Y, X]`` (0 = unpainted, 1 = background, 2 = structure)."""

    @abc.abstractmethod
    def predict(self, slices: list[int]) -> np.ndarray:
        """Structure masks of ``slices`` (see the class docstring)."""


class ThresholdRun(ArmRun):
    """The smoothed grey-value cut fitted on the painted pixels (refitted each round)."""

    def fit(self, labels: np.ndarray, round_index: int) -> None:
        self.cut = P.fit_threshold(self.raw, labels)
        log.info("  threshold: %s than %.1f after smoothing (sigma %.1f px)",
                 "darker" if self.cut.dark_foreground else "brighter", self.cut.threshold, self.cut.sigma)

    def predict(self, slices: list[int]) -> np.ndarray:
        pred = np.zeros(self.raw.shape, np.uint8)
        pred[slices] = self.cut.predict(self.raw[slices])
        return pred


class ForestRun(ArmRun):
    """ilastik's pixel classifier (`engine.live` without encoder features), refitted on every stroke each round;
    filter features stay cached across rounds when there are rounds, else each slice's are freed after use."""

    def fit(self, labels: np.ndarray, round_index: int) -> None:
        from ..engine.live import LiveConfig, LivePreview  # noqa: PLC0415

        if round_index == 0:
            self.forest = LivePreview(self.raw, LiveConfig.ilastik_style(seed=self.record.seed))
        self.forest.fit(labels)

    def predict(self, slices: list[int]) -> np.ndarray:
        pred = np.zeros(self.raw.shape, np.uint8)
        for z in slices:
            pred[z] = self.forest.predict(z)[0] == P.FOREGROUND
            if not self.config.rounds:
                self.forest.forget(z)
        return pred


class NetworkRun(ArmRun):
    """A network fine-tuned with `engine.finetune`: round 0 from ``pretrained`` (or scratch) for
    ``finetune_steps``, each later round ``round_steps`` more from the previous round's package."""

    def fit(self, labels: np.ndarray, round_index: int) -> None:
        from ..engine import FinetuneConfig, finetune  # noqa: PLC0415

        config, record = self.config, self.record
        out = config.work_dir / record.task / f"{record.arm}_{record.regime}_k{record.k}_s{record.seed}"
        if round_index:
            out = out / f"round{round_index}"
        if out.exists():
            shutil.rmtree(out)
        steps = config.round_steps if round_index else config.finetune_steps
        start = self.package if round_index else self.pretrained
        options = {} if round_index else config.segmentation_options(ARMS[record.arm][0])
        result = finetune(self.raw, labels, FinetuneConfig(
            pretrained=start, model=record.model, class_names=list(P.TASKS[record.task].class_names),
            label_mode="sparse", model_options=options,
            pseudo_label_confidence=config.pseudo_label_confidence if record.arm in TAUGHT else None,
            crop_size=(config.crop, config.crop), batch_size=config.batch_size, steps=steps,
            warmup_steps=min(20, steps // 10), seed=record.seed + round_index, device=self.device, output_dir=out,
            checkpoint_every=steps, log_every=max(1, steps // 5), tile_size=(config.tile, config.tile)),
            progress=_log_progress)
        self.package = result.package_path

    def predict(self, slices: list[int]) -> np.ndarray:
        from ..engine import SegmentConfig, segment  # noqa: PLC0415

        tile = (self.config.tile, self.config.tile)
        pred = segment(self.package, self.raw, SegmentConfig(tile_size=tile, device=self.device, slices=slices,
                                                             batch_size=4))
        return (np.asarray(pred) == P.FOREGROUND).astype(np.uint8)  # [Z, Y, X], 1 = structure


def arm_run(config: EMBenchConfig, record: RunRecord, raw: np.ndarray, pretrained: Any, device: str) -> ArmRun:
    """The `ArmRun` of ``record.arm``."""
    kind = {"threshold": ThresholdRun, "rf_filters": ForestRun}.get(record.arm, NetworkRun)
    return kind(config, record, raw, pretrained, device)


def run_rounds(config: EMBenchConfig, record: RunRecord, raw: np.ndarray, truth: np.ndarray, labels: np.ndarray,
               pretrained: Any, eval_slices: list[int], device: str,
               keep_slice: int | None) -> np.ndarray | None:
    """Round 0 on ``labels``, then ``config.rounds`` correction rounds: predict the labelled slices, paint
    corrections where they are most wrong (`em_protocol.correction_strokes`), train on (going on from the
    previous model). Held-out scores of every round go into ``record.rounds``; round 0's also into
    ``record.scores``. Returns round 0's prediction of ``keep_slice`` (for the overlays), or None."""
    run = arm_run(config, record, raw, pretrained, device)
    task, kept = P.TASKS[record.task], None
    for r in range(config.rounds + 1):
        started = time.perf_counter()
        run.fit(labels, r)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        pred = run.predict(eval_slices)
        inference_s = time.perf_counter() - started
        scores = P.evaluate_stack(pred, truth, task, eval_slices, config.tolerance)
        if r == 0:
            record.scores, record.finetune_s, record.inference_s = scores, train_s, inference_s
            kept = None if keep_slice is None else pred[keep_slice]
        entry = {"round": r, "fg_iou": scores["fg_iou"], "train_s": train_s,
                 "labelled_fraction": float((labels[record.labelled_slices] > 0).mean())}
        if r < config.rounds:
            started = time.perf_counter()
            look = run.predict(record.labelled_slices)
            entry["look_s"] = time.perf_counter() - started  # predicting the slices a person corrects
            labels = labels.copy()
            for i, z in enumerate(record.labelled_slices):  # each slice its own strokes
                labels[z] = P.correction_strokes(labels[z], look[z], truth[z],
                                                 seed=P.correction_seed(record.seed, r, i))
        record.rounds.append(entry)
        log.info("  round %d: fg IoU %.3f (train %.0f s)", r, scores["fg_iou"], train_s)
    return kept


def _log_progress(event: Any) -> None:
    if event.message:
        log.info("  %s: %s", event.job, event.message)
    elif event.loss is not None:
        log.info("  %s step %d/%d loss %.4f", event.job, event.step, event.total, event.loss)


def run_benchmark(config: EMBenchConfig) -> dict[str, Any]:
    """Run every (task, seed, regime, k, arm) of ``config``; returns the JSON-able results."""
    config.validate()
    from ..engine import resolve_device  # noqa: PLC0415

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device).type
    config.work_dir.mkdir(parents=True, exist_ok=True)
    records: list[RunRecord] = []
    pretraining: list[dict[str, Any]] = []
    overlays: dict[str, Any] = {}
    splits: dict[str, Any] = {}
    started = time.perf_counter()
    for task_name in config.tasks:
        task = P.TASKS[task_name]
        raw, truth, extra_paths = P.load_task(config.data_dir, task)
        import tifffile  # noqa: PLC0415

        unlabelled = [np.asarray(tifffile.imread(p)) for p in extra_paths]
        split = P.make_split(raw.shape[0])
        eval_slices = _eval_slices(split, config.max_eval_slices)
        ks = [k for k in config.ks if k == "all" or int(k) <= len(split.label_order)]
        splits[task_name] = {"shape": list(raw.shape), "pool": sorted(split.label_order),
                             "label_order": list(split.label_order), "eval_slices": eval_slices,
                             "labelled": {str(k): split.labelled(k) for k in ks},
                             "pretrain_images": [task.raw, *[str(p.relative_to(config.data_dir)) for p in extra_paths]]}
        show_slice = eval_slices[len(eval_slices) // 2]
        overlays[task_name] = {"slice": show_slice, "raw": raw[show_slice], "truth": truth[show_slice], "pred": {}}
        for seed in config.seeds:
            packages: dict[str, Any] = {}
            for family in sorted({ARMS[a][0] for a in config.arms if ARMS[a][1]}):
                log.info("[%s seed %d] pretraining %s on %d image(s)", task_name, seed, family, 1 + len(unlabelled))
                try:
                    packages[family], info = _pretrain(config, family, [raw, *unlabelled], task_name, seed, device)
                except Exception as err:  # noqa: BLE001  (recorded on the page; the other arms go on)
                    log.exception("pretraining %s failed", family)
                    packages[family], info = None, {"model": config.model_name(family), "error": _short(err)}
                pretraining.append({"task": task_name, "seed": seed, "family": family, **info})
            for regime in config.regimes:
                for k in ks:
                    chosen = split.labelled(k)
                    labels = P.training_labels(truth, chosen, regime, seed=seed)
                    fraction = float((labels[chosen] > 0).mean())
                    for arm in config.arms:
                        family, pretrained = ARMS[arm]
                        record = RunRecord(task_name, regime, k, chosen, seed, arm, config.model_name(family),
                                           labelled_fraction=fraction)
                        first = seed == config.seeds[0] and regime == config.regimes[0] and k == ks[0]
                        log.info("[%s seed %d %s k=%s] %s", task_name, seed, regime, k, arm)
                        try:
                            if pretrained and packages.get(family) is None:
                                raise RuntimeError(f"pretraining {family} failed")
                            if pretrained:
                                record.pretrain_s = next(p["seconds"] for p in pretraining[::-1]
                                                         if p["family"] == family and p["task"] == task_name)
                            pred = run_rounds(config, record, raw, truth, labels,
                                              packages.get(family) if pretrained else None, eval_slices, device,
                                              show_slice if first else None)
                            if pred is not None:
                                overlays[task_name]["pred"][arm] = pred
                        except Exception as err:  # noqa: BLE001  (recorded on the page; the other arms go on)
                            log.exception("arm %s failed", arm)
                            record.error = _short(err)
                        records.append(record)
    return {
        "config": _config_json(config), "environment": environment(device), "splits": splits,
        "pretraining": pretraining, "runs": [dataclasses.asdict(r) for r in records],
        "summary": summarise_runs(records), "total_s": time.perf_counter() - started, "overlays": overlays,
        "parameters": parameter_counts(config),
    }


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _config_json(config: EMBenchConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["data_dir"], data["work_dir"] = str(config.data_dir), str(config.work_dir)
    return data


def parameter_counts(config: EMBenchConfig) -> dict[str, int]:
    """Parameters of each arm's segmentation model (binary task)."""
    from ..models import create_model  # noqa: PLC0415

    names = sorted({config.model_name(ARMS[a][0]) for a in config.arms if ARMS[a][0] not in NO_NETWORK})
    return {n: sum(p.numel() for p in create_model(n, task="segmentation", num_classes=2).parameters()) for n in names}


def environment(device: str) -> dict[str, Any]:
    info = {"machine": platform.node() or "unknown", "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarise_runs(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (task, regime, k, arm)."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.regime, str(r.k), r.arm), []).append(r)
    rows = []
    for (task, regime, k, arm), runs in groups.items():
        ok = [r for r in runs if r.scores is not None]
        bg_name = P.TASKS[task].class_names[0]
        rows.append({
            "task": task, "regime": regime, "k": k, "arm": arm, "seeds": len(runs), "failed": len(runs) - len(ok),
            "error": next((r.error for r in runs if r.error), None),
            "n_labelled": len(runs[0].labelled_slices),
            "fg_iou": P.summarise([r.scores["fg_iou"] for r in ok]),
            "fg_dice": P.summarise([r.scores["fg_dice"] for r in ok]),
            "bg_iou": P.summarise([r.scores["iou"][bg_name] for r in ok]),
            "boundary_f1": P.summarise([r.scores.get("boundary_f1") for r in ok]),
            "finetune_s": P.summarise([r.finetune_s for r in ok]),
            "inference_s": P.summarise([r.inference_s for r in ok]),
            "labelled_fraction": float(np.mean([r.labelled_fraction for r in runs])),
            "rounds": _summarise_rounds(ok),
        })
    return rows


def _summarise_rounds(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Per correction round, over the seeds that reached it (``fg_iou["n"]``): fg IoU, training seconds,
    seconds to predict the labelled slices and the labelled share of them."""
    rows = []
    for i in range(max((len(r.rounds) for r in runs), default=0)):
        reached = [r.rounds[i] for r in runs if len(r.rounds) > i]
        rows.append({"round": i, "fg_iou": P.summarise([x["fg_iou"] for x in reached]),
                     "train_s": P.summarise([x["train_s"] for x in reached]),
                     "look_s": P.summarise([x.get("look_s") for x in reached]),
                     "labelled_fraction": float(np.mean([x["labelled_fraction"] for x in reached]))})
    return rows


def has_rounds(summary: Sequence[dict[str, Any]]) -> bool:
    """True when rows of ``summary`` went through correction rounds."""
    return any(len(r.get("rounds") or []) > 1 for r in summary)


# ----------------------------------------------------------------------------------------------- report

def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def round_text(rounds: Sequence[dict[str, Any]]) -> str:
    """Mean fg IoU by correction round, ``"0.376 / 0.402 / 0.415"``."""
    return " / ".join("-" if r["fg_iou"]["mean"] is None else f"{r['fg_iou']['mean']:.3f}" for r in rounds)


def format_table(results: dict[str, Any]) -> str:
    """Plain-text scores for the terminal: one row per (task, labels, k, arm), mean ± std over seeds (and the
    mean IoU after each correction round when there were rounds)."""
    with_rounds = has_rounds(results["summary"])
    header = ["task", "labels", "k", "arm", "fg IoU", "fg Dice", "bg IoU", "boundary F1", "labelled px",
              "fine-tune s", "inference s"] + (["fg IoU by round"] if with_rounds else [])
    rows = []
    for r in results["summary"]:
        title = P.TASKS[r["task"]].title
        if r["error"] and r["fg_iou"]["mean"] is None:
            rows.append([title, r["regime"], r["k"], r["arm"], "failed"] + [""] * (len(header) - 5))
            continue
        rows.append([title, r["regime"], r["k"], r["arm"], stat_text(r["fg_iou"]), stat_text(r["fg_dice"]),
                     stat_text(r["bg_iou"]), stat_text(r["boundary_f1"]), f"{r['labelled_fraction']:.1%}",
                     stat_text(r["finetune_s"], 0), stat_text(r["inference_s"], 0)]
                    + ([round_text(r.get("rounds") or [])] if with_rounds else []))
    lines = [text_table(header, rows)]
    errors = [f"- {r['task']} {r['regime']} k={r['k']} {r['arm']}: {r['error']}" for r in results["summary"]
              if r["error"]]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else []))


# ----------------------------------------------------------------------------------------------- CLI

def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(prog: str | None = None, results_file: bool = True) -> argparse.ArgumentParser:
    """The benchmark's options; ``results_file``: with ``--out FILE.json``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"folder with vnc/ and isbi2012/ (default: ${P.DATA_ENV})")
    p.add_argument("--work-dir", type=Path, default=Path("runs/em_segmentation"),
                   help="where models, packages and results.json go")
    if results_file:
        p.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                       help="where the results go as JSON (default: WORK_DIR/results.json)")
    p.add_argument("--tasks", default="vnc_mito", help=f"comma list of {', '.join(P.TASKS)}, or 'all'")
    p.add_argument("--k", default="1,4", help="labelled slices, comma list of integers and/or 'all'")
    p.add_argument("--regimes", default="sparse", help="comma list of dense, sparse")
    p.add_argument("--seeds", default="0", help="comma list of seeds (e.g. 0,1,2)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma list of arms from {', '.join(ARMS)}")
    p.add_argument("--size", default="tiny", choices=list(UNET_SIZE), help="model size")
    add_budget_options(p)
    p.add_argument("--tolerance", type=float, default=P.BOUNDARY_TOLERANCE, help="boundary F1 tolerance (px)")
    p.add_argument("--affmae-option", action="append", default=[], metavar="KEY=VALUE",
                   help="AFFMAEConfig field, or mask_ratio / mask_type, for both AFFMAE arms, repeatable: e.g. "
                   "mask_ratio=0.75, keep_rate=0.6, norm_pix_loss=false, seg_head=patch")
    p.add_argument("--pseudo-label-confidence", type=float, default=PSEUDO_LABEL_CONFIDENCE,
                   help="class probability from which the live preview's pixels become labels of the *_taught arms")
    p.add_argument("--rounds", type=int, default=0,
                   help=f"correction rounds after the strokes: predict the labelled slices, paint about "
                   f"{100 * P.CORRECTION_FRACTION:.2f}%% of each where it is most wrong, train on (networks go on "
                   "from where they stopped)")
    p.add_argument("--round-steps", type=int, default=50, help="fine-tuning steps of each correction round")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["mask_ratio=0.75", "refine=false"]`` -> ``{"mask_ratio": 0.75, "refine": False}`` (JSON values, else text)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--affmae-option takes KEY=VALUE (e.g. mask_ratio=0.75); got {item!r}")
        try:
            options[key.strip()] = json.loads(text.strip().lower() if text.strip().lower() in ("true", "false")
                                              else text.strip())
        except json.JSONDecodeError:
            options[key.strip()] = text.strip()
    return options


def config_from_args(args: argparse.Namespace, fallback_data_dir: Path | None = None) -> EMBenchConfig:
    """The run ``args`` ask for; data from ``--data-dir``, ``$AFFMAE_DATA`` or ``fallback_data_dir``."""
    tasks = list(P.TASKS) if args.tasks.strip() == "all" else _list(args.tasks)
    try:
        seeds = [int(s) for s in _list(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers; got {args.seeds!r}") from None
    config = EMBenchConfig(
        data_dir=P.resolve_data_dir(args.data_dir, fallback_data_dir), work_dir=args.work_dir, tasks=tasks,
        ks=[P.parse_k(k) for k in _list(args.k)], regimes=_list(args.regimes), seeds=seeds, arms=_list(args.arms),
        size=args.size, tolerance=args.tolerance, affmae_options=parse_options(args.affmae_option),
        pseudo_label_confidence=args.pseudo_label_confidence, rounds=args.rounds, round_steps=args.round_steps,
        **budget_from_args(args))
    config.validate()
    return config


def command_line(argv: Sequence[str] | None, prog: str) -> str:
    """The command as typed (``prog`` and the arguments), recorded in the results."""
    return " ".join([prog, *(sys.argv[1:] if argv is None else argv)])


def overlays_path(path: Path) -> Path:
    """Where the overlay arrays of the results at ``path`` (``results.json``) go: ``results.overlays.npz``."""
    path = Path(path)
    return path.with_name(path.stem + ".overlays.npz")


def save_results(results: dict[str, Any], path: Path, command: str) -> Path:
    """Write ``results`` and ``command`` as JSON to ``path``, the overlay arrays (one slice per task: raw, truth,
    each arm's prediction) beside it (`overlays_path`)."""
    raw = {k: v for k, v in results.items() if k != "overlays"} | {"command": command}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    arrays = {}
    for task, item in results.get("overlays", {}).items():
        arrays[f"{task}/slice"] = np.asarray(item["slice"])
        arrays[f"{task}/raw"], arrays[f"{task}/truth"] = np.asarray(item["raw"]), np.asarray(item["truth"])
        arrays.update({f"{task}/pred/{arm}": np.asarray(pred) for arm, pred in item["pred"].items()})
    if arrays:
        np.savez_compressed(overlays_path(path), **arrays)
    return path


def read_overlays(path: Path) -> dict[str, Any]:
    """The overlays `save_results` wrote beside the results at ``path`` ({} when there are none)."""
    npz = overlays_path(path)
    if not npz.exists():
        return {}
    overlays: dict[str, Any] = {}
    with np.load(npz) as data:
        for key in data.files:
            task, name, *arm = key.split("/")
            item = overlays.setdefault(task, {"pred": {}})
            if arm:
                item["pred"][arm[0]] = data[key]
            else:
                item[name] = int(data[key]) if name == "slice" else data[key]
    return overlays


def exit_code(results: dict[str, Any]) -> int:
    """1 when every run failed, else 0."""
    failed = [r for r in results["runs"] if r["error"]]
    return 1 if failed and len(failed) == len(results["runs"]) else 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``affmae bench segmentation``: run the benchmark, print the scores, write the results as JSON."""
    args = build_parser(prog).parse_args(argv)
    if not args.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if refuse_markdown_out(args.out):
        return 2
    try:
        config = config_from_args(args)
        results = run_benchmark(config)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    path = save_results(results, args.out or config.work_dir / "results.json",
                        command_line(argv, prog or "affmae bench segmentation"))
    sys.stdout.write(format_table(results) + "\n")
    sys.stderr.write(f"wrote {path}\n")
    return exit_code(results)


def read_results(path: Path) -> dict[str, Any]:
    """A ``results.json`` written by this benchmark; ValueError naming the file if it is not one."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not UTF-8 text or not JSON
        raise ValueError(f"cannot read {path} as a results.json: {err}") from None
    if not isinstance(results, dict) or not {"config", "runs", "summary", "environment", "pretraining"} <= set(results):
        raise ValueError(f"{path} is not a results.json of this benchmark")
    overlays = read_overlays(path)
    return {**results, "overlays": overlays} if overlays else results
