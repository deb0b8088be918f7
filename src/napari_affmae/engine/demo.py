"""The end-to-end demo on synthetic EM: pretrain, fine-tune on sparse strokes, segment, score, save.

1. draw a synthetic EM stack with dense ground truth (`napari_affmae.data.synthetic_em`);
2. pretrain AFFMAE-tiny on the stack (self-supervised);
3. paint sparse strokes from the ground truth on two slices and fine-tune on them;
4. segment every slice; score per-class IoU / Dice on the slices that had no strokes;
5. write an OME-Zarr (image + ``labels/affmae``, ``labels/ground_truth``, ``labels/strokes``),
   a PNG figure and ``metrics.json``.

Defaults are small so the whole run takes a few minutes on two CPU cores.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import CLASS_NAMES, sparse_strokes, synthetic_em
from .finetune import FinetuneConfig, confusion, finetune, scores_from_confusion
from .pretrain import PretrainConfig, pretrain
from .progress import CancelToken, ProgressCallback
from .segment import SegmentConfig, segment
from .training import prepare_output_dir


@dataclass
class DemoConfig:
    out: str | Path = "demo_out"
    shape: tuple[int, int, int] = (8, 192, 192)  # Z, Y, X of the synthetic stack
    labelled_slices: tuple[int, int] = (1, 5)
    stroke_fraction: float = 0.03
    #: The synthetic sample's pretraining loss reaches the flat-patch line within a few dozen steps, so the demo
    #: spends its time on fine-tuning: 150 + 250 steps at lr 1e-3 gave mitochondria IoU 0.33 (0.51 without layer
    #: decay), 50 + 300 steps at 2e-3 give 0.65 in about the same time (docs/few-strokes.md).
    pretrain_steps: int = 50
    finetune_steps: int = 300
    finetune_lr: float = 2e-3
    crop_size: tuple[int, int] = (64, 64)
    batch_size: int = 8
    tile_size: tuple[int, int] = (96, 96)
    seed: int = 0
    device: str = "auto"


@dataclass
class DemoResult:
    out: Path
    zarr_path: Path
    figure_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def run_demo(config: DemoConfig | None = None, progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None) -> DemoResult:
    """Run the demo; see the module docstring. Returns paths and metrics."""
    from ..io import write_labels, write_ome_zarr_image  # noqa: PLC0415

    config = config or DemoConfig()
    started = time.perf_counter()
    out = prepare_output_dir(config.out)
    image, truth = synthetic_em(config.shape, seed=config.seed)  # uint8 [Z, Y, X] each
    strokes = sparse_strokes(truth, fraction=config.stroke_fraction, seed=config.seed,
                             slices=list(config.labelled_slices))
    pre = pretrain(image, PretrainConfig(crop_size=config.crop_size, batch_size=config.batch_size,
                                         steps=config.pretrain_steps, lr=1e-3, warmup_steps=15, seed=config.seed,
                                         device=config.device, output_dir=out / "pretrain",
                                         checkpoint_every=max(config.pretrain_steps, 1),
                                         overwrite=True),  # the demo regenerates everything it writes
                   progress=progress, cancel=cancel)
    fine = finetune(image, strokes, FinetuneConfig(
        pretrained=pre.package_path, class_names=list(CLASS_NAMES), crop_size=config.crop_size,
        batch_size=config.batch_size, steps=config.finetune_steps, lr=config.finetune_lr, warmup_steps=15,
        seed=config.seed, device=config.device, output_dir=out / "finetune",
        checkpoint_every=max(config.finetune_steps, 1), overwrite=True),
        progress=progress, cancel=cancel)
    predicted = segment(fine.package_path, image, SegmentConfig(tile_size=config.tile_size, device=config.device),
                        progress=progress, cancel=cancel)
    held_out = [z for z in range(config.shape[0]) if z not in config.labelled_slices]
    conf = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), np.int64)
    for z in held_out:
        conf += confusion(predicted[z].astype(np.int64) - 1, truth[z].astype(np.int64) - 1, len(CLASS_NAMES))
    scores = scores_from_confusion(conf, list(CLASS_NAMES))
    metrics = {"held_out_slices": held_out, "labelled_slices": list(config.labelled_slices),
               "painted_pixels": int((strokes > 0).sum()), "pretrain_final_loss": pre.final_loss,
               "finetune_final_loss": fine.final_loss, **scores}

    zarr_path = out / "synthetic_em.ome.zarr"
    write_ome_zarr_image(zarr_path, image, axes="zyx", pixel_size={"z": 50.0, "y": 5.0, "x": 5.0}, overwrite=True)
    for name, labels in (("affmae", predicted), ("ground_truth", truth), ("strokes", strokes)):
        write_labels(zarr_path, name, labels, class_names=list(CLASS_NAMES), overwrite=True,
                     provenance={"job": "demo", "seed": config.seed})
    figure_path = out / "demo.png"
    save_figure(figure_path, image, truth, strokes, predicted, config.labelled_slices[0], held_out[len(held_out) // 2],
                scores)
    metrics["seconds"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return DemoResult(out, zarr_path, figure_path, metrics, metrics["seconds"])


_COLORS = np.array([[0, 0, 0, 0], [255, 200, 0, 255], [0, 200, 255, 255], [200, 60, 255, 255]], np.float32) / 255


def _overlay(ax, image: np.ndarray, labels: np.ndarray | None, title: str, alpha: float = 0.45) -> None:
    ax.imshow(image, cmap="gray", interpolation="nearest")
    if labels is not None:
        rgba = _COLORS[np.clip(labels, 0, len(_COLORS) - 1)].copy()
        rgba[..., 3] *= alpha if alpha < 1 else 1.0
        ax.imshow(rgba, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def save_figure(path: Path, image: np.ndarray, truth: np.ndarray, strokes: np.ndarray, predicted: np.ndarray,
                train_z: int, test_z: int, scores: dict[str, Any]) -> Path:
    """Four panels: strokes on a training slice, and image / truth / prediction on a held-out slice."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (no pyplot: no GUI backend needed)
    from matplotlib.patches import Patch  # noqa: PLC0415

    fig = Figure(figsize=(13, 3.8), dpi=110)
    axes = fig.subplots(1, 4)
    _overlay(axes[0], image[train_z], strokes[train_z], f"painted strokes (slice {train_z})", alpha=1.0)
    _overlay(axes[1], image[test_z], None, f"held-out slice {test_z}")
    _overlay(axes[2], image[test_z], truth[test_z], "ground truth")
    iou = ", ".join(f"{k} {v:.2f}" for k, v in scores["iou"].items() if v is not None)
    _overlay(axes[3], image[test_z], predicted[test_z], "AFFMAE prediction")
    fig.suptitle(f"IoU on the held-out slices: {iou}", fontsize=10)  # the whole width: never cut off
    fig.legend(handles=[Patch(color=_COLORS[i + 1], label=name) for i, name in enumerate(CLASS_NAMES)],
               loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path)
    return path
