"""Live preview benchmark: how fast and how good is the paint-look-correct loop?

For each task of the few-strokes protocol (`bench.em_protocol`, k = 1 labelled slice, sparse
strokes) and each arm:

* ``rf_filters`` — ilastik's pixel classifier rebuilt: the 20 multiscale filter features of
  `data.features.filter_features` and a 100-tree random forest (`engine.live.LiveConfig.ilastik_style`);
* ``live`` — the Live preview as the Fine-tune widget runs it (`engine.live.LiveConfig()`): the filters
  of each slice normalised by its own intensity statistics, posteriors re-weighted to the class shares
  estimated on unpainted pixels near the strokes; with ``--package FAMILY=PATH`` also that AFFMAE
  package's encoder stages (the widget's *AFFMAE features* box);
* ``prior_corrected`` — ``rf_filters`` with only the class-share correction (one EM step);
* ``slice_normalized`` — ``rf_filters`` with only the per-slice normalisation.

It measures, on the labelled slice (1024^2 on VNC):

* ``first_preview_s``: from nothing cached to the first prediction of the slice (features,
  fit, predict);
* ``update_s``: after one more stroke, refit and repredict with the features cached (the median of
  ``repeats`` strokes);
* ``peak_rss_mb``: peak resident memory of a fresh process doing the above;
* held-out IoU after correction rounds 0, 1, 2 (`em_protocol.correction_strokes`: about 0.25 % of
  the slice per round, painted where the prediction on the labelled slice is wrong), and each
  round's seconds.

``affmae bench preview --json`` prints the summary object: ``update_vs_rf`` and
``first_preview_vs_rf`` (time ratios live / rf_filters, on the first task), ``iou_live`` and
``iou_rf_filters`` (first task, round 0), and everything per task.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..engine.settings import parse_int_list
from . import em_protocol as P

log = logging.getLogger(__name__)
ARMS = ("rf_filters", "live", "prior_corrected", "slice_normalized")


@dataclass
class PreviewBenchConfig:
    """One run. ``packages``: AFFMAE package for the live arm's encoder features per task family (none: the
    widget's default, no encoder features)."""

    data_dir: Path
    tasks: list[str] = field(default_factory=lambda: list(P.TASKS))
    seeds: list[int] = field(default_factory=lambda: [0])  # stroke seeds; times come from the first
    rounds: int = 2
    repeats: int = 3
    packages: dict[str, str] = field(default_factory=dict)  # data family ("vnc", "isbi2012") -> package path
    threads: int | None = 2
    max_eval_slices: int | None = None
    trees: int = 100

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in P.TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(P.TASKS)}")
        if not self.seeds:
            raise ValueError("give at least one stroke seed (e.g. --seeds 0,1,2)")
        if self.rounds < 0 or self.repeats < 1 or self.trees < 1:
            raise ValueError("rounds must be >= 0; repeats and trees >= 1")
        for family, path in self.packages.items():
            if not Path(path).exists():
                raise ValueError(f"package for {family} not found: {path}")


def _family(task: str) -> str:
    return P.TASKS[task].raw.split("/")[0]


def _live_config(arm: str, package: str | None, trees: int, seed: int) -> Any:
    from ..engine.live import LiveConfig  # noqa: PLC0415

    if arm == "rf_filters":
        return LiveConfig.ilastik_style(trees=trees, seed=seed, max_cache_mb=4096)
    if arm == "prior_corrected":
        return LiveConfig.ilastik_style(trees=trees, seed=seed, max_cache_mb=4096, prior_exponent=1.0)
    if arm == "slice_normalized":
        return LiveConfig.ilastik_style(trees=trees, seed=seed, max_cache_mb=4096, slice_normalization=True)
    return LiveConfig(package=package, trees=trees, seed=seed, max_cache_mb=4096)


def _extra_stroke(labels: np.ndarray, truth: np.ndarray, z: int, seed: int) -> np.ndarray:
    """``labels`` plus one short background stroke on slice z (a new stroke, as a person adds one)."""
    one = P.training_labels(truth, [z], "sparse", seed=seed + 7919, fraction=0.0005)
    one[one == P.FOREGROUND] = 0
    return np.where(labels > 0, labels, one)


