"""Efficiency benchmark of AFFMAE vs ViT-MAE, UM-MAE and GreenMIM, and the page docs/benchmarks.md.

    python benchmarks/efficiency.py --out docs/benchmarks.md                # CPU, tiny models
    python benchmarks/efficiency.py --device cuda --precision bf16 --size small --out docs/benchmarks.md
    python benchmarks/efficiency.py --resolutions 256,512 --json           # raw results on stdout
    python benchmarks/efficiency.py --from-json results.json --out docs/benchmarks.md   # page from saved results

Measures with `napari_affmae.bench.efficiency` (the same options and output as
``affmae bench efficiency``) and writes the Markdown page with its plots: one section per
(device type, size, precision); a run replaces its own section and keeps the others, so CPU and
GPU results live side by side. ``--help`` lists every option.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench.efficiency import (  # noqa: E402
    BOUND_LABEL, BOUND_NOTE, METRICS, BenchResult, build_parser, grid, notes, number_text, params_rows,
    print_result, result_from_args)
from napari_affmae.bench.flops import DENSE, KNN, MERGE, NEIGHBORHOOD, SDPA  # noqa: E402

PROG = "python benchmarks/efficiency.py"
TARGET_RESOLUTION = 1024
GPU_COMMAND = f"{PROG} --device cuda --precision bf16 --size small --out docs/benchmarks.md"


def _md_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    align = ["---"] + [("---:" if numeric else "---")] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ targets

def _ratios_over_resolutions(result: BenchResult, family: str, metric: str) -> list[tuple[int, float]]:
    out = []
    for r in result.config.resolutions:
        ratio = result.ratio(family, r, metric)
        if ratio is not None:
            out.append((r, ratio))
    return out


def _at_target(series: list[tuple[int, float]]) -> tuple[int, float] | None:
    for r, v in series:
        if r == TARGET_RESOLUTION:
            return r, v
    return series[-1] if series else None


def targets(result: BenchResult) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows of AFFMAE's efficiency targets."""
    rows = []
    on_gpu = result.environment.get("device_type") == "cuda"
    flops = _ratios_over_resolutions(result, "affmae", "flops_train")
    at = _at_target(flops)
    if at:
        growing = len(flops) > 1 and all(b[1] > a[1] for a, b in zip(flops, flops[1:]))
        series = ", ".join(f"{v:.2f}x @ {r}^2" for r, v in flops)
        trend = ("growing" if growing else "not growing") if len(flops) > 1 else "one resolution only"
        met = at[1] >= 7 and growing and at[0] == TARGET_RESOLUTION
        rows.append(("FLOPs ratio ViT-MAE / AFFMAE >= 7 at 1024^2 (training step), growing with resolution",
                     f"{series} ({trend})", "met" if met else "not met"))
    seg = _ratios_over_resolutions(result, "affmae", "flops_seg")
    if seg:
        rows.append(("(for reference) FLOPs ratio ViT-MAE / AFFMAE, segmentation forward",
                     ", ".join(f"{v:.2f}x @ {r}^2" for r, v in seg), "-"))
    for metric, what in (("mem_train", "training step"), ("mem_infer", "inference")):
        series = _ratios_over_resolutions(result, "affmae", metric)
        at = _at_target(series)
        bound = _at_target(_ratios_over_resolutions(result, "affmae", f"{metric}_fused_bound"))
        if at:
            measured = f"{at[1]:.2f}x at {at[0]}^2"
            if bound:
                measured += f" (fused-kernel bound*: {bound[1]:.2f}x)"
            rows.append((f"Peak-memory ratio ViT-MAE / AFFMAE >= 2 ({what})", measured,
                         "met" if at[1] >= 2 else "not met"))
    series = _ratios_over_resolutions(result, "affmae", "ms_train")
    at = _at_target(series)
    if at:
        verdict = ("met" if at[1] >= 5 else "not met") if on_gpu else "GPU target; CPU figure for reference only"
        rows.append(("Step-time ratio ViT-MAE / AFFMAE >= 5 at 1024^2 on GPU (training step)",
                     f"{at[1]:.2f}x at {at[0]}^2 on {result.environment['device']}", verdict))
    if not on_gpu:
        rows.append(("GPU figures", "not measured on a GPU yet", f"command: `{GPU_COMMAND}`"))
    return rows


