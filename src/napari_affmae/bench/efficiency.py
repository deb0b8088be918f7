"""Efficiency benchmark: AFFMAE against ViT-MAE, UM-MAE and GreenMIM at matched size.

For every family and resolution, measured side by side in one run (resolutions in increasing
order, families interleaved so machine noise hits all of them alike):

* parameters of the pretraining (MAE) model and of the segmentation model;
* FLOPs of one pretraining step (forward + loss + backward) and of one segmentation forward
  (`flops.count_flops`: counter + analytic formulas, convention in that module);
* milliseconds per training step (forward + loss + backward; the mask is drawn beforehand, as
  the data pipeline does, and no optimiser step is taken) and per segmentation forward
  (inference mode), median of ``repeats`` runs after one warm-up run;
* peak memory added by one training step / one inference (`memory.measure_peak`).

Ratios are "ViT-MAE / family": above 1 means the family is cheaper than ViT-MAE.

Run it as ``affmae bench efficiency``: it prints the tables (`format_table`) or, with ``--json``,
the raw results (`BenchResult.to_json`), and ``--out FILE`` keeps those results in a file;
``main(argv)`` returns the exit code.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..models.masking import MaskSpec
from ..models.registry import create_model, list_models
from .flops import FlopCount, count_flops, shape_only_neighborhood_ops
from .memory import cpu_method, measure_peak
from .tables import refuse_markdown_out, text_table

log = logging.getLogger(__name__)

#: The family every ratio is taken against.
REFERENCE = "vit_mae"
SIZES = ("tiny", "small", "base")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_RESOLUTIONS = (256, 512, 1024, 2048)


@dataclass(frozen=True)
class Family:
    """One benchmarked model family: registry prefix, config overrides, display label."""

    key: str
    prefix: str
    label: str
    overrides: tuple[tuple[str, object], ...] = ()
    #: False: on CPU only FLOPs are counted (the PyTorch reference runs both AFFMAE neighbourhood
    #: modes through the same gather, so CPU time says nothing about their difference).
    timed_on_cpu: bool = True
    #: True: a segmentation-only model (no pretraining); its training row is a supervised step.
    supervised: bool = False


FAMILIES = {
    "affmae": Family("affmae", "affmae", "AFFMAE"),
    "affmae_cluster": Family("affmae_cluster", "affmae", "AFFMAE (cluster nbhd)",
                             (("neighborhood", "cluster"),), timed_on_cpu=False),
    "vit_mae": Family("vit_mae", "vit_mae", "ViT-MAE"),
    "um_mae": Family("um_mae", "um_mae", "UM-MAE"),
    "greenmim": Family("greenmim", "greenmim", "GreenMIM"),
    "unet": Family("unet", "unet", "U-Net", supervised=True),
}
DEFAULT_FAMILIES = ("affmae", "affmae_cluster", "vit_mae", "um_mae", "greenmim", "unet")


@dataclass
class BenchConfig:
    """What to measure. ``max_step_seconds``: skip timing/memory of a run predicted slower."""

    families: tuple[str, ...] = DEFAULT_FAMILIES
    size: str = "tiny"
    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    device: str = "cpu"
    precision: str = "fp32"
    repeats: int = 3
    batch: int = 1
    num_classes: int = 2
    max_step_seconds: float = 120.0
    mask_ratio: float | None = None
    threads: int | None = None
    seed: int = 0
    flops_only: bool = False

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        self.resolutions = tuple(sorted(set(int(r) for r in self.resolutions)))
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; choose from "
                             f"{', '.join(FAMILIES)}")
        if not self.families:
            raise ValueError("give at least one family")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}; got {self.size!r}")
        missing = [f for f in self.families if f"{FAMILIES[f].prefix}_{self.size}" not in list_models()]
        if missing and self.families == DEFAULT_FAMILIES:  # the defaults: those that come in this size
            self.families = tuple(f for f in self.families if f not in missing)
        elif missing:
            raise ValueError(f"{', '.join(missing)} has no {self.size!r} size; leave it out or choose another --size")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}; got {self.precision!r}")
        bad = [r for r in self.resolutions if r < 64 or r % 64]
        if not self.resolutions or bad:
            raise ValueError(f"resolutions must be multiples of 64 px, at least 64 (GreenMIM masks 64-px units, "
                             f"UM-MAE needs multiples of 16); got {bad or 'none'}")
        if self.repeats < 1 or self.batch < 1:
            raise ValueError(f"repeats and batch must be >= 1; got {self.repeats}, {self.batch}")
        if self.max_step_seconds <= 0:
            raise ValueError(f"max_step_seconds must be positive; got {self.max_step_seconds}")
        if self.mask_ratio is not None and not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1); got {self.mask_ratio}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]'; got {self.device!r}")


@dataclass
class FamilyInfo:
    key: str
    label: str
    model: str
    params_mae: int
    params_seg: int
    mask_ratio: float | None  # configured ratio (UM-MAE: fixed 0.75 by uniform sampling)
    timed: bool


@dataclass
class Cell:
    """One family at one resolution (None = not measured; the reason is in ``notes``)."""

    family: str
    resolution: int
    masked_fraction: float | None = None
    flops_train: int | None = None
    flops_seg: int | None = None
    flops_train_by_op: dict[str, int] = field(default_factory=dict)
    flops_seg_by_op: dict[str, int] = field(default_factory=dict)
    ms_train: float | None = None
    ms_infer: float | None = None
    mem_train: int | None = None
    mem_infer: int | None = None
    #: AFFMAE on CPU: peak memory with shape-only neighbourhood ops (no [B, H, Nq, M, D] neighbour
    #: tensors), a lower bound for fused kernels; compared with ViT-MAE's mem_train / mem_infer.
    mem_train_fused_bound: int | None = None
    mem_infer_fused_bound: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    config: BenchConfig
    environment: dict
    families: list[FamilyInfo]
    cells: list[Cell]

    def cell(self, family: str, resolution: int) -> Cell | None:
        for c in self.cells:
            if c.family == family and c.resolution == resolution:
                return c
        return None

    def ratio(self, family: str, resolution: int, metric: str) -> float | None:
        """``metric`` of ViT-MAE divided by that of ``family`` (None when either is missing)."""
        ref, mine = self.cell(REFERENCE, resolution), self.cell(family, resolution)
        if ref is None or mine is None:
            return None
        a, b = getattr(ref, metric.replace("_fused_bound", "")), getattr(mine, metric)
        if a is None or b is None or b == 0:
            return None
        return a / b

    def to_json(self) -> dict:
        """Machine-readable results (what ``--json`` prints)."""
        metrics = ("flops_train", "flops_seg", "ms_train", "ms_infer", "mem_train", "mem_infer",
                   "mem_train_fused_bound", "mem_infer_fused_bound")
        cells = []
        for c in self.cells:
            row = dataclasses.asdict(c)
            row["ratio_to_reference"] = {m: self.ratio(c.family, c.resolution, m) for m in metrics}
            cells.append(row)
        return {
            "reference": REFERENCE,
            "ratio_definition": f"{REFERENCE} value / family value (above 1: cheaper than {REFERENCE})",
            "config": dataclasses.asdict(self.config),
            "environment": self.environment,
            "families": [dataclasses.asdict(f) for f in self.families],
            "cells": cells,
        }


def result_from_json(data: dict) -> BenchResult:
    """Inverse of `BenchResult.to_json` (re-render a page from saved ``--json`` output)."""
    try:
        config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()})
        families = [FamilyInfo(**f) for f in data["families"]]
        cell_fields = {f.name for f in dataclasses.fields(Cell)}
        cells = [Cell(**{k: v for k, v in c.items() if k in cell_fields}) for c in data["cells"]]
        return BenchResult(config, dict(data["environment"]), families, cells)
    except (KeyError, TypeError) as err:
        raise ValueError(f"not the JSON output of this benchmark ({err}); produce it with --json") from err


# ------------------------------------------------------------------------------------ helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower() \
        or isinstance(err, MemoryError)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model}"


def environment(config: BenchConfig) -> dict:
    device = torch.device(config.device)
    env = {
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "memory_method": cpu_method() if device.type == "cpu" else
        "torch.cuda.max_memory_allocated - memory_allocated before",
    }
    with contextlib.suppress(OSError, AttributeError):
        env["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return env


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _SupervisedStep(nn.Module):
    """A segmentation-only model (the U-Net) in the pretraining slot: its training step is a fine-tuning
    step, cross-entropy against all-background labels ``[B, H, W]`` (the cost does not depend on them)."""

    def __init__(self, seg: nn.Module) -> None:
        super().__init__()
        self.seg = seg

    def random_mask(self, batch: int, h: int, w: int, spec: MaskSpec | None = None, device=None,
                    generator=None) -> torch.Tensor:
        return torch.zeros(batch, h, w, dtype=torch.bool, device=device)  # nothing is masked

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.seg(x)  # [B, K, H, W]
        target = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long, device=x.device)
        return {"loss": nn.functional.cross_entropy(logits.float(), target)}


def _build(family: Family, config: BenchConfig, device: torch.device) -> tuple[nn.Module, nn.Module, FamilyInfo]:
    name = f"{family.prefix}_{config.size}"
    overrides = dict(family.overrides)
    timed = family.timed_on_cpu or device.type != "cpu"
    if family.supervised:
        seg = create_model(name, task="segmentation", num_classes=config.num_classes, **overrides)
        step = _SupervisedStep(create_model(name, task="segmentation", num_classes=config.num_classes, **overrides))
        info = FamilyInfo(family.key, family.label, name, _count(step), _count(seg), None, timed)
        return step.to(device), seg.to(device), info
    mae = create_model(name, task="mae", **overrides)
    seg = create_model(name, task="segmentation", num_classes=config.num_classes, **overrides)
    ratio = _mask_spec(mae, config.mask_ratio).ratio
    info = FamilyInfo(family.key, family.label, name, _count(mae), _count(seg), ratio, timed)
    return mae.to(device), seg.to(device), info


def _mask_spec(mae: nn.Module, ratio: float | None) -> MaskSpec | None:
    """The family's default masks, at ``ratio`` (``--mask-ratio``) where its ratio is free (not UM-MAE's);
    None for a model without masks (the U-Net)."""
    default = getattr(mae, "default_mask", None)
    if default is None or ratio is None or default.fixed_ratio:
        return default
    return default.replace(ratio=ratio)


class _Runner:
    """The measured calls of one family at one resolution."""

    def __init__(self, mae: nn.Module, seg: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                 device: torch.device, precision: str) -> None:
        self.mae, self.seg, self.x, self.mask = mae, seg, x, mask
        self.device, self.precision = device, precision

    def train_step(self) -> None:
        with _autocast(self.device, self.precision):
            out = self.mae(self.x, mask=self.mask)
        out["loss"].backward()

    def infer(self) -> None:
        with torch.inference_mode(), _autocast(self.device, self.precision):
            self.seg(self.x)

    def clear(self) -> None:
        self.mae.zero_grad(set_to_none=True)

    def timed(self, fn: Callable[[], None]) -> float:
        """Seconds of one call, device synchronised."""
        _sync(self.device)
        start = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - start


def _predict_seconds(history: list[tuple[int, float]], resolution: int) -> float | None:
    """Lower bound of the next run's seconds: the last measured time scaled linearly in pixels."""
    if not history:
        return None
    res, seconds = history[-1]
    return seconds * (resolution / res) ** 2


