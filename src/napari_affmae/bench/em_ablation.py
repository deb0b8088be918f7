"""What holds AFFMAE pretraining back with few labels? Variants of the real-EM benchmark's default.

Each variant changes one thing of the AFFMAE pretrained arm of `bench.em_segmentation` (mask
ratio, keep rate, reconstruction target, pretraining steps, refinement head) and is run on one
setting (default: VNC mitochondria, k = 1, sparse strokes, seed 0) with the same fine-tuning budget.
A variant that changes the segmentation model itself (``refine``) also re-runs AFFMAE from scratch,
so its difference is measured against a matching scratch model. The reference (no change) is run
too, or read from the benchmark's own ``results.json`` with ``--reference``.

``affmae bench ablation`` prints one row per variant (pretraining loss, reconstruction probe, IoU
pretrained and from scratch) and writes the results as JSON (``WORK_DIR/ablations.json``, or ``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import em_protocol as P
from . import em_segmentation as S
from .tables import refuse_markdown_out, text_table

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Variant:
    """One change to the default AFFMAE pretrained arm."""

    name: str
    change: str  # what is different, in words
    affmae_options: dict[str, Any] = field(default_factory=dict)
    pretrain_steps_factor: float = 1.0  # x the benchmark's pretraining steps

    @property
    def changes_architecture(self) -> bool:
        """True if the segmentation model differs too (keep rate, refine, ...): then scratch is re-run."""
        return any(k not in S.PRETRAINING_ONLY for k in self.affmae_options)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("reference", "none (the benchmark's default arm)"),
    Variant("raw_pixels", "unnormalised reconstruction target (norm_pix_loss = false)", {"norm_pix_loss": False}),
    Variant("mask_75", "blob masks hide 75 % instead of 50 %", {"mask_ratio": 0.75}),
    Variant("keep_70", "each merge keeps 70 % of the tokens instead of 40 % (both arms)", {"keep_rate": 0.7}),
    Variant("steps_x3", "3 x the pretraining steps", pretrain_steps_factor=3.0),
    Variant("no_refine", "no full-resolution refinement head (both arms)", {"refine": False}),
)}


@dataclass
class AblationConfig(S.BenchBudget):
    """The setting every variant is run on, with the benchmark's `em_segmentation.BenchBudget`."""

    data_dir: Path
    work_dir: Path = Path("runs/em_ablation")
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    task: str = "vnc_mito"
    k: int | str = 1
    regime: str = "sparse"
    seed: int = 0
    reference: Path | None = None  # results.json of the main benchmark holding the reference rows

    def bench_config(self, variant: Variant) -> S.EMBenchConfig:
        arms = ["affmae_pretrained"] + (["affmae_scratch"] if variant.name == "reference"
                                        or variant.changes_architecture else [])
        budget = dict(self.budget(), pretrain_steps=max(1, round(self.pretrain_steps * variant.pretrain_steps_factor)))
        return S.EMBenchConfig(
            data_dir=self.data_dir, work_dir=self.work_dir / variant.name, tasks=[self.task], ks=[self.k],
            regimes=[self.regime], seeds=[self.seed], arms=arms, size="tiny",
            affmae_options=dict(variant.affmae_options), **budget)

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if self.reference is not None and not Path(self.reference).is_file():
            raise FileNotFoundError(f"--reference {self.reference}: no such results.json (run "
                                    "benchmarks/em_segmentation.py first, or leave the option out)")
        if "reference" not in self.variants:  # every difference is measured against it
            self.variants = ["reference", *self.variants]
        for name in self.variants:
            self.bench_config(VARIANTS[name]).validate()
        if self.reference is not None:
            reference_from(self.reference, self)  # a mismatch fails now, not after hours of training


def _row(results: dict[str, Any], arm: str) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if r["arm"] == arm), None)


