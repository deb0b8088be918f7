"""What helps the Live preview's forest on real EM? One-change variants of the rf_filters head.

    python benchmarks/forest_variants.py --package runs/live_preview/affmae_tiny_vnc_300steps.affmae

For each task of the few-strokes protocol (k = 1, sparse strokes, seed 0), features of the labelled
slice and of every other held-out slice are computed once (the 20 ilastik-style filters plus all
four AFFMAE encoder stages of ``--package`` projected to 8 channels each); each variant then trains
a 100-tree forest on the painted pixels and is scored on those held-out slices. Variants:

* ``filters``                         the rf_filters arm (20 filter features);
* ``+encoder res5 x4`` ... ``x8``      plus encoder stages (which stages, channels per stage);
* ``min_samples_leaf 10``              smoother trees;
* ``max_features 0.5``                 more features tried per split;
* ``prior-adjusted``                   class priors re-estimated on the labelled slice's unpainted pixels
  (Saerens-Latinne-Decaestecker EM), posteriors re-weighted before the arg-max;
* ``auto-context``                     ilastik's two-stage idea: a second forest on the filters plus the
  first forest's class probabilities smoothed at 0-16 px (on the painted pixels the first forest's
  out-of-bag probabilities, so the second stage does not learn to trust in-sample answers);
* ``ilastik full filter set``          Gaussian, gradient magnitude, Laplacian of Gaussian, difference of
  Gaussians, structure-tensor and Hessian eigenvalues at sigma 0.7-10 px (49 features) instead of the 20.

Writes docs/forest-variants.md: mean and spread over ``--seeds`` stroke seeds, half the held-out slices.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench import em_protocol as P  # noqa: E402
from napari_affmae.data.features import N_FILTER_FEATURES  # noqa: E402

COMPONENTS = 8


def columns(stages: list[int], per_stage: int) -> list[int]:
    """Feature columns: the filters plus ``per_stage`` encoder channels of each of ``stages``."""
    return list(range(N_FILTER_FEATURES)) + [N_FILTER_FEATURES + COMPONENTS * s + j for s in stages
                                             for j in range(per_stage)]


VARIANTS = {  # name -> (columns, forest options, prior adjustment)
    "filters (rf_filters)": (columns([], 0), {}, False),
    "+ encoder res5 x4": (columns([3], 4), {}, False),
    "+ encoder res4-5 x4": (columns([2, 3], 4), {}, False),
    "+ encoder all x2": (columns([0, 1, 2, 3], 2), {}, False),
    "+ encoder all x4 (Live preview with AFFMAE features)": (columns([0, 1, 2, 3], 4), {}, False),
    "+ encoder all x8": (columns([0, 1, 2, 3], 8), {}, False),
    "filters, min_samples_leaf 10": (columns([], 0), {"min_samples_leaf": 10}, False),
    "filters, max_features 0.5": (columns([], 0), {"max_features": 0.5}, False),
    "filters, prior-adjusted": (columns([], 0), {}, True),
    "filters, auto-context": (columns([], 0), {"auto_context": True}, False),
    "ilastik full filter set": ("full", {}, False),
}


def estimate_priors(probs: np.ndarray, train_prior: np.ndarray, iterations: int = 100) -> np.ndarray:
    """EM re-estimate of the class priors of unlabelled pixels ``probs [N, K]`` (posteriors under ``train_prior``)."""
    prior = train_prior.copy()
    for _ in range(iterations):
        weighted = probs * (prior / train_prior)
        prior = (weighted / weighted.sum(1, keepdims=True)).mean(0)
    return prior


def full_filter_set(image: np.ndarray) -> np.ndarray:
    """ilastik's full 2D filter set at sigma 0.7-10 px -> ``[Y, X, 49]`` float32."""
    from scipy import ndimage  # noqa: PLC0415
    from skimage.feature import (hessian_matrix, hessian_matrix_eigvals, structure_tensor,  # noqa: PLC0415
                                 structure_tensor_eigenvalues)

    image = image.astype(np.float32)
    out = []
    for sigma in (0.7, 1.0, 1.6, 3.5, 5.0, 10.0):
        smooth = ndimage.gaussian_filter(image, sigma)
        out += [smooth, ndimage.gaussian_gradient_magnitude(image, sigma), ndimage.gaussian_laplace(image, sigma),
                smooth - ndimage.gaussian_filter(image, 1.66 * sigma)]
        out += list(structure_tensor_eigenvalues(structure_tensor(image, sigma=sigma, mode="reflect", order="rc")))
        out += list(hessian_matrix_eigvals(hessian_matrix(image, sigma=sigma, mode="reflect", order="rc",
                                                          use_gaussian_derivatives=False)))
    out.append(ndimage.gaussian_filter(image, 20.0))
    return np.stack(out, -1).astype(np.float32)


def context_features(probs: np.ndarray) -> np.ndarray:
    """Auto-context features: class probabilities ``[Y, X, K]`` (K = 2: the structure's only) smoothed at
    0, 1, 2, 4, 8 and 16 px -> ``[Y, X, 6 K']``."""
    from scipy import ndimage  # noqa: PLC0415

    probs = probs[..., 1:] if probs.shape[-1] == 2 else probs
    return np.concatenate([probs] + [ndimage.gaussian_filter(probs, (s, s, 0)) for s in (1, 2, 4, 8, 16)],
                          axis=-1).astype(np.float32)