def _measure(runner: _Runner, fn: Callable[[], None], what: str, repeats: int, limit: float,
             history: list[tuple[int, float]], resolution: int, device: torch.device,
             notes: list[str]) -> tuple[float | None, int | None]:
    """(median ms, peak bytes) of ``fn`` or (None, None) with a reason appended to ``notes``."""
    predicted = _predict_seconds(history, resolution)
    where = "on CPU" if device.type == "cpu" else f"on {device.type}"
    if predicted is not None and predicted > limit:
        prev_res, prev_s = history[-1]
        notes.append(f"{what} skipped: > {predicted:.0f} s per run {where} predicted "
                     f"({prev_s:.1f} s at {prev_res}^2 x {(resolution / prev_res) ** 2:.0f}x the pixels; "
                     f"limit {limit:.0f} s)")
        return None, None
    try:
        runner.clear()
        warmup = runner.timed(fn)
        runs, peaks = [], []
        if warmup > limit:
            notes.append(f"{what}: warm-up run took {warmup:.0f} s (> {limit:.0f} s); reporting that single run")
            runs = [warmup]
            runner.clear()
            _, peak = measure_peak(fn, device)
            peaks.append(peak.bytes)
        else:
            for _ in range(repeats):
                runner.clear()
                seconds, peak = measure_peak(lambda: runner.timed(fn), device)
                runs.append(seconds)
                peaks.append(peak.bytes)
        runner.clear()
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        runner.clear()
        notes.append(f"{what} skipped: out of memory {where}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None
    median = statistics.median(runs)
    history.append((resolution, median))
    return median * 1000.0, max(peaks)


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every family at every resolution (see the module docstring)."""
    say = progress or log.info
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested, but no CUDA device is available here; use --device cpu")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    env = environment(config)
    started = time.perf_counter()
    families = [FAMILIES[k] for k in config.families]
    built: dict[str, tuple[nn.Module, nn.Module]] = {}
    infos: list[FamilyInfo] = []
    for family in families:
        torch.manual_seed(config.seed)
        mae, seg, info = _build(family, config, device)
        mae.train()
        seg.eval()
        built[family.key] = (mae, seg)
        infos.append(info)
        say(f"{info.label}: {info.model}, {info.params_mae / 1e6:.2f} M parameters (MAE), "
            f"{info.params_seg / 1e6:.2f} M (segmentation)")
    history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    cells = []
    for resolution in config.resolutions:
        for family, info in zip(families, infos):
            mae, seg = built[family.key]
            cells.append(_measure_cell(family, info, mae, seg, resolution, config, device, history, say))
    env["seconds"] = round(time.perf_counter() - started, 1)
    with contextlib.suppress(OSError, AttributeError):
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return BenchResult(config, env, infos, cells)


def _measure_cell(family: Family, info: FamilyInfo, mae: nn.Module, seg: nn.Module, resolution: int,
                  config: BenchConfig, device: torch.device, history: dict[tuple[str, str], list[tuple[int, float]]],
                  say: Callable[[str], None]) -> Cell:
    """FLOPs, times and peak memory of one family at one resolution."""
    cell = Cell(family.key, resolution)
    gen = torch.Generator().manual_seed(config.seed + resolution)
    x = torch.randn(config.batch, 1, resolution, resolution, generator=gen).to(device)  # [B, 1, H, W]
    torch.manual_seed(config.seed + resolution)
    spec = _mask_spec(mae, info.mask_ratio)
    mask = mae.random_mask(config.batch, resolution // 8, resolution // 8, spec, device=device)  # [B, h, w]
    cell.masked_fraction = float(mask.float().mean())
    runner = _Runner(mae, seg, x, mask, device, config.precision)
    say(f"{info.label} @ {resolution}^2: counting FLOPs")
    try:
        cell.flops_train, cell.flops_train_by_op = _flops(runner.train_step, runner)
        with torch.no_grad():
            cell.flops_seg, cell.flops_seg_by_op = _flops(runner.infer, runner)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        runner.clear()
        cell.notes.append(f"FLOP count skipped: out of memory on {device.type} while counting")
    if config.flops_only:
        return cell
    if not info.timed:
        cell.notes.append("FLOPs only on CPU: the reference backend runs both neighbourhood modes "
                          "through the same gather; time it on a GPU")
        return cell
    for what, fn, key in (("training step", runner.train_step, "train"), ("inference", runner.infer, "infer")):
        say(f"{info.label} @ {resolution}^2: timing {what}")
        ms, peak = _measure(runner, fn, what, config.repeats, config.max_step_seconds,
                            history.setdefault((family.key, key), []), resolution, device, cell.notes)
        setattr(cell, f"ms_{key}", ms)
        setattr(cell, f"mem_{key}", peak)
        if family.prefix == "affmae" and device.type == "cpu" and peak is not None:
            setattr(cell, f"mem_{key}_fused_bound", _fused_bound(runner, fn, device))
    return cell


def _fused_bound(runner: _Runner, fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of ``fn`` with shape-only neighbourhood ops (see `Cell.mem_train_fused_bound`)."""
    with shape_only_neighborhood_ops():
        runner.clear()
        fn()  # warm-up
        runner.clear()
        _, peak = measure_peak(fn, device)
        runner.clear()
    return peak.bytes


def _flops(fn: Callable[[], None], runner: _Runner) -> tuple[int, dict[str, int]]:
    runner.clear()
    counted: FlopCount = count_flops(fn)
    runner.clear()
    return counted.total, dict(counted.by_op)


# --------------------------------------------------------------------------------------- tables

#: (attribute, title, unit, scale) of the per-resolution tables.
METRICS = (
    ("flops_train", "FLOPs per pretraining step (forward + loss + backward)", "GFLOP", 1e-9),
    ("flops_seg", "FLOPs per segmentation forward", "GFLOP", 1e-9),
    ("ms_train", "Time per training step (forward + loss + backward)", "ms", 1.0),
    ("ms_infer", "Time per segmentation forward (inference mode)", "ms", 1.0),
    ("mem_train", "Peak memory added by one training step", "MiB", 1 / 2**20),
    ("mem_infer", "Peak memory added by one segmentation forward", "MiB", 1 / 2**20),
)
BOUND_LABEL = "AFFMAE, fused-kernel bound*"
BOUND_NOTE = ("*AFFMAE, fused-kernel bound: the same step with neighbourhood attention, merge and k-NN run as "
              "shape-only stand-ins that keep only what a fused kernel keeps (q, k, v, bias), i.e. without the "
              "`[B, H, Nq, M, D]` neighbour tensors the CPU reference materialises: a lower bound for the Triton "
              "kernels' memory.")


def number_text(value: float) -> str:
    """A number for the tables: no decimals from 100 on, one from 10 on, else two (1,234 / 12.3 / 1.23)."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell_text(result: BenchResult, cell: Cell | None, metric: str, scale: float) -> str:
    if cell is None or getattr(cell, metric) is None:
        return "-"
    text = number_text(getattr(cell, metric) * scale)
    ratio = result.ratio(cell.family, cell.resolution, metric)
    if ratio is not None and cell.family != REFERENCE:
        text += f" (x{ratio:.2f})"
    return text


def grid(result: BenchResult, metric: str, scale: float) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one metric: a row per family (+ the fused-kernel bound), a column per resolution."""
    header = ["family"] + [f"{r}^2" for r in result.config.resolutions]
    rows = []
    for info in result.families:
        rows.append([info.label] + [_cell_text(result, result.cell(info.key, r), metric, scale)
                                    for r in result.config.resolutions])
        bound = f"{metric}_fused_bound"
        cells = [result.cell(info.key, r) for r in result.config.resolutions]
        if info.key == "affmae" and any(c is not None and getattr(c, bound, None) for c in cells):
            rows.append([BOUND_LABEL] + [_cell_text(result, c, bound, scale) for c in cells])
    return header, rows


def params_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the parameter counts and mask ratios."""
    ref = next((f for f in result.families if f.key == REFERENCE), None)
    header = ["family", "model", "params MAE (M)", "params seg (M)", "mask ratio"]
    rows = []
    for f in result.families:
        rel = f" ({f.params_mae / ref.params_mae:.2f}x ViT)" if ref and f.key != REFERENCE else ""
        pretrain = "- (not pretrained)" if FAMILIES[f.key].supervised else f"{f.params_mae / 1e6:.2f}{rel}"
        rows.append([f.label, f.model, pretrain, f"{f.params_seg / 1e6:.2f}",
                     "-" if f.mask_ratio is None else f"{f.mask_ratio:g}"])
    return header, rows


def notes(result: BenchResult) -> list[str]:
    """Why cells are empty, one line each (a reason repeated at every resolution is given once)."""
    out = []
    for c in result.cells:
        for note in c.notes:
            out.append(f"{FAMILIES[c.family].label} @ {c.resolution}^2: {note}")
    seen, unique = set(), []
    for line in out:
        key = re.sub(r" @ \d+\^2", "", line)
        if "FLOPs only on CPU" in line:
            if key in seen:
                continue
            seen.add(key)
            line = key
        unique.append(line)
    unique += [f"{FAMILIES[f.key].label}: a segmentation model only; its training rows are one supervised "
               "fine-tuning step (cross-entropy), not a pretraining step" for f in result.families
               if FAMILIES[f.key].supervised]
    return unique


def format_table(result: BenchResult) -> str:
    """Plain-text report for the terminal: parameters, then one grid per metric, then notes."""
    cfg, env = result.config, result.environment
    parts = [f"Efficiency benchmark: size {cfg.size}, {env['device']}, {cfg.precision}, batch {cfg.batch}; "
             f"(xR) = {FAMILIES[REFERENCE].label} / family", "", text_table(*params_rows(result))]
    for metric, title, unit, scale in METRICS:
        parts += ["", f"{title} [{unit}]", text_table(*grid(result, metric, scale))]
    if any(c.mem_train_fused_bound or c.mem_infer_fused_bound for c in result.cells):
        parts += ["", BOUND_NOTE.replace("`", "")]
    lines = notes(result)
    if lines:
        parts += ["", "Notes:"] + [f"- {n}" for n in lines]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------- CLI

def _csv(kind: Callable[[str], object]):
    def parse(text: str):
        try:
            return tuple(kind(t.strip()) for t in text.split(",") if t.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {err}") from err

    return parse


def build_parser(prog: str | None = None, results_file: bool = True) -> argparse.ArgumentParser:
    """The benchmark's options; ``results_file``: with ``--out FILE`` (the results as JSON)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Parameters, FLOPs, peak memory and step times of AFFMAE, ViT-MAE, UM-MAE and GreenMIM at "
                    "matched size, with ratios to ViT-MAE. GPU runs: --device cuda --precision bf16 --size small.")
    parser.add_argument("--families", type=_csv(str), default=DEFAULT_FAMILIES,
                        help=f"comma-separated, from {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (default tiny; small/base for GPU)")
    parser.add_argument("--resolutions", type=_csv(int), default=DEFAULT_RESOLUTIONS,
                        help="square tile sides in px, multiples of 64 (default 256,512,1024,2048)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="autocast dtype for the measured runs (default fp32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median; default 3)")
    parser.add_argument("--batch", type=int, default=1, help="tiles per step (default 1)")
    parser.add_argument("--max-step-seconds", type=float, default=120.0,
                        help="skip timing where a run is predicted slower than this (default 120)")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="override the masking ratio of AFFMAE, ViT-MAE and GreenMIM (default: each "
                             "family's own; UM-MAE is 0.75 by construction)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print machine-readable results on stdout "
                        "(the table then goes to stderr)")
    if results_file:
        parser.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                            help="also write the machine-readable results (as --json prints them) to this file")
    parser.add_argument("--flops-only", action="store_true", help="count parameters and FLOPs, time nothing")
    parser.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                        help="measure nothing: show the results of a saved --json output again")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