def reference_from(path: Path, config: AblationConfig) -> dict[str, Any]:
    """The reference rows from a benchmark ``results.json``, checked to match ``config``'s setting and budget."""
    results = S.read_results(path)
    cfg, env = results["config"], results["environment"]
    from ..engine import resolve_device  # noqa: PLC0415

    wanted = {"pretrain_steps": config.pretrain_steps, "finetune_steps": config.finetune_steps,
              "batch_size": config.batch_size, "crop": config.crop, "tile": config.tile, "size": "tiny",
              "max_eval_slices": config.max_eval_slices}
    differ = {k: (cfg.get(k), v) for k, v in wanted.items() if cfg.get(k) != v}
    if env.get("device") != resolve_device(config.device).type:
        differ["device"] = (env.get("device"), resolve_device(config.device).type)
    if Path(cfg.get("data_dir", "")).resolve() != Path(config.data_dir).resolve():
        differ["data_dir"] = (cfg.get("data_dir"), str(config.data_dir))
    if cfg.get("affmae_options"):
        differ["affmae_options"] = (cfg["affmae_options"], {})
    if differ:
        raise ValueError(f"{path} was run with another budget (theirs, ours): {differ}")
    runs = [r for r in results["runs"] if r["task"] == config.task and r["regime"] == config.regime
            and str(r["k"]) == str(config.k) and r["seed"] == config.seed]
    arms = {r["arm"] for r in runs if r["scores"] is not None}
    if not {"affmae_pretrained", "affmae_scratch"} <= arms:
        raise ValueError(f"{path} has no scored AFFMAE pretrained and scratch runs for {config.task}, "
                         f"{config.regime}, k={config.k}, seed {config.seed}")
    pretraining = [p for p in results["pretraining"] if p["task"] == config.task and p["seed"] == config.seed
                   and p["family"] == "affmae"]
    return {"runs": runs, "pretraining": pretraining, "total_s": None, "from": str(path)}


