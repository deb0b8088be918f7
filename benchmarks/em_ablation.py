"""What holds AFFMAE pretraining back with few labels? One-change variants of the real-EM benchmark.

    python benchmarks/em_ablation.py                                   # all variants, VNC mito, k = 1
    python benchmarks/em_ablation.py --reference runs/em_segmentation/results.json   # reuse its reference
    python benchmarks/em_ablation.py --probe-only --work-dir runs/em_ablation     # probe again, rewrite the page

Variants: reference, raw_pixels (norm_pix_loss = false), mask_75, keep_70, steps_x3, no_refine.
Runs `napari_affmae.bench.em_ablation` (the same options as ``affmae bench ablation``) on the data
of ``--data-dir``, ``$AFFMAE_DATA`` or the repository's ../shared/data, and writes the page
``--out`` (default docs/results-ablations.md) and WORK_DIR/ablations.json.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench import em_protocol as P  # noqa: E402
from napari_affmae.bench.em_ablation import (  # noqa: E402
    TABLE_HEADER, build_parser, exit_code, failures, results_from_args, save_results, table_rows)

PROG = "python benchmarks/em_ablation.py"
DATA_DIR = REPO.parent / "shared" / "data"  # where a checkout keeps the EM data, beside the repository


def render_page(results: dict[str, Any], command: str) -> str:
    """The Markdown page of a study's results."""
    cfg, env = results["config"], results["environment"]
    lines = [
        "# AFFMAE pretraining variants on real EM", "",
        "Written by `python benchmarks/em_ablation.py` (`napari_affmae.bench.em_ablation`). Each variant changes "
        "one thing of the AFFMAE pretrained arm of the [real-EM benchmark](results.md) and keeps its fine-tuning "
        "budget; the difference column is against AFFMAE from scratch (the matching scratch model where the "
        "variant changes the segmentation model).", "",
        f"Command: `{command}`", "",
        f"Machine: {env['machine']} ({env['platform']}, {env['cpu_count']} CPU cores, {env['torch_threads']} torch "
        f"threads); device: **{env['device']}**" + (f" ({env['gpu']})" if env.get("gpu") else "") + ".", "",
        f"Setting: {P.TASKS[cfg['task']].title}, k = {cfg['k']} labelled slice(s), {cfg['regime']} labels, seed "
        f"{cfg['seed']}, affmae_tiny; pretraining {cfg['pretrain_steps']} steps (x factor), fine-tuning "
        f"{cfg['finetune_steps']} steps, batch {cfg['batch_size']}, crops {cfg['crop']} px, tiles {cfg['tile']} px.",
        "", "Reconstruction probe: the pretrained model's loss on 16 fixed batches of crops from the evaluation "
        "slices (same masks for all), next to the loss of the trivial predictor that fills every masked patch "
        "flat at the visible mean; a ratio below 1 means the model predicts more than flat patches.", "",
        "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(results)]
    errors = [f"- {line}" for line in failures(results)]
    if errors:
        lines += [""] + errors
    lines += ["", "One seed: differences of a few hundredths of IoU are within seed-to-seed noise.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the variants (or ``--probe-only``), write the page and WORK_DIR/ablations.json."""
    parser = build_parser(PROG, results_file=False)
    parser.add_argument("--out", type=Path, default=Path("docs") / "results-ablations.md", help="Markdown page")
    args = parser.parse_args(argv)
    try:
        results = results_from_args(args, argv, PROG, DATA_DIR)
    except (ValueError, FileNotFoundError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_page(results, results["command"]), encoding="utf-8")
    saved = save_results(results, args.work_dir / "ablations.json")
    sys.stderr.write(f"wrote {args.out} and {saved}\n")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
