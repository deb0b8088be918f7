"""What holds AFFMAE pretraining back with few labels? One-change variants of the real-EM benchmark.

    python benchmarks/em_ablation.py                                   # all variants, VNC mito, k = 1
    python benchmarks/em_ablation.py --reference runs/em_segmentation/results.json   # reuse its reference

Variants: reference, raw_pixels (norm_pix_loss = false), mask_75, keep_70, steps_x3, no_refine.
Writes docs/results-ablations.md and runs/em_ablation/ablations.json; code in
`napari_affmae.bench.em_ablation`.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench.em_ablation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/em_ablation.py"))