def probe_pretraining(package_path: Path, images: Sequence[np.ndarray], crop: int, batches: int = 16,
                      batch_size: int = 8, seed: int = 1234, mask_type: str = "blob") -> dict[str, float]:
    """Reconstruction loss of a pretrained AFFMAE package and of the trivial predictor (every masked patch
    flat at the visible mean, `AFFMAEPretrain.trivial_loss`) on the same fixed crops and masks of ``images``
    (2D/3D arrays), normalised as in pretraining. ``ratio`` < 1: the model predicts more than flat patches.

    The masks are the same for every model whatever it was pretrained with: ``mask_type`` masks (blob: of
    the default scales `models.masking.BLOB_CELLS`) at the package's pretraining mask ratio (`package_mask`),
    drawn from ``seed``. Loss and trivial loss use the model's own target (pooling, blur, normalisation), so
    the ratio compares like with like."""
    from ..data.sampling import PatchSampler  # noqa: PLC0415
    from ..engine import load_package  # noqa: PLC0415
    from ..engine.inputs import as_input_image, combined_stats  # noqa: PLC0415
    from ..engine.pretrain import normalised_batch, package_mask  # noqa: PLC0415
    from ..models.masking import make_mask  # noqa: PLC0415

    package = load_package(package_path, expect_task="mae")
    model, ratio = package.build_model("cpu").eval(), package_mask(package).ratio
    inputs = [as_input_image(image) for image in images]
    _, stats = combined_stats(inputs, seed=0)
    sampler = PatchSampler([i.array for i in inputs], (crop, crop), seed=seed, pad=True)
    generator = torch.Generator().manual_seed(seed)
    losses, trivial = [], []
    with torch.no_grad():
        for _ in range(batches):
            x = torch.from_numpy(normalised_batch(sampler, stats, batch_size))[:, None]  # [B, 1, crop, crop]
            mask = make_mask(mask_type, batch_size, crop // 8, crop // 8, ratio, generator)
            out = model(x, mask=mask)
            losses.append(float(out["loss"]))
            trivial.append(float(out["reference_loss"]))
    loss, floor = float(np.mean(losses)), float(np.mean(trivial))
    return {"probe_loss": loss, "trivial_loss": floor, "ratio": loss / floor}


def _package_of(config: AblationConfig, variant: str) -> Path:
    from ..engine.pretrain import PRETRAIN_PACKAGE  # noqa: PLC0415

    root = Path(config.reference).parent if variant == "reference" and config.reference else config.work_dir / variant
    return S.pretrain_dir(root, config.task, "affmae", config.seed) / PRETRAIN_PACKAGE


def add_probes(rows: list[dict[str, Any]], config: AblationConfig) -> None:
    """Probe every variant's pretrained package on the task's evaluation slices (in place)."""
    raw, _, _ = P.load_task(config.data_dir, P.TASKS[config.task])
    eval_slices = list(P.make_split(raw.shape[0]).eval_slices)
    for row in rows:
        package = _package_of(config, row["variant"])
        if package.exists():
            row.update(probe_pretraining(package, [raw[eval_slices]], config.crop))
        else:
            row.update({"probe_loss": None, "trivial_loss": None, "ratio": None})


def run_ablation(config: AblationConfig) -> dict[str, Any]:
    """Run every variant; returns one row per variant (JSON-able)."""
    config.validate()
    from ..engine import resolve_device  # noqa: PLC0415

    device = resolve_device(config.device).type
    rows = []
    for name in config.variants:
        variant = VARIANTS[name]
        if name == "reference" and config.reference is not None:
            results = reference_from(config.reference, config)
        else:
            log.info("=== variant %s: %s", name, variant.change)
            started = time.perf_counter()
            results = S.run_benchmark(config.bench_config(variant))
            results["total_s"] = time.perf_counter() - started
        pre, scratch = _row(results, "affmae_pretrained"), _row(results, "affmae_scratch")
        pretraining = next(iter(results["pretraining"]), {})
        if variant.changes_architecture and scratch is None:
            scratch = {"scores": None, "error": "no scratch run"}
        rows.append({
            "variant": name, "change": variant.change, "options": variant.affmae_options,
            "own_scratch": name == "reference" or variant.changes_architecture,
            "scratch_error": None if scratch is None else scratch["error"],
            "pretrain_steps": pretraining.get("steps"), "first_loss": pretraining.get("first_loss"),
            "final_loss": pretraining.get("final_loss"), "pretrain_error": pretraining.get("error"),
            "fg_iou": None if pre is None or pre["scores"] is None else pre["scores"]["fg_iou"],
            "scratch_fg_iou": None if scratch is None or scratch["scores"] is None else scratch["scores"]["fg_iou"],
            "error": None if pre is None else pre["error"], "minutes": None if results["total_s"] is None
            else results["total_s"] / 60, "reused_from": results.get("from"),
        })
    add_probes(rows, config)
    return {"config": {**dataclasses.asdict(config), "data_dir": str(config.data_dir),
                       "work_dir": str(config.work_dir), "reference": None if config.reference is None
                       else str(config.reference)},
            "environment": S.environment(device), "rows": rows}


TABLE_HEADER = ["variant", "change", "pretraining steps", "loss first → final", "probe: model / trivial (ratio)",
                "fg IoU pretrained", "fg IoU scratch", "pretrained − scratch", "minutes"]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row of `TABLE_HEADER` cells per variant. The difference is against the variant's own scratch model
    where it changes the segmentation model, else against the reference's."""
    rows = results["rows"]
    scratch = next((r["scratch_fg_iou"] for r in rows if r["variant"] == "reference"), None)
    out = []
    for r in rows:
        base = r["scratch_fg_iou"] if r["own_scratch"] else scratch  # never a scratch model of another shape
        iou = "–" if r["fg_iou"] is None else f"{r['fg_iou']:.3f}"
        delta = "–" if r["fg_iou"] is None or base is None else f"{r['fg_iou'] - base:+.3f}"
        loss = ("failed: " + r["pretrain_error"] if r.get("pretrain_error") else
                "–" if r["first_loss"] is None else f"{r['first_loss']:.3f} → {r['final_loss']:.3f}")
        minutes = "(from results.json)" if r["reused_from"] else "–" if r["minutes"] is None else f"{r['minutes']:.1f}"
        probe = ("–" if r.get("probe_loss") is None else
                 f"{r['probe_loss']:.3f} / {r['trivial_loss']:.3f} ({r['ratio']:.3f})")
        out.append([r["variant"], r["change"], str(r["pretrain_steps"] or "–"), loss, probe, iou,
                    "–" if base is None else f"{base:.3f}", delta, minutes])
    return out


def failures(results: dict[str, Any]) -> list[str]:
    """One line per failed arm."""
    rows = results["rows"]
    lines = [f"{r['variant']}: pretrained arm failed: {r['error']}" for r in rows if r["error"]]
    return lines + [f"{r['variant']}: scratch arm failed: {r['scratch_error']}" for r in rows if r["scratch_error"]]


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table for the terminal: one row per variant, then the failures."""
    errors = failures(results)
    return text_table(TABLE_HEADER, table_rows(results)) + ("\n\n" + "\n".join(errors) if errors else "")


# ----------------------------------------------------------------------------------------------- CLI

def build_parser(prog: str | None = None, results_file: bool = True) -> argparse.ArgumentParser:
    """The study's options; ``results_file``: with ``--out FILE.json``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"folder with vnc/ and isbi2012/ (default: ${P.DATA_ENV})")
    p.add_argument("--work-dir", type=Path, default=Path("runs/em_ablation"))
    if results_file:
        p.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                       help="where the results go as JSON (default: WORK_DIR/ablations.json)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--reference", type=Path, default=None,
                   help="results.json of the segmentation benchmark with the same budget: reuse its AFFMAE "
                   "pretrained and scratch runs as the reference instead of running them again")
    p.add_argument("--task", default="vnc_mito", choices=list(P.TASKS))
    p.add_argument("--k", default="1", help="labelled slices (integer or 'all')")
    p.add_argument("--regime", default="sparse", choices=list(P.REGIMES))
    p.add_argument("--seed", type=int, default=0)
    S.add_budget_options(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--probe-only", action="store_true",
                   help="train nothing: probe the packages of an earlier run (its --work-dir/ablations.json) again")
    return p


