"""Real-EM few-label segmentation benchmark: AFFMAE pretrained vs from scratch, ViT-MAE, U-Net.

    python benchmarks/em_segmentation.py                       # default: VNC mitochondria, k = 1, 4, CPU
    python benchmarks/em_segmentation.py --tasks all --k 1,2,4,all --regimes sparse,dense \
        --seeds 0,1,2 --size small --device cuda --pretrain-steps 3000 --finetune-steps 1000

Data from ``--data-dir`` (default $AFFMAE_DATA or ../shared/data); writes docs/results.md, its
PNGs in docs/images/ and runs/em_segmentation/results.json. The code lives in
`napari_affmae.bench.em_segmentation` (protocol in `napari_affmae.bench.em_protocol`).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench.em_segmentation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/em_segmentation.py"))