def _breakdown(result: BenchResult) -> tuple[list[str], list[list[str]]] | None:
    cells = [result.cell("affmae", r) for r in result.config.resolutions]
    cells = [c for c in cells if c is not None and c.flops_train]
    if not cells:
        return None
    names = {DENSE: "linear / conv / matmul (counter)", NEIGHBORHOOD: "neighbourhood attention (analytic)",
             MERGE: "weighted merge (analytic)", KNN: "k-NN centroid distances (analytic)",
             SDPA: "dense attention"}
    header = ["op class"] + [f"train {c.resolution}^2" for c in cells] + [f"seg {c.resolution}^2" for c in cells]
    rows = []
    for op, label in names.items():
        values = [c.flops_train_by_op.get(op, 0) / c.flops_train for c in cells]
        values += [c.flops_seg_by_op.get(op, 0) / c.flops_seg for c in cells if c.flops_seg]
        if any(values):
            rows.append([label] + [f"{100 * v:.3g} %" for v in values])
    return header, rows


def _token_vs_cluster(result: BenchResult) -> tuple[list[str], list[list[str]]] | None:
    if not {"affmae", "affmae_cluster"} <= set(result.config.families):
        return None
    header = ["resolution", "train token (GFLOP)", "train cluster", "cluster / token", "seg token (GFLOP)",
              "seg cluster", "cluster / token", "k-NN share of train FLOPs (token / cluster)"]
    rows = []
    for r in result.config.resolutions:
        tok, clu = result.cell("affmae", r), result.cell("affmae_cluster", r)
        if tok is None or clu is None or not (tok.flops_train and clu.flops_train and tok.flops_seg and clu.flops_seg):
            continue
        knn = (f"{100 * tok.flops_train_by_op.get(KNN, 0) / tok.flops_train:.3g} % / "
               f"{100 * clu.flops_train_by_op.get(KNN, 0) / clu.flops_train:.3g} %")
        rows.append([f"{r}^2", number_text(tok.flops_train / 1e9), number_text(clu.flops_train / 1e9),
                     f"{clu.flops_train / tok.flops_train:.3f}", number_text(tok.flops_seg / 1e9),
                     number_text(clu.flops_seg / 1e9), f"{clu.flops_seg / tok.flops_seg:.3f}", knn])
    return header, rows


# -------------------------------------------------------------------------------------- plots