def results_from_args(args: argparse.Namespace, argv: Sequence[str] | None, prog: str,
                      fallback_data_dir: Path | None = None, saved: Path | None = None) -> dict[str, Any]:
    """Run the variants ``args`` ask for, or probe again (``--probe-only``: results read from ``saved``, by
    default WORK_DIR/ablations.json). ``command`` holds the command line. ValueError / FileNotFoundError on bad
    input."""
    if not args.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--probe-only"]
    if args.probe_only:  # the command of the run that trained the variants is kept
        results = _probe_again(args.work_dir, saved if saved is not None else args.work_dir / "ablations.json")
        results.setdefault("command", " ".join([prog, *shown]))
        return results
    config = AblationConfig(
        data_dir=P.resolve_data_dir(args.data_dir, fallback_data_dir),
        work_dir=args.work_dir, variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        task=args.task, k=P.parse_k(args.k), regime=args.regime, seed=args.seed, reference=args.reference,
        **S.budget_from_args(args))
    results = run_ablation(config)
    results["command"] = " ".join([prog, *shown])
    return results


def save_results(results: dict[str, Any], path: Path) -> Path:
    """Write ``results`` as JSON to ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return path


def exit_code(results: dict[str, Any]) -> int:
    """0 when some variant was scored, else 1."""
    return 0 if any(r["fg_iou"] is not None for r in results["rows"]) else 1


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``affmae bench ablation``: run the variants, print the table, write the results as JSON."""
    args = build_parser(prog).parse_args(argv)
    if refuse_markdown_out(args.out):
        return 2
    path = args.out if args.out is not None else args.work_dir / "ablations.json"
    try:
        results = results_from_args(args, argv, prog or "affmae bench ablation", saved=path)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    save_results(results, path)
    sys.stdout.write(format_table(results) + "\n")
    sys.stderr.write(f"wrote {path}\n")
    return exit_code(results)


def _probe_again(work_dir: Path, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--probe-only: no {path}; run the variants first")
    results = json.loads(path.read_text(encoding="utf-8"))
    stored = results["config"]
    config = AblationConfig(**{**stored, "data_dir": Path(stored["data_dir"]), "work_dir": work_dir,
                               "reference": None if stored["reference"] is None else Path(stored["reference"])})
    add_probes(results["rows"], config)
    return results
