"""Real-EM few-label segmentation benchmark and its page docs/results.md.

    python benchmarks/em_segmentation.py                       # default: VNC mitochondria, k = 1, 4, CPU
    python benchmarks/em_segmentation.py --tasks all --k 1,2,4,all --regimes sparse,dense \\
        --seeds 0,1,2 --size small --device cuda --pretrain-steps 3000 --finetune-steps 1000
    python benchmarks/em_segmentation.py --render-only runs/a/results.json runs/b/results.json

Runs `napari_affmae.bench.em_segmentation` (the same options as ``affmae bench segmentation``;
protocol in `napari_affmae.bench.em_protocol`) on the data of ``--data-dir``, ``$AFFMAE_DATA`` or
the repository's ../shared/data, and writes the page ``--out`` (default docs/results.md), its PNGs
in images/ next to it, and WORK_DIR/results.json.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench import em_protocol as P  # noqa: E402
from napari_affmae.bench.em_segmentation import (  # noqa: E402
    ARMS, NO_NETWORK, RunRecord, build_parser, command_line, config_from_args, exit_code, has_rounds, masking_for,
    read_results, run_benchmark, save_figure, save_results, summarise_runs)
from napari_affmae.bench.tables import stat_text  # noqa: E402

PROG = "python benchmarks/em_segmentation.py"
DATA_DIR = REPO.parent / "shared" / "data"  # where a checkout keeps the EM data, beside the repository
TIE_IOU = 0.01  # IoU differences at or below this count as ties in the verdict
ABLATION_PAGE = "results-ablations.md"  # written by benchmarks/em_ablation.py next to the results page


def plot_iou_vs_k(results: dict[str, Any], path: Path) -> None:
    """Foreground IoU (mean ± std over seeds) vs number of labelled slices, one panel per task x regime."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = results["summary"]
    panels = sorted({(r["task"], r["regime"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, regime) in zip(axes[0], panels):
        panel = [r for r in rows if r["task"] == task and r["regime"] == regime]
        if len({r["n_labelled"] for r in panel}) == 1:  # one k: a bar per arm
            _bars(ax, panel)
            ax.set_title(f"{P.TASKS[task].title}, {regime} labels, k = {panel[0]['k']}", fontsize=9)
            continue
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
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def _bars(ax: Any, rows: list[dict[str, Any]]) -> None:
    """One bar per arm (mean foreground IoU, sample std over seeds as the error bar) for a single k."""
    rows = sorted((r for r in rows if r["fg_iou"]["mean"] is not None), key=lambda r: list(ARMS).index(r["arm"]))
    means = [r["fg_iou"]["mean"] for r in rows]
    ax.bar(range(len(rows)), means, yerr=[r["fg_iou"]["std"] or 0.0 for r in rows], capsize=3,
           color=["tab:red" if r["arm"] in NO_NETWORK else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("foreground IoU (held-out slices)")
    ax.grid(alpha=0.3, axis="y")


def plot_iou_vs_round(results: dict[str, Any], path: Path) -> None:
    """Foreground IoU (mean ± std over seeds) after each correction round, one panel per (task, regime, k)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in results["summary"] if len(r.get("rounds") or []) > 1]
    panels = sorted({(r["task"], r["regime"], str(r["k"])) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, regime, k) in zip(axes[0], panels):
        for r in sorted((r for r in rows if (r["task"], r["regime"], str(r["k"])) == (task, regime, k)),
                        key=lambda r: list(ARMS).index(r["arm"])):
            pts = [(x["round"], x["fg_iou"]["mean"], x["fg_iou"]["std"] or 0.0) for x in r["rounds"]
                   if x["fg_iou"]["mean"] is not None]
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=r["arm"],
                        linestyle="--" if r["arm"] in NO_NETWORK else "-")
        ax.set_title(f"{P.TASKS[task].title}, {regime}, k = {k}", fontsize=9)
        ax.set_xlabel("correction round")
        ax.set_ylabel("foreground IoU (held-out slices)")
        ax.set_xticks(range(max(len(r["rounds"]) for r in rows)))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def round_table(results: dict[str, Any]) -> list[str]:
    """Markdown rows: IoU after each round and each round's seconds (training + predicting the labelled slices)."""
    rows = [r for r in results["summary"] if len(r.get("rounds") or []) > 1]
    n = max(len(r["rounds"]) for r in rows)
    lines = ["| task | labels | k | arm | " + " | ".join(f"IoU round {i}" for i in range(n)) + " | seconds per round "
             "(train + look) | labelled px after the last round |", "|---|---|---|---|" + "---|" * (n + 2)]
    for r in rows:
        seconds = " / ".join(f"{(x['train_s']['mean'] or 0) + (x['look_s']['mean'] or 0):.0f}" for x in r["rounds"])
        ious = [stat_text(x["fg_iou"]) for x in r["rounds"]] + [""] * (n - len(r["rounds"]))
        lines.append(f"| {P.TASKS[r['task']].title} | {r['regime']} | {r['k']} | {r['arm']} | " + " | ".join(ious)
                     + f" | {seconds} | {r['rounds'][-1]['labelled_fraction']:.2%} |")
    return lines


def round_verdict(results: dict[str, Any]) -> str:
    """The default recipe against the forest after their last common correction round, setting by setting."""
    rows = {(r["task"], r["regime"], str(r["k"]), r["arm"]): r for r in results["summary"]
            if len(r.get("rounds") or []) > 1}
    parts = []
    for (task, regime, k, arm), row in sorted(rows.items()):
        forest = rows.get((task, regime, k, "rf_filters"))
        if arm != "affmae_taught" or forest is None:
            continue
        last = min(len(row["rounds"]), len(forest["rounds"])) - 1
        ours, theirs = row["rounds"][last]["fg_iou"]["mean"], forest["rounds"][last]["fg_iou"]["mean"]
        if None not in (ours, theirs):
            parts.append(f"{P.TASKS[task].title}, {regime}, k={k}, round {last}: {ours:.3f} vs {theirs:.3f} "
                         f"({ours - theirs:+.3f})")
    if not parts:
        return ""
    return ("After the correction rounds, `affmae_taught` against `rf_filters`, foreground IoU: " + "; ".join(parts)
            + ".")


def round_section(results: dict[str, Any], plot: str) -> list[str]:
    """The page's "Correction rounds" section: protocol, table, verdict and the plot ``plot``."""
    lines = ["", "## Correction rounds", "",
             f"After the strokes (round 0), each round predicts the labelled slice(s) and paints about "
             f"{P.CORRECTION_FRACTION:.2%} of each where the prediction is most wrong (inside the largest "
             "false-positive regions as background, the largest false-negative regions as structure; same 3 px "
             "brush, deterministic in the seed; `em_protocol.correction_strokes`). The forest and the "
             "threshold are refitted on every stroke so far; the networks train "
             f"{results['config'].get('round_steps', 50)} more steps from where they stopped (the taught "
             "arms on every stroke plus the forest's confident pixels they were taught in round 0, the strokes "
             "winning: `engine.taught_labels`). Seconds per "
             "round = training on every stroke so far + predicting the labelled slice(s), what a person "
             "waits for; scoring the held-out slices is not included.", ""]
    return lines + round_table(results) + ["", round_verdict(results), "",
                                           f"![foreground IoU vs correction round]({plot})"]


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
        return (recipe_verdict(rows) + "No 1-2-slice comparison of AFFMAE pretrained vs from scratch was run."
                + _threshold_verdict(rows))
    head = (f"AFFMAE pretraining beat AFFMAE from scratch by more than {TIE_IOU} foreground IoU in {wins} of "
            f"{total} settings with 1-2 labelled slices" if wins else
            f"AFFMAE pretraining did **not** beat AFFMAE from scratch by more than {TIE_IOU} foreground IoU "
            "with 1-2 labelled slices in this run")
    seeds = len(results["config"]["seeds"])
    tail = "" if seeds > 1 else " One seed only: differences of a few hundredths are within seed-to-seed noise."
    return recipe_verdict(rows) + head + " (" + "; ".join(lines) + ")." + tail + _threshold_verdict(rows)


def recipe_verdict(rows: dict[tuple, dict[str, Any]]) -> str:
    """The default fine-tuning recipe (``affmae_taught``) against ilastik's forest and against the U-Net trained
    from scratch on the same strokes, setting by setting."""
    forest = _against(rows, "rf_filters")
    unet = _against(rows, "unet_scratch")
    text = ("The default recipe (AFFMAE trained on the strokes plus the live preview's confident pixels, "
            "`affmae_taught`) against the ilastik-style forest (`rf_filters`), foreground IoU: " + "; ".join(forest)
            + ". ") if forest else ""
    if unet:
        text += ("Against the U-Net trained from scratch on the same strokes (`unet_scratch`): " + "; ".join(unet)
                 + ". ")
    return text


def _against(rows: dict[tuple, dict[str, Any]], other: str) -> list[str]:
    """``affmae_taught`` vs ``other`` in every setting where both have a mean: 'task, regime, k: a vs b (...)'."""
    parts = []
    for (task, regime, k, arm), row in sorted(rows.items()):
        them = rows.get((task, regime, k, other))
        if arm != "affmae_taught" or them is None or None in (row["fg_iou"]["mean"], them["fg_iou"]["mean"]):
            continue
        ours, theirs = row["fg_iou"]["mean"], them["fg_iou"]["mean"]
        parts.append(f"{P.TASKS[task].title}, {regime}, k={k}: {ours:.3f} vs {theirs:.3f} ({ours / theirs:.2f}x, "
                     f"{ours - theirs:+.3f})")
    return parts


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
        "# Real-EM evaluation: few labels, AFFMAE against ilastik's forest, a U-Net and a threshold", "",
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
        f"{_masking_text(cfg, 'vit_mae')}, same images and steps), `unet_scratch` (plain U-Net), all on the strokes "
        "only; `affmae_taught` and `unet_taught` (the fine-tuning default): from scratch on the strokes plus every "
        "pixel of the labelled slices that the live preview's forest (filter features, posteriors corrected "
        "toward the class shares it estimates near the strokes) gives a class probability >= "
        f"{cfg.get('pseudo_label_confidence', 0.8)}, strokes kept as painted. All fine-tuned "
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
        lines.append(f"| {P.TASKS[r['task']].title} | {r['regime']} | {r['k']} | {r['arm']} | {stat_text(r['fg_iou'])} "
                     f"| {stat_text(r['fg_dice'])} | {stat_text(r['bg_iou'])} | {stat_text(r['boundary_f1'])} "
                     f"| {r['labelled_fraction']:.1%} | {stat_text(r['finetune_s'], 0)} | {stat_text(r['inference_s'], 0)} |")
    if results["pretraining"]:
        lines += ["", "Pretraining (shared by all k and label regimes of a task and seed):", "",
                  "| task | seed | model | steps | first loss | final loss | s |", "|---|---|---|---|---|---|---|"]
    for p in results["pretraining"]:
        if "error" in p:
            lines.append(f"| {p['task']} | {p['seed']} | {p['model']} | failed: {p['error']} | | | |")
        else:
            lines.append(f"| {p['task']} | {p['seed']} | {p['model']} | {p['steps']} | {p['first_loss']:.4f} "
                         f"| {p['final_loss']:.4f} | {p['seconds']:.0f} |")
    if "rounds" in images:
        lines += round_section(results, images["rounds"])
    lines += ["", "## Verdict", "", verdict(results), ""]
    if "ablations" in images:
        lines += [f"Variants of AFFMAE pretraining (mask ratio, keep rate, target, steps, refinement head): "
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
    if has_rounds(results["summary"]):
        rounds_png = image_dir / "results_iou_vs_round.png"
        plot_iou_vs_round(results, rounds_png)
        images["rounds"] = f"images/{rounds_png.name}"
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




def _render_only(paths: Sequence[Path], out: Path) -> int:
    try:
        results = merge_results([read_results(p) for p in paths], [str(p) for p in paths])
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stderr.write(f"wrote {write_report(results, out, results['command'])}\n")
    return 0


# config fields that may differ between runs merged into one page (the page lists the union of tasks, seeds and
# label counts, and the most correction rounds; rows without rounds stay out of the round table)
MERGEABLE = ("arms", "work_dir", "threads", "tasks", "seeds", "ks", "rounds")


def _k_order(k: Any) -> float:
    """Sort key of a label count: integers in order, 'all' last."""
    return float("inf") if str(k) == "all" else float(k)


def merge_results(parts: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """One results dict from runs of the same setting and budget that ran different arms, tasks or seeds."""
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
    tasks = [t for t in P.TASKS if any(t in part["config"]["tasks"] for part in parts)]
    seeds = sorted({s for part in parts for s in part["config"]["seeds"]})
    ks = sorted({str(k) for part in parts for k in part["config"]["ks"]}, key=_k_order)
    cfg = {**first["config"], "tasks": tasks, "seeds": seeds, "ks": [k if k == "all" else int(k) for k in ks],
           "rounds": max(part["config"].get("rounds", 0) for part in parts)}
    order = {"task": tasks, "regime": list(cfg["regimes"]), "k": [str(k) for k in cfg["ks"]], "arm": list(ARMS)}
    runs = sorted((r for part in parts for r in part["runs"]),  # the order a single run would have
                  key=lambda r: (order["task"].index(r["task"]), r["seed"], order["regime"].index(r["regime"]),
                                 order["k"].index(str(r["k"])), order["arm"].index(r["arm"])))
    arms = [a for a in ARMS if any(a in part["config"]["arms"] for part in parts)]
    records = [RunRecord(**r) for r in runs]
    overlays: dict[str, Any] = {}
    for part in parts:  # the overlays show the smallest k: those of runs that started elsewhere stay out
        if min((_k_order(k) for k in part["config"]["ks"]), default=0) != _k_order(ks[0]):
            continue
        for task, item in part.get("overlays", {}).items():
            mine = overlays.setdefault(task, {**item, "pred": {}})
            if mine["slice"] == item["slice"]:
                mine["pred"].update(item["pred"])
    merged = {
        **first, "config": {**cfg, "arms": arms}, "runs": runs, "summary": summarise_runs(records),
        "splits": {task: split for part in parts for task, split in part["splits"].items()},
        "pretraining": [p for part in parts for p in part["pretraining"]],
        "parameters": {k: v for part in parts for k, v in part.get("parameters", {}).items()},
        "total_s": sum(part["total_s"] for part in parts),
        "command": " + ".join(part.get("command", "python benchmarks/em_segmentation.py") for part in parts),
    }
    if overlays:
        merged["overlays"] = overlays
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or ``--render-only``), write the page and results.json."""
    parser = build_parser(PROG, results_file=False)
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"), help="Markdown page to write")
    parser.add_argument("--render-only", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                        help="run nothing: write the page again from the results.json of earlier runs (their "
                        "commands and the overlay PNG are kept); several runs of the same setting and budget that "
                        "ran different arms (e.g. on different machines) are merged into one page")
    args = parser.parse_args(argv)
    if not args.quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.render_only is not None:
        return _render_only(args.render_only, args.out)
    try:
        config = config_from_args(args, DATA_DIR)
        results = run_benchmark(config)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    command = command_line(argv, PROG)
    page = write_report(results, args.out, command)
    saved = save_results(results, config.work_dir / "results.json", command)
    sys.stderr.write(f"wrote {page} and {saved}\n")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