def score(variant: tuple, feats: dict, z: int, held_out: list[int], labels: np.ndarray, truth_fg: np.ndarray,
          shape: tuple[int, int]) -> float:
    """Held-out foreground IoU of one variant trained on the painted pixels of slice ``z``."""
    from sklearn.ensemble import RandomForestClassifier  # noqa: PLC0415

    cols, options, adjust = variant
    options = dict(options)
    auto_context = options.pop("auto_context", False)
    key = "full" if cols == "full" else "main"
    x = {s: feats[key][s] if cols == "full" else feats[key][s][..., cols] for s in [z, *held_out]}
    painted = labels > 0

    def forest(**extra):
        return RandomForestClassifier(n_estimators=100, n_jobs=2, random_state=0, **options, **extra)

    def probs(model, f):
        return model.predict_proba(f.reshape(-1, f.shape[-1])).reshape(*shape, -1)

    model = forest(oob_score=auto_context).fit(x[z][painted], labels[painted])
    if auto_context:
        first = probs(model, x[z])
        first[painted] = model.oob_decision_function_
        x = {s: np.concatenate([x[s], context_features(first if s == z else probs(model, x[s]))], axis=-1)
             for s in x}
        model = forest().fit(x[z][painted], labels[painted])
    train_prior = np.bincount(labels[painted])[1:] / painted.sum()
    prior = estimate_priors(probs(model, x[z]).reshape(-1, len(train_prior)), train_prior) if adjust else train_prior
    pred = np.stack([(probs(model, x[s]) * (prior / train_prior)).argmax(-1) + 1 == P.FOREGROUND for s in held_out])
    return float((pred & truth_fg).sum() / (pred | truth_fg).sum())


def run(data_dir: Path, package: Path, tasks: list[str], seeds: list[int]) -> list[tuple[str, str, int, float]]:
    import torch  # noqa: PLC0415

    from napari_affmae.data.normalize import compute_stats  # noqa: PLC0415
    from napari_affmae.engine import load_package  # noqa: PLC0415
    from napari_affmae.models import create_model  # noqa: PLC0415

    torch.set_num_threads(2)
    state = load_package(package).state_dict
    rows = []
    for task in tasks:
        raw, truth, _ = P.load_task(data_dir, task)
        split = P.make_split(raw.shape[0])
        z, held_out = split.labelled(1)[0], list(split.eval_slices)[::2]
        image = compute_stats(raw).apply(raw)
        model = create_model("feature_forest", task="segmentation", num_classes=2, encoder_size="tiny",
                             components=COMPONENTS)
        model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
        feats = {"main": {s: model.pixel_features(image[s]) for s in [z, *held_out]},
                 "full": {s: full_filter_set(image[s]) for s in [z, *held_out]}}
        truth_fg = truth[held_out] > 0
        for seed in seeds:
            labels = P.training_labels(truth, [z], "sparse", seed=seed)[z]
            for name, variant in VARIANTS.items():
                iou = score(variant, feats, z, held_out, labels, truth_fg, raw.shape[1:])
                rows.append((task, name, seed, iou))
                print(f"{task:16s} seed {seed} {name:48s} IoU {iou:.3f}", flush=True)
    return rows


def render(rows: list[tuple[str, str, int, float]], package: Path, seconds: float) -> str:
    tasks = list(dict.fromkeys(r[0] for r in rows))
    seeds = sorted({r[2] for r in rows})
    values: dict[tuple[str, str], list[float]] = {}
    for task, name, _, iou in rows:
        values.setdefault((task, name), []).append(iou)
    mean = {k: float(np.mean(v)) for k, v in values.items()}
    base = "filters (rf_filters)"
    lines = ["# Live preview head: one-change variants on real EM", "",
             "Written by `python benchmarks/forest_variants.py --package runs/live_preview/" + package.name
             + f" --seeds {','.join(map(str, seeds))}` (2 CPU cores, 2 threads, {seconds / 60:.1f} min; other jobs "
             "shared the machine, so no times are given). k = 1 labelled slice, sparse strokes (1 % of it); "
             "held-out foreground IoU on every other evaluation slice, mean ± standard deviation over the stroke "
             f"seeds {', '.join(map(str, seeds))}, and in brackets the change against the plain forest with the "
             f"same strokes (mean). Encoder features from `{package.name}` (AFFMAE-tiny pretrained for 300 steps "
             "on the two VNC stacks, loss at the flat-patch floor).", "",
             "| variant | " + " | ".join(P.TASKS[t].title for t in tasks) + " |",
             "| --- |" + " ---: |" * len(tasks)]
    for name in VARIANTS:
        cells = []
        for t in tasks:
            v = values[(t, name)]
            cell = f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
            if name != base:
                cell += f" ({mean[(t, name)] - mean[(t, base)]:+.3f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    better = [n for n in VARIANTS if n != base and all(mean[(t, n)] >= mean[(t, base)] + 0.02 for t in tasks)]
    lines += ["", "Variants better than the plain forest by at least 0.02 IoU on every task: "
              + (", ".join(better) if better else "**none**") + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="AFFMAE package whose encoder gives features")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--tasks", default=",".join(P.TASKS))
    parser.add_argument("--seeds", default="0,1,2", help="stroke seeds, comma-separated (default: 0,1,2)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "forest-variants.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = run(args.data_dir or P.default_data_dir(REPO), args.package, args.tasks.split(","),
               [int(v) for v in args.seeds.split(",")])
    args.out.write_text(render(rows, args.package, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
