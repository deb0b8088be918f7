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
* ``threshold``          no network: smoothed grey-value cut fitted on the painted pixels (the floor a
  network must beat to have learned more than brightness);
* ``rf_filters``         no network: ilastik's pixel classifier rebuilt — 20 multiscale filter features
  (`data.features.filter_features`) and a 100-tree random forest on the painted pixels, the tool a
  lab already has (the Live preview without encoder features, `engine.live`).

One pretraining per (task, family, seed) is shared by every k and label regime. The default
setting (VNC mitochondria, k = 1 and 4, sparse labels, one seed, tiny models) is sized for 2 CPU
cores; ``--tasks all --k 1,2,4,all --regimes sparse,dense --seeds 0,1,2 --size small`` is the full
grid for a GPU. Writes a Markdown page (table, IoU-vs-labelled-slices plot, overlay PNG) and the
raw results as JSON in the work directory.
"""
from __future__ import annotations

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

from . import em_protocol as P

log = logging.getLogger(__name__)

ARMS: dict[str, tuple[str, bool]] = {  # arm -> (model family, pretrained?)
    "affmae_pretrained": ("affmae", True),
    "affmae_scratch": ("affmae", False),
    "vit_mae_pretrained": ("vit_mae", True),
    "unet_scratch": ("unet", False),
    "threshold": ("threshold", False),  # no network: smoothed grey-value cut fitted on the painted pixels
    "rf_filters": ("rf_filters", False),  # no network: ilastik-style filter features + random forest
}
NO_NETWORK = ("threshold", "rf_filters")  # arms without a trained network
UNET_SIZE = {"tiny": "tiny", "small": "small", "base": "small"}
# masking per family, as each was published for EM / natural images (DESIGN.md sections 3 and 5)
TIE_IOU = 0.01  # IoU differences at or below this count as ties in the verdict
MASKING = {"affmae": {"mask_ratio": 0.5, "mask_type": "blob"}, "vit_mae": {"mask_ratio": 0.75, "mask_type": "random"}}
ABLATION_PAGE = "results-ablations.md"  # written by `bench.em_ablation` next to the results page
PRETRAIN_FIELDS = ("mask_ratio", "mask_type", "keep_rate")  # set through PretrainConfig, not model_options
PRETRAINING_ONLY = ("mask_ratio", "mask_type", "norm_pix_loss", "loss_weights")  # no effect on segmentation


def masking_for(family: str, affmae_options: dict[str, Any]) -> dict[str, Any]:
    """`MASKING` of ``family``, with the AFFMAE options that are `PretrainConfig` fields applied."""
    masking = dict(MASKING[family])
    if family == "affmae":
        masking.update({k: v for k, v in affmae_options.items() if k in PRETRAIN_FIELDS})
    return masking


def pretrain_dir(work_dir: Path, task: str, family: str, seed: int) -> Path:
    """Where the benchmark pretrains ``family`` for ``task`` and ``seed`` (the package is inside)."""
    return Path(work_dir) / task / f"pretrain_{family}_s{seed}"


@dataclass
class EMBenchConfig:
    """One benchmark run. Sizes in pixels; steps are optimiser steps."""

    data_dir: Path
    work_dir: Path = Path("runs/em_segmentation")
    tasks: list[str] = field(default_factory=lambda: ["vnc_mito"])
    ks: list[int | str] = field(default_factory=lambda: [1, 4])
    regimes: list[str] = field(default_factory=lambda: ["sparse"])
    seeds: list[int] = field(default_factory=lambda: [0])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    size: str = "tiny"
    pretrain_steps: int = 300
    finetune_steps: int = 200
    batch_size: int = 8
    crop: int = 128
    tile: int = 256
    max_eval_slices: int | None = None  # evenly spaced subset of the evaluation slices (None = all)
    tolerance: float = P.BOUNDARY_TOLERANCE
    device: str = "auto"
    threads: int | None = None
    affmae_options: dict[str, Any] = field(default_factory=dict)  # AFFMAEConfig fields for both AFFMAE arms

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
        if min(self.pretrain_steps, self.finetune_steps, self.batch_size) < 1:
            raise ValueError("pretrain-steps, finetune-steps and batch-size must be >= 1")
        if self.crop % 8 or self.crop < 32 or self.tile % 8 or self.tile < 32:
            raise ValueError(f"crop and tile must be multiples of 8 and >= 32 px; got {self.crop}, {self.tile}")
        if not (self.tasks and self.ks and self.regimes and self.seeds and self.arms):
            raise ValueError("tasks, k, regimes, seeds and arms must each name at least one value")
        from ..models.affmae import AFFMAEConfig  # noqa: PLC0415

        known = {f.name for f in dataclasses.fields(AFFMAEConfig)}
        unknown = sorted(set(self.affmae_options) - known)
        if unknown:
            raise ValueError(f"unknown AFFMAE option(s) {unknown}; choose from {', '.join(sorted(known))}")
        AFFMAEConfig(**self.affmae_options)  # bad values raise here, before any training
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


def _finetune_and_score(config: EMBenchConfig, record: RunRecord, raw: np.ndarray, truth: np.ndarray,
                        labels: np.ndarray, pretrained: Any, eval_slices: list[int], device: str,
                        keep_slice: int | None) -> np.ndarray | None:
    from ..engine import FinetuneConfig, SegmentConfig, finetune, segment  # noqa: PLC0415

    out = config.work_dir / record.task / f"{record.arm}_{record.regime}_k{record.k}_s{record.seed}"
    if out.exists():
        shutil.rmtree(out)
    task = P.TASKS[record.task]
    if record.arm == "threshold":
        return _threshold_and_score(config, record, raw, truth, labels, eval_slices, keep_slice)
    if record.arm == "rf_filters":
        return _forest_and_score(config, record, raw, truth, labels, eval_slices, keep_slice)
    started = time.perf_counter()
    result = finetune(raw, labels, FinetuneConfig(
        pretrained=pretrained, model=record.model, class_names=list(task.class_names), label_mode="sparse",
        model_options=config.segmentation_options(ARMS[record.arm][0]),
        crop_size=(config.crop, config.crop), batch_size=config.batch_size, steps=config.finetune_steps,
        warmup_steps=min(20, config.finetune_steps // 10), seed=record.seed, device=device, output_dir=out,
        checkpoint_every=config.finetune_steps, log_every=max(1, config.finetune_steps // 5),
        tile_size=(config.tile, config.tile)), progress=_log_progress)
    record.finetune_s = time.perf_counter() - started
    started = time.perf_counter()
    pred = segment(result.package_path, raw, SegmentConfig(tile_size=(config.tile, config.tile), device=device,
                                                           slices=eval_slices, batch_size=4))
    record.inference_s = time.perf_counter() - started
    pred_fg = (np.asarray(pred) == P.FOREGROUND).astype(np.uint8)  # [Z, Y, X], 1 = structure
    record.scores = P.evaluate_stack(pred_fg, truth, task, eval_slices, config.tolerance)
    return None if keep_slice is None else pred_fg[keep_slice]


def _threshold_and_score(config: EMBenchConfig, record: RunRecord, raw: np.ndarray, truth: np.ndarray,
                         labels: np.ndarray, eval_slices: list[int], keep_slice: int | None) -> np.ndarray | None:
    started = time.perf_counter()
    cut = P.fit_threshold(raw, labels)
    record.finetune_s = time.perf_counter() - started
    log.info("  threshold: %s than %.1f after smoothing (sigma %.1f px)",
             "darker" if cut.dark_foreground else "brighter", cut.threshold, cut.sigma)
    started = time.perf_counter()
    pred_fg = np.zeros(raw.shape, np.uint8)  # [Z, Y, X], 1 = structure; only the scored slices are filled
    pred_fg[eval_slices] = cut.predict(raw[eval_slices])
    record.inference_s = time.perf_counter() - started
    record.scores = P.evaluate_stack(pred_fg, truth, P.TASKS[record.task], eval_slices, config.tolerance)
    return None if keep_slice is None else pred_fg[keep_slice]


def _forest_and_score(config: EMBenchConfig, record: RunRecord, raw: np.ndarray, truth: np.ndarray,
                      labels: np.ndarray, eval_slices: list[int], keep_slice: int | None) -> np.ndarray | None:
    from ..engine.live import LiveConfig, LivePreview  # noqa: PLC0415

    started = time.perf_counter()
    forest = LivePreview(raw, LiveConfig(package=None, seed=record.seed))
    forest.fit(labels)
    record.finetune_s = time.perf_counter() - started
    started = time.perf_counter()
    pred_fg = np.zeros(raw.shape, np.uint8)  # [Z, Y, X], 1 = structure; only the scored slices are filled
    for z in eval_slices:
        pred_fg[z] = forest.predict(z)[0] == P.FOREGROUND
        forest.forget(z)
    record.inference_s = time.perf_counter() - started
    record.scores = P.evaluate_stack(pred_fg, truth, P.TASKS[record.task], eval_slices, config.tolerance)
    return None if keep_slice is None else pred_fg[keep_slice]


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
                            pred = _finetune_and_score(config, record, raw, truth, labels,
                                                       packages.get(family) if pretrained else None, eval_slices,
                                                       device, show_slice if first else None)
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
        })
    return rows


# ----------------------------------------------------------------------------------------------- report

def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_iou_vs_k(results: dict[str, Any], path: Path) -> None:
    """Foreground IoU (mean ± std over seeds) vs number of labelled slices, one panel per task x regime."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = results["summary"]
    panels = sorted({(r["task"], r["regime"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, regime) in zip(axes[0], panels):
        for arm in ARMS:
            pts = sorted((r["n_labelled"], r["fg_iou"]["mean"], r["fg_iou"]["std"] or 0.0) for r in rows
                         if r["task"] == task and r["regime"] == regime and r["arm"] == arm
                         and r["fg_iou"]["mean"] is not None)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=arm)
        ax.set_title(f"{P.TASKS[task].title}, {regime} labels", fontsize=9)
        ax.set_xlabel("labelled slices k")
        ax.set_ylabel("foreground IoU (held-out slices)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def plot_overlays(results: dict[str, Any], path: Path, crop: int = 384) -> None:
    """Per task: raw slice with truth contour, then each arm's prediction (red) over the raw slice."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from matplotlib.colors import ListedColormap  # noqa: PLC0415

    red = ListedColormap(["red"])
    tasks = [t for t in results["overlays"] if results["overlays"][t]["pred"]]
    if not tasks:
        return
    arms = [a for a in ARMS if a in results["config"]["arms"]]
    cols = 1 + len(arms)
    fig, axes = plt.subplots(len(tasks), cols, figsize=(2.6 * cols, 2.8 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        item = results["overlays"][task]
        raw, truth = np.asarray(item["raw"]), np.asarray(item["truth"])
        y0, x0 = max(0, (raw.shape[0] - crop) // 2), max(0, (raw.shape[1] - crop) // 2)
        view = (slice(y0, y0 + crop), slice(x0, x0 + crop))
        panels = [("truth", truth)] + [(arm, item["pred"].get(arm)) for arm in arms]
        for ax, (name, mask) in zip(row, panels):
            ax.imshow(raw[view], cmap="gray")
            if mask is not None:
                ax.imshow(np.ma.masked_equal(np.asarray(mask)[view], 0), cmap=red, alpha=0.45, vmin=0, vmax=1)
                ax.contour(truth[view], levels=[0.5], colors="cyan", linewidths=0.5)
            title = f"{P.TASKS[task].title} z={item['slice']}" if name == "truth" else name
            ax.set_title(title if mask is not None else f"{name} (no result)", fontsize=7)
            ax.axis("off")
    save_figure(fig, path)


def verdict(results: dict[str, Any]) -> str:
    """Plain statement: does AFFMAE pretraining beat AFFMAE from scratch with 1-2 labelled slices?"""
    rows = {(r["task"], r["regime"], r["k"], r["arm"]): r for r in results["summary"]}
    wins, total, lines = 0, 0, []
    for (task, regime, k, arm), row in sorted(rows.items()):
        if arm != "affmae_pretrained" or row["n_labelled"] > 2:
            continue
        other = rows.get((task, regime, k, "affmae_scratch"))
        if other is None or row["fg_iou"]["mean"] is None or other["fg_iou"]["mean"] is None:
            continue
        total += 1
        delta = row["fg_iou"]["mean"] - other["fg_iou"]["mean"]
        wins += delta > TIE_IOU
        lines.append(f"{P.TASKS[task].title}, {regime}, k={k}: {delta:+.3f} IoU")
    if total == 0:
        return "No 1-2-slice comparison of AFFMAE pretrained vs from scratch was run." + _threshold_verdict(rows)
    head = (f"AFFMAE pretraining beat AFFMAE from scratch by more than {TIE_IOU} foreground IoU in {wins} of "
            f"{total} settings with 1-2 labelled slices" if wins else
            f"AFFMAE pretraining did **not** beat AFFMAE from scratch by more than {TIE_IOU} foreground IoU "
            "with 1-2 labelled slices in this run")
    seeds = len(results["config"]["seeds"])
    tail = "" if seeds > 1 else " One seed only: differences of a few hundredths are within seed-to-seed noise."
    return head + " (" + "; ".join(lines) + ")." + tail + _threshold_verdict(rows)


def _threshold_verdict(rows: dict[tuple, dict[str, Any]]) -> str:
    """Which networks did not beat the grey-value threshold, and which did not beat the forest."""
    return (_behind_verdict(rows, "threshold", "Networks that did not beat a smoothed grey-value threshold by more "
                            f"than {TIE_IOU} IoU, i.e. learned no more than brightness")
            + _behind_verdict(rows, "rf_filters", "Networks that did not beat the ilastik-style random forest "
                              f"(rf_filters) by more than {TIE_IOU} IoU"))


def _behind_verdict(rows: dict[tuple, dict[str, Any]], anchor: str, text: str) -> str:
    """``text`` + the networks at or below the ``anchor`` arm (+ TIE_IOU) in each setting where it ran."""
    parts = []
    for (task, regime, k, arm), row in sorted(rows.items()):
        cut = row["fg_iou"]["mean"]
        if arm != anchor or cut is None:
            continue
        behind = [a for a in ARMS if a not in NO_NETWORK and (task, regime, k, a) in rows
                  and rows[(task, regime, k, a)]["fg_iou"]["mean"] is not None
                  and rows[(task, regime, k, a)]["fg_iou"]["mean"] <= cut + TIE_IOU]
        if behind:
            parts.append(f"{P.TASKS[task].title}, {regime}, k={k} ({anchor} {cut:.3f}): {', '.join(behind)}")
    return f" {text}: " + "; ".join(parts) + "." if parts else ""


def _masking_text(cfg: dict[str, Any], family: str) -> str:
    masking = masking_for(family, cfg.get("affmae_options", {}))
    text = f"{masking['mask_type']} masks {masking['mask_ratio']:.0%}"
    return text + (f", keep rate {masking['keep_rate']}" if "keep_rate" in masking else "")


def render_page(results: dict[str, Any], images: dict[str, str], command: str) -> str:
    cfg, env = results["config"], results["environment"]
    lines = [
        "# Real-EM evaluation: few labels, pretrained vs from scratch", "",
        "Written by `python benchmarks/em_segmentation.py` (`napari_affmae.bench.em_segmentation`); "
        "protocol in `napari_affmae.bench.em_protocol`.", "",
        ("Commands (one page from several runs): " if " + " in command else "Command: ")
        + " + ".join(f"`{c}`" for c in command.split(" + ")), "",
        f"Machine: {env['machine']} ({env['platform']}, {env['processor']}, {env['cpu_count']} CPU cores, "
        f"{env['torch_threads']} torch threads); device: **{env['device']}**"
        + (f" ({env['gpu']})" if env.get("gpu") else "") + f"; torch {env['torch']}. "
        f"Total wall time {results['total_s'] / 60:.1f} min" + (" (sum of the runs)." if " + " in command else "."),
        "",
        f"Budget per arm: pretraining {cfg['pretrain_steps']} steps, fine-tuning {cfg['finetune_steps']} steps, "
        f"batch {cfg['batch_size']}, crops {cfg['crop']} x {cfg['crop']} px, tiled inference {cfg['tile']} px "
        f"tiles; size `{cfg['size']}`; seeds {cfg['seeds']}. Parameters (segmentation models): "
        + ", ".join(f"{n} {c / 1e6:.2f} M" for n, c in results["parameters"].items()) + ".", "",
        f"Arms: `affmae_pretrained` (AFFMAE pretrained on the stack itself + its unlabelled stack, "
        f"{_masking_text(cfg, 'affmae')}), `affmae_scratch`, `vit_mae_pretrained` (ViT-MAE, "
        f"{_masking_text(cfg, 'vit_mae')}, same images and steps), `unet_scratch` (plain U-Net). All fine-tuned "
        "with the same loop: cross-entropy + Dice on labelled pixels, AdamW, warm-up + cosine, "
        "flips/rot90/intensity augmentation. `threshold` (no network, where run): Gaussian smoothing "
        f"(sigma {P.THRESHOLD_SIGMA:g} px), then the grey-value cut that best separates the painted pixels "
        "(balanced accuracy) — what a network must beat to have learned more than brightness. `rf_filters` (no "
        "network, where run): ilastik's pixel classifier rebuilt — intensity, edge and Hessian-eigenvalue "
        "filters at 5 scales (1-16 px) and a 100-tree random forest fitted on the painted pixels."
        + (f" AFFMAE options: `{json.dumps(cfg['affmae_options'])}`." if cfg.get("affmae_options") else ""), "",
        "Labels: class 1 = background, class 2 = the structure; `dense` = every pixel of the k labelled "
        f"slices, `sparse` = simulated brush strokes of both classes inside their class (about "
        f"{P.SPARSE_FRACTION:.0%} of each labelled slice). Metrics on the held-out slices, pixels pooled: "
        f"foreground IoU and Dice, background IoU, boundary F1 for membranes (tolerance {cfg['tolerance']} px); "
        "mean ± sample std over seeds.", "",
        "## Slice splits", "",
    ]
    for task, s in results["splits"].items():
        labelled = "; ".join(f"k={k}: z {v}" for k, v in s["labelled"].items())
        lines.append(f"- **{P.TASKS[task].title}** (stack {s['shape']}): training pool z {s['pool']} "
                     f"(labelling order {s['label_order']}); {labelled}; evaluated on z {s['eval_slices']} "
                     f"(never labelled); pretraining images: {', '.join(s['pretrain_images'])}.")
    lines += ["", "## Results", "",
              "| task | labels | k | arm | fg IoU | fg Dice | bg IoU | boundary F1 | labelled px | fine-tune s "
              "| inference s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        if r["error"] and r["fg_iou"]["mean"] is None:
            lines.append(f"| {P.TASKS[r['task']].title} | {r['regime']} | {r['k']} | {r['arm']} | failed: "
                         f"{r['error']} | | | | | | |")
            continue
        lines.append(f"| {P.TASKS[r['task']].title} | {r['regime']} | {r['k']} | {r['arm']} | {_fmt(r['fg_iou'])} "
                     f"| {_fmt(r['fg_dice'])} | {_fmt(r['bg_iou'])} | {_fmt(r['boundary_f1'])} "
                     f"| {r['labelled_fraction']:.1%} | {_fmt(r['finetune_s'], 0)} | {_fmt(r['inference_s'], 0)} |")
    lines += ["", "Pretraining (shared by all k and label regimes of a task and seed):", "",
              "| task | seed | model | steps | first loss | final loss | s |", "|---|---|---|---|---|---|---|"]
    for p in results["pretraining"]:
        if "error" in p:
            lines.append(f"| {p['task']} | {p['seed']} | {p['model']} | failed: {p['error']} | | | |")
        else:
            lines.append(f"| {p['task']} | {p['seed']} | {p['model']} | {p['steps']} | {p['first_loss']:.4f} "
                         f"| {p['final_loss']:.4f} | {p['seconds']:.0f} |")
    lines += ["", "## Verdict", "", verdict(results), ""]
    if "ablations" in images:
        lines += [f"What we tried to make pretraining help (mask ratio, keep rate, target, steps, refinement head): "
                  f"[{images['ablations']}]({images['ablations']}).", ""]
    if "iou" in images:
        lines += [f"![foreground IoU vs labelled slices]({images['iou']})", ""]
    if "overlays" in images:
        lines += ["Example predictions on a held-out slice (red = predicted structure, cyan = true outline; "
                  "first seed, first label regime, smallest k):", "", f"![overlays]({images['overlays']})", ""]
    cites = sorted({P.TASKS[t].citation for t in results["splits"]})
    lines += ["## Data", ""] + [f"- {c}" for c in cites] + [""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path, command: str) -> Path:
    """Write the page ``out`` and its PNGs (``<out dir>/images/results_*.png``)."""
    out = Path(out)
    image_dir = out.parent / "images"
    images = {}
    iou_png = image_dir / "results_iou_vs_k.png"
    plot_iou_vs_k(results, iou_png)
    images["iou"] = f"images/{iou_png.name}"
    overlay_png = image_dir / "results_overlays.png"
    if "overlays" in results:  # re-rendered pages (``--render-only``) keep the PNG of the run
        plot_overlays(results, overlay_png)
    if overlay_png.exists():
        images["overlays"] = f"images/{overlay_png.name}"
    if (out.parent / ABLATION_PAGE).exists():
        images["ablations"] = ABLATION_PAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(results, images, command), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------- CLI

def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"folder with vnc/ and isbi2012/ (default ${P.DATA_ENV} or <repo>/../shared/data)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/em_segmentation"),
                   help="where models, packages and results.json go")
    p.add_argument("--out", type=Path, default=Path("docs/results.md"), help="Markdown page to write")
    p.add_argument("--tasks", default="vnc_mito", help=f"comma list of {', '.join(P.TASKS)}, or 'all'")
    p.add_argument("--k", default="1,4", help="labelled slices, comma list of integers and/or 'all'")
    p.add_argument("--regimes", default="sparse", help="comma list of dense, sparse")
    p.add_argument("--seeds", default="0", help="comma list of seeds (e.g. 0,1,2)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of arms")
    p.add_argument("--size", default="tiny", choices=list(UNET_SIZE), help="model size")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=128, help="training crop side (px)")
    p.add_argument("--tile", type=int, default=256, help="inference tile side (px)")
    p.add_argument("--max-eval-slices", type=int, default=None, help="score an evenly spaced subset of the "
                   "evaluation slices (default: all)")
    p.add_argument("--tolerance", type=float, default=P.BOUNDARY_TOLERANCE, help="boundary F1 tolerance (px)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--affmae-option", action="append", default=[], metavar="KEY=VALUE",
                   help="AFFMAEConfig field for both AFFMAE arms, repeatable: e.g. mask_ratio=0.75, keep_rate=0.6, "
                   "norm_pix_loss=false, refine=false")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--render-only", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                   help="run nothing: write the page again from the results.json of earlier runs (their commands "
                   "and the overlay PNG are kept); several runs of the same setting and budget that ran different "
                   "arms (e.g. on different machines) are merged into one page")
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


def config_from_args(args: argparse.Namespace) -> EMBenchConfig:
    tasks = list(P.TASKS) if args.tasks.strip() == "all" else _list(args.tasks)
    try:
        seeds = [int(s) for s in _list(args.seeds)]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers; got {args.seeds!r}") from None
    data_dir = args.data_dir if args.data_dir is not None else P.default_data_dir()
    config = EMBenchConfig(
        data_dir=Path(data_dir), work_dir=args.work_dir, tasks=tasks, ks=[P.parse_k(k) for k in _list(args.k)],
        regimes=_list(args.regimes), seeds=seeds, arms=_list(args.arms), size=args.size,
        pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps, batch_size=args.batch_size,
        crop=args.crop, tile=args.tile, max_eval_slices=args.max_eval_slices, tolerance=args.tolerance,
        device=args.device, threads=args.threads, affmae_options=parse_options(args.affmae_option))
    config.validate()
    return config


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``python benchmarks/em_segmentation.py``: run the benchmark, write the page and results.json."""
    args = build_parser(prog).parse_args(argv)
    if not args.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.render_only is not None:
        return _render_only(args.render_only, args.out)
    try:
        config = config_from_args(args)
        results = run_benchmark(config)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    shown = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([prog or "python benchmarks/em_segmentation.py", *shown])
    page = write_report(results, args.out, command)
    raw = {k: v for k, v in results.items() if k != "overlays"} | {"command": command}
    (config.work_dir / "results.json").write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    sys.stderr.write(f"wrote {page} and {config.work_dir / 'results.json'}\n")
    failed = [r for r in results["runs"] if r["error"]]
    return 1 if failed and len(failed) == len(results["runs"]) else 0


def _render_only(paths: Sequence[Path], out: Path) -> int:
    try:
        results = merge_results([read_results(p) for p in paths], [str(p) for p in paths])
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stderr.write(f"wrote {write_report(results, out, results['command'])}\n")
    return 0


def read_results(path: Path) -> dict[str, Any]:
    """A ``results.json`` written by this benchmark; ValueError naming the file if it is not one."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not UTF-8 text or not JSON
        raise ValueError(f"cannot read {path} as a results.json: {err}") from None
    if not isinstance(results, dict) or not {"config", "runs", "summary", "environment", "pretraining"} <= set(results):
        raise ValueError(f"{path} is not a results.json of this benchmark")
    return results


# config fields that may differ between runs merged into one page
MERGEABLE = ("arms", "work_dir", "threads")


def merge_results(parts: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One results dict from runs of the same setting and budget that ran different arms."""
    first = parts[0]
    if len(parts) == 1:
        return {**first, "command": first.get("command", "python benchmarks/em_segmentation.py")}
    same = {k: v for k, v in first["config"].items() if k not in MERGEABLE}
    for part, name in zip(parts[1:], names[1:]):
        differ = sorted(k for k in set(same) | set(part["config"]) - set(MERGEABLE)
                        if part["config"].get(k) != same.get(k))
        if part["environment"].get("device") != first["environment"].get("device"):
            differ.append("device")
        if differ:
            raise ValueError(f"{name} differs from {names[0]} in {differ}: only runs of the same setting and "
                             "budget can share a page")
    seen = set()
    for part, name in zip(parts, names):
        for r in part["runs"]:
            key = (r["task"], r["regime"], str(r["k"]), r["seed"], r["arm"])
            if key in seen:
                raise ValueError(f"{name} repeats the run {key}; merge runs of different arms only")
            seen.add(key)
    cfg = first["config"]
    order = {"task": list(cfg["tasks"]), "regime": list(cfg["regimes"]), "k": [str(k) for k in cfg["ks"]],
             "arm": list(ARMS)}
    runs = sorted((r for part in parts for r in part["runs"]),  # the order a single run would have
                  key=lambda r: (order["task"].index(r["task"]), r["seed"], order["regime"].index(r["regime"]),
                                 order["k"].index(str(r["k"])), order["arm"].index(r["arm"])))
    arms = [a for a in ARMS if any(a in part["config"]["arms"] for part in parts)]
    records = [RunRecord(**r) for r in runs]
    return {
        **first, "config": {**first["config"], "arms": arms}, "runs": runs, "summary": summarise_runs(records),
        "pretraining": [p for part in parts for p in part["pretraining"]],
        "parameters": {k: v for part in parts for k, v in part.get("parameters", {}).items()},
        "total_s": sum(part["total_s"] for part in parts),
        "command": " + ".join(part.get("command", "python benchmarks/em_segmentation.py") for part in parts),
    }