def result_from_args(args: argparse.Namespace, argv: Sequence[str] | None, prog: str | None) -> BenchResult:
    """Measure what ``args`` asks for (or read ``--from-json``); ValueError / OSError on bad input."""
    if not args.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.from_json is not None:
        return result_from_json(json.loads(args.from_json.read_text(encoding="utf-8")))
    config = BenchConfig(families=args.families, size=args.size, resolutions=args.resolutions,
                         device=args.device, precision=args.precision, repeats=args.repeats,
                         batch=args.batch, max_step_seconds=args.max_step_seconds,
                         mask_ratio=args.mask_ratio, threads=args.threads, flops_only=args.flops_only)
    result = run_benchmark(config, (lambda message: None) if args.quiet else log.info)
    shown = list(sys.argv[1:] if argv is None else argv)
    result.environment["command"] = " ".join([prog or "affmae bench efficiency", *shown])
    return result


def print_result(result: BenchResult, as_json: bool) -> None:
    """The table on stdout, or the JSON on stdout and the table on stderr."""
    table = format_table(result)
    if as_json:
        sys.stderr.write(table + "\n")
        sys.stdout.write(json.dumps(result.to_json(), indent=1) + "\n")
    else:
        sys.stdout.write(table + "\n")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``affmae bench efficiency``: run the benchmark, print the table (or JSON), keep the results."""
    args = build_parser(prog).parse_args(argv)
    if refuse_markdown_out(args.out):
        return 2
    try:
        result = result_from_args(args, argv, prog)
    except (ValueError, OSError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print_result(result, args.json)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
        if not args.quiet:
            log.info("wrote %s", args.out)
    return 0
