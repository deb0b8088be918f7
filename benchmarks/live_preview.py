"""Live preview vs the ilastik-style random forest: update times, memory and IoU over correction rounds.

    python benchmarks/live_preview.py --threads 2 --seeds 0,1,2    # all three tasks, the widget's default
    python benchmarks/live_preview.py --package vnc=PKG --package isbi2012=PKG2   # plus encoder features

Measures with `napari_affmae.bench.preview` (the same code as ``affmae bench preview --json``) and
writes docs/live-preview.md, docs/images/live_preview_rounds.png and the raw results as JSON
(``--results``, default runs/live_preview/results.json). ``--render-only RESULTS.json`` rewrites
the page from earlier results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench import em_protocol as P  # noqa: E402
from napari_affmae.bench import preview as B  # noqa: E402
from napari_affmae.bench.em_segmentation import save_figure  # noqa: E402

ARM_TITLES = {"rf_filters": "rf_filters (ilastik-style: 20 filters + forest)",
              "live": "Live preview as the widget runs it (`LiveConfig()`): the same filters, computed on each "
                      "slice normalised by its own intensity percentiles, and the forest's posteriors re-weighted "
                      "to the class shares estimated on unpainted pixels near the strokes (one EM step)",
              "prior_corrected": "rf_filters with only the class-share correction",
              "slice_normalized": "rf_filters with only the per-slice normalisation"}


def plot_rounds(results: dict[str, Any], path: Path) -> None:
    """Held-out foreground IoU after each correction round, one panel per task."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.0 * len(tasks), 3.3), squeeze=False)
    for ax, (name, item) in zip(axes[0], tasks.items()):
        for arm, data in item["arms"].items():
            rounds = [r["round"] for r in data["rounds"]]
            ax.errorbar(rounds, data["iou_mean"], yerr=data["iou_std"], marker="o", capsize=3, label=arm)
        ax.set_title(P.TASKS[name].title, fontsize=9)
        ax.set_xlabel("correction round")
        ax.set_ylabel("foreground IoU (held-out slices)")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def targets(results: dict[str, Any]) -> list[str]:
    """One line per target: met or not, with the numbers."""
    summary = results["summary"]

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = [f"- update {summary['update_vs_rf']:.2f}x: {mark(summary['update_vs_rf'] <= 1.5)}",
             f"- first preview {summary['first_preview_vs_rf']:.2f}x: {mark(summary['first_preview_vs_rf'] <= 3.0)}"]
    for name, arms in summary["iou_by_round"].items():
        live, rf = arms["live"][0], arms["rf_filters"][0]
        need = rf + (0.05 if name == "vnc_mito" else 0.0)
        lines.append(f"- {P.TASKS[name].title}: live {live:.3f} vs needed {need:.3f}: {mark(live >= need)}"
                     + (f" (prior_corrected {arms['prior_corrected'][0]:.3f})" if "prior_corrected" in arms else ""))
    return lines