def time_arm(raw: np.ndarray, truth: np.ndarray, z: int, labels: np.ndarray, arm: str, package: str | None,
             trees: int, seed: int, repeats: int) -> dict[str, Any]:
    """First-preview and update times of one arm on slice ``z`` (run in a fresh process for its peak RSS)."""
    from ..engine.live import LivePreview  # noqa: PLC0415

    started = time.perf_counter()
    preview = LivePreview(raw, _live_config(arm, package, trees, seed))
    first = preview.update(labels, z=z)
    first_s = time.perf_counter() - started
    updates = []
    current = labels
    for i in range(repeats):
        current = _extra_stroke(current, truth, z, seed + i)
        t0 = time.perf_counter()
        preview.update(current, z=z)
        updates.append(time.perf_counter() - t0)
    return {"first_preview_s": first_s, "update_s": statistics.median(updates), "update_all_s": updates,
            "first_timings": first.timings, "painted_pixels": first.n_painted,
            "n_features": preview.model.config.n_features,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: VmHWM on Linux (ru_maxrss survives exec there, so a
    freshly spawned child would report its parent's peak), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1.0 if sys.platform != "darwin" else 1.0 / 1024.0  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024.0


def _time_arm_child(queue: Any, args: tuple, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    try:
        queue.put(("ok", time_arm(*args)))
    except Exception as err:  # noqa: BLE001  (sent back to the parent, which reports it)
        queue.put(("error", f"{type(err).__name__}: {err}"))


def time_arm_isolated(args: tuple, threads: int | None) -> dict[str, Any]:
    """`time_arm` in a fresh spawned process, so its peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_time_arm_child, args=(queue, args, threads))
    proc.start()
    while True:
        try:
            status, value = queue.get(timeout=5.0)
            break
        except Exception:  # noqa: BLE001  (queue.Empty: still running, unless the child died)
            if not proc.is_alive():
                raise RuntimeError(f"the timing process ended without a result (exit code {proc.exitcode}; "
                                   "killed for memory?)") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(value)
    return value


def correction_rounds(raw: np.ndarray, truth: np.ndarray, z: int, labels: np.ndarray, eval_slices: list[int],
                      arm: str, package: str | None, trees: int, seed: int, rounds: int) -> list[dict[str, Any]]:
    """Held-out scores after rounds 0..``rounds``: fit, predict, then paint corrections on slice z."""
    from ..engine.live import LivePreview  # noqa: PLC0415

    preview = LivePreview(raw, _live_config(arm, package, trees, seed))
    out = []
    for r in range(rounds + 1):
        started = time.perf_counter()
        result = preview.update(labels, z=z)
        fit_s = time.perf_counter() - started
        pred = np.zeros(raw.shape, np.uint8)
        for e in eval_slices:
            pred[e] = preview.predict(e)[0] == P.FOREGROUND  # features cached across rounds (bound 4 GiB)
        out.append({"round": r, "painted_pixels": int((labels[z] > 0).sum()), "train_and_preview_s": fit_s,
                    "eval_s": time.perf_counter() - started - fit_s, "pred_slice": result.labels == P.FOREGROUND,
                    "scores": pred})
        if r < rounds:
            labels = labels.copy()
            labels[z] = P.correction_strokes(labels[z], result.labels == P.FOREGROUND, truth[z],
                                             seed=P.correction_seed(seed, r))
    return out


def run_benchmark(config: PreviewBenchConfig) -> dict[str, Any]:
    """Every task x arm; returns the JSON-able results (``summary`` holds the headline ratios)."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    packages = dict(config.packages)
    tasks_out: dict[str, Any] = {}
    started = time.perf_counter()
    for task_name in config.tasks:
        task = P.TASKS[task_name]
        raw, truth, _ = P.load_task(config.data_dir, task)
        package = packages.get(_family(task_name))
        split = P.make_split(raw.shape[0])
        z = split.labelled(1)[0]
        eval_slices = list(split.eval_slices)
        if config.max_eval_slices:
            eval_slices = eval_slices[:: max(1, len(eval_slices) // config.max_eval_slices)][: config.max_eval_slices]
        arms: dict[str, Any] = {}
        for arm in ARMS:
            arms[arm] = _run_arm(config, task_name, raw, truth, z, eval_slices, arm, package)
        tasks_out[task_name] = {"labelled_slice": z, "eval_slices": eval_slices, "shape": list(raw.shape),
                                "package": package, "arms": arms}
    return {"config": {**asdict(config), "data_dir": str(config.data_dir)},
            "environment": _environment(), "tasks": tasks_out, "summary": summarise(tasks_out),
            "total_s": time.perf_counter() - started}


def _run_arm(config: PreviewBenchConfig, task_name: str, raw: np.ndarray, truth: np.ndarray, z: int,
             eval_slices: list[int], arm: str, package: str | None) -> dict[str, Any]:
    """Times (first seed's strokes, fresh process) and held-out scores over correction rounds (every seed)."""
    task = P.TASKS[task_name]
    first_labels = P.training_labels(truth, [z], "sparse", seed=config.seeds[0])
    log.info("[%s] %s: timing", task_name, arm)
    timing = time_arm_isolated((raw, truth, z, first_labels, arm, package, config.trees, config.seeds[0],
                                config.repeats), config.threads)
    by_seed = {}
    for seed in config.seeds:
        log.info("[%s] %s: correction rounds, strokes of seed %d", task_name, arm, seed)
        labels = P.training_labels(truth, [z], "sparse", seed=seed)
        rounds = correction_rounds(raw, truth, z, labels, eval_slices, arm, package, config.trees, seed,
                                   config.rounds)
        for item in rounds:
            item["scores"] = P.evaluate_stack(item.pop("scores"), truth, task, eval_slices)
            item.pop("pred_slice")
        by_seed[seed] = rounds
        log.info("[%s] %s, seed %d: IoU by round %s", task_name, arm, seed,
                 [round(r["scores"]["fg_iou"], 3) for r in rounds])
    ious = np.array([[r["scores"]["fg_iou"] for r in rounds] for rounds in by_seed.values()])  # [seeds, rounds]
    return {**timing, "rounds": by_seed[config.seeds[0]], "rounds_by_seed": by_seed,
            "iou_mean": ious.mean(0).tolist(), "iou_std": (ious.std(0, ddof=1) if len(ious) > 1
                                                          else np.zeros(ious.shape[1])).tolist()}


def summarise(tasks: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: ratios on the first task, IoU per task and round."""
    first = next(iter(tasks.values()))
    live, rf = first["arms"]["live"], first["arms"]["rf_filters"]
    per_task = {}
    for name, item in tasks.items():
        per_task[name] = {arm: data["iou_mean"] for arm, data in item["arms"].items()}
    return {"task": next(iter(tasks)),
            "update_vs_rf": live["update_s"] / rf["update_s"],
            "first_preview_vs_rf": live["first_preview_s"] / rf["first_preview_s"],
            "iou_live": live["iou_mean"][0],  # round 0, mean over the stroke seeds
            "iou_rf_filters": rf["iou_mean"][0],
            "update_s": {"live": live["update_s"], "rf_filters": rf["update_s"]},
            "first_preview_s": {"live": live["first_preview_s"], "rf_filters": rf["first_preview_s"]},
            "peak_rss_mb": {"live": live["peak_rss_mb"], "rf_filters": rf["peak_rss_mb"]},
            "iou_by_round": per_task}


def _environment() -> dict[str, Any]:
    from .em_segmentation import environment  # noqa: PLC0415

    import os  # noqa: PLC0415

    return {**environment("cpu"), "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None,
               fallback_data_dir: Path | None = None) -> tuple[PreviewBenchConfig, argparse.Namespace]:
    """The run ``argv`` asks for; data from ``--data-dir``, ``$AFFMAE_DATA`` or ``fallback_data_dir`` (an
    argparse error naming the option and the variable when none gives a folder)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=None, help=f"folder with vnc/ and isbi2012/ (default: ${P.DATA_ENV})")
    p.add_argument("--tasks", default="all", help=f"comma list of {', '.join(P.TASKS)} or 'all' (default: all)")
    p.add_argument("--seeds", type=parse_int_list, default=[0], help="comma list of stroke seeds; IoU is their mean, times come from "
                                                "the first (default: 0)")
    p.add_argument("--rounds", type=int, default=2, help="correction rounds after round 0 (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="strokes timed for the update time (default: 3)")
    p.add_argument("--package", action="append", default=[], metavar="FAMILY=PATH",
                   help="AFFMAE package whose encoder features the live arm adds, e.g. vnc=runs/pre.affmae "
                        "(default: none, as the widget)")
    p.add_argument("--trees", type=int, default=100)
    p.add_argument("--max-eval-slices", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch / scikit-learn threads (default: 2)")
    p.add_argument("--json", action="store_true", help="print the summary object as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write all results as JSON here")
    args = p.parse_args(argv)
    try:
        data_dir = P.resolve_data_dir(args.data_dir, fallback_data_dir)
    except FileNotFoundError as err:
        p.error(str(err))
    tasks = list(P.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    packages = {}
    for item in args.package:
        if "=" not in item:
            p.error(f"--package takes FAMILY=PATH (families: vnc, isbi2012); got {item!r}")
        key, value = item.split("=", 1)
        packages[key.strip()] = value.strip()
    config = PreviewBenchConfig(data_dir=data_dir, tasks=tasks, seeds=args.seeds,
                                rounds=args.rounds, repeats=args.repeats, packages=packages,
                                threads=args.threads,
                                max_eval_slices=args.max_eval_slices, trees=args.trees)
    return config, args


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config, args = parse_args(argv, prog)
        config.validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = run_benchmark(config)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps(results["summary"], indent=1))
    return 0