def _plot(result: BenchResult, path: Path, solid: str, dashed: str, unit: str, scale: float, title: str) -> bool:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415
    from matplotlib.ticker import NullLocator  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    markers = "osD^v<>"
    family_handles = []
    bounds_drawn = False
    for i, info in enumerate(result.families):
        color, marker = f"C{i}", markers[i % len(markers)]
        drawn = False
        for metric, style in ((solid, "-"), (dashed, "--"), (f"{solid}_fused_bound", ":"),
                              (f"{dashed}_fused_bound", ":")):
            pts = [(c.resolution, getattr(c, metric) * scale) for c in result.cells
                   if c.family == info.key and getattr(c, metric, None)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, marker=marker, color=color, markerfacecolor="none" if style == "--" else color,
                        markersize=4 if style == ":" else 6)
                drawn = True
                bounds_drawn = bounds_drawn or style == ":"
        if drawn:
            family_handles.append(Line2D([], [], color=color, marker=marker, label=info.label))
    if not family_handles:
        plt.close(fig)
        return False
    second = "segmentation forward" if solid.startswith("flops") else "inference"
    style_handles = [Line2D([], [], color="0.3", linestyle="-", label="training step (solid)"),
                     Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="none",
                            label=f"{second} (dashed, hollow)")]
    if bounds_drawn:
        style_handles.append(Line2D([], [], color="0.3", linestyle=":", label="AFFMAE fused-kernel bound (dotted)"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(result.config.resolutions))
    ax.set_xticklabels([f"{r}" for r in result.config.resolutions])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("tile side (px), square tiles")
    ax.set_ylabel(unit)
    cfg = result.config
    ax.set_title(f"{title} - {cfg.size} models, {result.environment['device_type']}, {cfg.precision}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    legend = ax.legend(handles=family_handles, fontsize=7, loc="upper left")
    ax.add_artist(legend)
    ax.legend(handles=style_handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def write_plots(result: BenchResult, images: Path) -> list[Path]:
    """Log-log cost-vs-resolution plots (FLOPs, time, memory) -> the PNG paths written."""
    tag = f"{result.environment['device_type']}_{result.config.size}_{result.config.precision}"
    specs = (("flops", "flops_train", "flops_seg", "GFLOP", 1e-9, "FLOPs"),
             ("time", "ms_train", "ms_infer", "ms", 1.0, "Time"),
             ("memory", "mem_train", "mem_infer", "MiB", 1 / 2**20, "Peak memory added"))
    written = []
    for name, solid, dashed, unit, scale, title in specs:
        path = images / f"bench_{tag}_{name}.png"
        if _plot(result, path, solid, dashed, unit, scale, title):
            written.append(path)
    return written


# --------------------------------------------------------------------------------------- page

HEADER = """# Efficiency benchmark

AFFMAE against the seed systems (ViT-MAE, UM-MAE, GreenMIM) in the same framework, at matched
parameter count, on square one-channel tiles. Produced from a checkout by

    python benchmarks/efficiency.py --threads 1 --out docs/benchmarks.md   # CPU, tiny models
    {gpu_command}

Each run replaces its own section (device type, size, precision) and keeps the others. `--json`
prints the raw results. After `pip install`, `affmae bench efficiency` takes the same options,
measures the same and prints the same tables (`--out FILE.json` keeps the results).
Which tensors make AFFMAE's peak memory, and what was done about it: [memory-profile.md](memory-profile.md).

{gpu_status}

## How it is measured

* **Models.** `<family>_<size>` from the model registry, each family with its own default
  masking: AFFMAE 50 % blob masks, ViT-MAE 75 % random, UM-MAE uniform sampling (75 %, plus
  25 % secondary masking), GreenMIM 75 % of 64-px units (`--mask-ratio` overrides the ratio of
  the three that have one). Segmentation variants: `task="segmentation"`, 2 classes.
* **Training step** = forward + loss + backward of the pretraining model on one tile (the mask
  is drawn beforehand, as the data pipeline does; no optimiser step). **Inference** = one forward
  of the segmentation model in inference mode. Time: median of `--repeats` runs after one
  warm-up run, device synchronised. Runs predicted to exceed `--max-step-seconds` (the last
  measured time scaled linearly with the pixel count, a lower bound for every family) are
  skipped and the reason is listed. On a CPU shared with other jobs use `--threads 1`:
  oversubscribed intra-op threads made steps up to 20x slower on the 2-core machine of the CPU run.
* **Ratios** are ViT-MAE / family: above 1 the family is cheaper than ViT-MAE.
* **FLOPs** (`napari_affmae.bench.flops`): 1 multiply-accumulate = 2 FLOPs. Counted: matrix
  products and convolutions (`torch.utils.flop_counter.FlopCounterMode`: mm, addmm, bmm,
  convolution and their backward), attention, AFFMAE's neighbourhood ops and k-NN distances. Not
  counted, for every family alike: element-wise work (softmax, GELU, norms, masking), sorting /
  top-k, gathers. A training step is counted op by op as executed (forward + backward, about 3x
  the forward). Formulas for what the counter cannot see (B batch, H heads, Nq queries, Nk keys,
  M = 64 neighbours, D head dim, G = 4 merge groups, C channels, Nc centroids):
  * dense attention (SDPA): torch's own formulas, forward `4 B H Nq Nk D`, backward 2.5x forward
    (flash style, scores recomputed). Note: on CPU, `FlopCounterMode` has no entry for the CPU
    flash-attention kernel and silently counts 0 for it; the benchmark adds it.
  * neighbourhood attention: forward `2 B H Nq D (M + 1)` (QK^T over M neighbours + the blank key)
    `+ 2 B H Nq M D` (PV), i.e. about `4 B H Nq M D`; backward = 2x the forward products + one
    recomputed QK^T (the Triton kernel's work, same convention as dense attention). This forward
    formula equals what `FlopCounterMode` counts on the PyTorch reference (gather + einsum), exactly
    (tested); the blank value enters by a scaled add, element-wise, not counted. In cluster mode
    `Nq` is padded to whole clusters.
  * weighted merge: forward `2 B N' M G C`, backward 2x forward.
  * k nearest centroids: `5 B Nq Nc` (per query-centroid pair: 2 subtractions, 2 squares, 1 add);
    the sort is not counted; no backward. Token mode searches per query, cluster mode per cluster
    of 8 queries.
  To count 2048^2 tiles on a CPU, these ops run as shape-only stand-ins while counting (zeros
  out, analytic FLOPs in); a test checks the stand-in count equals a full run of every family
  under the counter with the reference kernels.
* **Peak memory** added by one call, above what was allocated before it (weights, input):
  CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus
  `memory_allocated` before; CPU (Linux) the process's peak resident set size (`VmHWM`, reset
  through `/proc/self/clear_refs` before the call, after `gc.collect()` + glibc `malloc_trim`),
  minus the resident size before the call. CPU figures count everything the process touches
  (tensors, kernel workspaces, allocator overhead); `tracemalloc` cannot see torch's memory.
* **CPU caveat.** On CPU, AFFMAE's neighbourhood ops run on the PyTorch reference backend
  (gather + einsum materialises `[B, H, Nq, M, D]` neighbour tensors), so CPU time and memory
  say little about the Triton kernels; the FLOP ratios do not depend on the device. The
  "fused-kernel bound" rows measure AFFMAE again with shape-only neighbourhood ops (nothing
  materialised): what the model needs besides the kernels.

## Reading the numbers

* Matched parameters are not matched work: ViT-MAE and UM-MAE decode with global attention over
  every lattice position (quadratic in the pixel count), AFFMAE decodes only the masked
  positions with neighbourhood attention (linear), GreenMIM's MAE decoder runs on its 64-px
  unit grid (1/64 of the lattice). For segmentation, UM-MAE and GreenMIM use their pyramid + a
  fusion neck + a per-patch head with no decoder, while AFFMAE runs its decoder at every lattice
  position plus a full-resolution refinement.
* Each family keeps its own masking (AFFMAE 50 %, the others 75 %). For FLOPs at a matched
  ratio: `affmae bench efficiency --flops-only --mask-ratio 0.75` (or `0.5`).
* AFFMAE's k-NN search compares every query with every centroid: `5 B Nq Nc` grows with the
  square of the pixel count (see its share in "Where AFFMAE's FLOPs go").
"""

_BLOCK = re.compile(r"<!-- bench:(?P<key>[\w.-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=key) -->\n", re.S)


def _block_key(result: BenchResult) -> str:
    return f"{result.environment['device_type']}-{result.config.size}-{result.config.precision}"


def render_block(result: BenchResult, images: Path, page_dir: Path) -> str:
    """Markdown section of one run (tables, targets, breakdown, plots, notes)."""
    cfg, env = result.config, result.environment
    device_word = "GPU" if env["device_type"] == "cuda" else "CPU"
    lines = [f"## {device_word}: {cfg.size} models, {cfg.precision} ({env['date']})", ""]
    lines += [f"* Device: {env['device']}; torch {env['torch']}, {env['torch_threads']} thread(s), "
              f"{env['cpu_count']} CPU(s) visible; batch {cfg.batch}; {cfg.repeats} timed run(s) after a warm-up.",
              f"* Command: `{env.get('command', 'run_benchmark(...)')}` ({env.get('seconds', '?')} s in all)."]
    if "load_average_start" in env:
        lines.append(f"* Load average at start / end: {env['load_average_start']} / {env.get('load_average_end')} "
                     "(a shared machine: timings are noisy)." if env["device_type"] == "cpu" else
                     f"* Load average at start / end: {env['load_average_start']} / {env.get('load_average_end')}.")
    lines.append(f"* Memory method: {env['memory_method']}.")
    lines += ["", "### Targets", "",
              _md_table(["target", "measured", "verdict"], [list(r) for r in targets(result)], numeric=False), "",
              "### Parameters", "", _md_table(*params_rows(result))]
    for metric, title, unit, scale in METRICS:
        lines += ["", f"### {title} [{unit}]", "", "Each cell: value (xR), R = ViT-MAE / family.", "",
                  _md_table(*grid(result, metric, scale))]
        if any(r[0] == BOUND_LABEL for r in grid(result, metric, scale)[1]):
            lines += ["", BOUND_NOTE]
    breakdown = _breakdown(result)
    if breakdown:
        lines += ["", "### Where AFFMAE's FLOPs go", "", _md_table(*breakdown)]
    tvc = _token_vs_cluster(result)
    if tvc and tvc[1]:
        lines += ["", "### AFFMAE neighbourhoods: per token vs per cluster", "",
                  "Same model, `neighborhood=\"token\"` (each query its own 8 nearest clusters) vs "
                  "`\"cluster\"` (the 8 queries of a cluster share their centroid's neighbourhood, so the "
                  "attention tile is a dense `[8 x 64]` block for tensor cores). The attention FLOPs are the "
                  "same up to cluster padding; the k-NN search runs per cluster instead of per query. The "
                  "speed difference is a GPU-kernel matter (`benchmarks/kernels.py`).", "", _md_table(*tvc)]
    plots = write_plots(result, images)
    if plots:
        lines += ["", "### Cost vs resolution (log-log)", ""]
        lines += [f"![{p.stem}]({Path(os.path.relpath(p, page_dir)).as_posix()})" for p in plots]
    remarks = notes(result)
    if remarks:
        lines += ["", "### Notes", ""] + [f"* {n}" for n in remarks]
    return "\n".join(lines) + "\n"


def write_page(result: BenchResult, out: Path, images: Path) -> Path:
    """Write or update the Markdown page ``out`` (this run's section replaced, others kept) + plots."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, str] = {}
    if out.exists():
        for match in _BLOCK.finditer(out.read_text(encoding="utf-8")):
            blocks[match["key"]] = match["body"]
    blocks[_block_key(result)] = render_block(result, Path(images), out.parent)
    has_gpu = any(k.startswith("cuda") for k in blocks)
    gpu_status = ("GPU sections below were measured on the device named in each." if has_gpu else
                  "**Not measured on a GPU yet.** The runs on this page ran on CPUs, so the step-time target "
                  f"(>= 5x at 1024^2 on GPU) is open. A GPU run adds its section: `{GPU_COMMAND}`.")
    text = HEADER.format(gpu_command=GPU_COMMAND, gpu_status=gpu_status)
    order = sorted(blocks, key=lambda k: (not k.startswith("cuda"), k))
    for key in order:
        text += f"\n<!-- bench:{key} -->\n{blocks[key]}<!-- /bench:{key} -->\n"
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Measure (or read ``--from-json``), print the table (or JSON), write the page ``--out`` + plots."""
    parser = build_parser(PROG, results_file=False)
    parser.add_argument("--out", type=Path, default=None,
                        help="write/update this Markdown page (e.g. docs/benchmarks.md) and its plots")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of the plots (default: images/ next to --out)")
    args = parser.parse_args(argv)
    try:
        result = result_from_args(args, argv, PROG)
    except (ValueError, OSError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print_result(result, args.json)
    if args.out is not None:
        images = args.images if args.images is not None else args.out.parent / "images"
        write_page(result, args.out, images)
        if not args.quiet:
            sys.stderr.write(f"wrote {args.out} and plots in {images}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