def render_page(results: dict[str, Any], image: str, command: str) -> str:
    env, cfg, summary = results["environment"], results["config"], results["summary"]
    lines = [
        "# Live preview vs the ilastik-style random forest",
        "",
        "The paint-look-correct loop on real EM: strokes on **one** slice (k = 1, sparse strokes covering 1 % "
        "of it, `em_protocol.training_labels(..., \"sparse\", seed)`), a forest trained on the painted pixels, "
        "held-out slices scored. After each round, about 0.25 % of the labelled slice is painted where the "
        "preview is most wrong (`em_protocol.correction_strokes`) and the forest is refitted.",
        "",
        f"- Machine: {env['processor']}, {env['cpu_count']} cores, torch {env['torch']}, "
        f"{env['torch_threads']} threads; device **cpu**; total {results['total_s'] / 60:.1f} min"
        + (f"; {env['load_note']}" if env.get("load_note") else
           f"; load average {env['load_avg_1min_at_start']:.1f} at the start" if env.get("load_avg_1min_at_start")
           is not None else "") + ".",
        f"- Command: `{command}`",
        f"- Arms: {'; '.join(f'`{a}` = {t}' for a, t in ARM_TITLES.items())}. "
        f"All use {cfg['trees']} trees. IoU: mean ± sample std over the stroke seeds {cfg['seeds']}; times: "
        f"the strokes of seed {cfg['seeds'][0]}.",
        "- Times: *first preview* = from nothing cached to the first prediction of the labelled slice (features, "
        "fit, predict); *update* = one more stroke, refit + repredict with cached features (median of "
        f"{cfg['repeats']} strokes). Peak memory: resident set of a fresh process doing both.",
        "",
        "![The Fine-tune widget with Live preview on a 1024 x 1024 VNC slice (Xvfb screenshot, "
        "docs/make_screenshots.py)](images/live-preview.png)",
        "",
        "## Headline (first task)",
        "",
        f"Task **{P.TASKS[summary['task']].title}**: update time live / rf_filters = "
        f"**{summary['update_vs_rf']:.2f}x**, first preview = **{summary['first_preview_vs_rf']:.2f}x**; "
        f"IoU at round 0: live **{summary['iou_live']:.3f}**, rf_filters **{summary['iou_rf_filters']:.3f}**.",
        "",
        "Against the targets (update <= 1.5x and first preview <= 3x rf_filters; live IoU >= rf_filters on every "
        "task and >= rf_filters + 0.05 on VNC mitochondria, round 0):",
        "",
        *targets(results),
        "",
        "What was tried on top of ilastik's forest: [forest-variants.md](forest-variants.md). The encoder "
        "features of an AFFMAE package (the widget's **AFFMAE features** box, off by default) lowered the IoU "
        "there. Two changes to ilastik's forest lift round 0 on every task, and the widget now makes both: "
        "each slice normalised by its own intensity percentiles (ISBI sections differ in mean brightness from"
        " 99 to 143 grey levels; VNC sections hardly at all), and the posteriors corrected to the class "
        "shares estimated near the strokes (strokes paint the classes about equally; mitochondria cover a few"
        " percent). Over correction rounds the class-share correction loses again on VNC (see the table): "
        "corrections are painted inside error regions, so they are not a fair sample of either class, and the"
        " shares estimated from a forest fitted on them drift. On ISBI, with per-slice normalisation, the "
        "rounds help. A rounds-robust share estimate is open work.",
        "",
        "## Per task",
        "",
        "| task | slice | arm | features | first preview (s) | update (s) | peak RSS (MiB) | IoU round 0 | "
        "round 1 | round 2 | seconds per round |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, item in results["tasks"].items():
        shape = item["shape"]
        for arm, data in item["arms"].items():
            ious = [f"{m:.3f} ± {d:.3f}" for m, d in zip(data["iou_mean"], data["iou_std"])]
            ious += ["–"] * (3 - len(ious))
            secs = " / ".join(f"{r['train_and_preview_s']:.1f}" for r in data["rounds"])
            lines.append(f"| {P.TASKS[name].title} | z={item['labelled_slice']}, {shape[1]}x{shape[2]} | {arm} | "
                         f"{data['n_features']} | {data['first_preview_s']:.1f} | {data['update_s']:.1f} | "
                         f"{data['peak_rss_mb']:.0f} | {' | '.join(ious[:3])} | {secs} |")
    lines += [
        "",
        "Seconds per round = refit on all strokes so far + predict the labelled slice (what a person waits for); "
        "scoring the held-out slices is not included.",
        "",
        f"![IoU over correction rounds]({image})",
        "",
        "Held-out slices: " + "; ".join(f"{P.TASKS[n].title} z = {i['eval_slices']}" for n, i in results["tasks"].items())
        + ". Encoder packages: " + ("; ".join(sorted({f'`{Path(i["package"]).name}`' for i in results["tasks"].values()
                                                      if i["package"]})) or "none") + ".",
        "",
        "Data: " + "; ".join(sorted({P.TASKS[n].citation for n in results["tasks"]})) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--render-only", type=Path, default=None)
    parser.add_argument("--page", type=Path, default=REPO / "docs" / "live-preview.md")
    parser.add_argument("--results", type=Path, default=Path("runs/live_preview/results.json"))
    ours, rest = parser.parse_known_args(argv)
    if ours.render_only is not None:
        results = json.loads(ours.render_only.read_text())
        command = results.get("command", "python benchmarks/live_preview.py")
    else:
        config, _ = B.parse_args(rest, prog="python benchmarks/live_preview.py",
                                 fallback_data_dir=REPO.parent / "shared" / "data")
        try:
            config.validate()
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        import logging  # noqa: PLC0415

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        results = B.run_benchmark(config)
        results["command"] = "python benchmarks/live_preview.py " + " ".join(rest)
        command = results["command"]
        ours.results.parent.mkdir(parents=True, exist_ok=True)
        ours.results.write_text(json.dumps(results, indent=1))
    image = ours.page.parent / "images" / "live_preview_rounds.png"
    plot_rounds(results, image)
    ours.page.write_text(render_page(results, f"images/{image.name}", command.strip()))
    print(json.dumps(results["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
