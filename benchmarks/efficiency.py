"""Efficiency benchmark of AFFMAE vs ViT-MAE, UM-MAE and GreenMIM (same as ``affmae bench efficiency``).

    python benchmarks/efficiency.py --out docs/benchmarks.md                # CPU, tiny models
    python benchmarks/efficiency.py --device cuda --precision bf16 --size small --out docs/benchmarks.md
    python benchmarks/efficiency.py --resolutions 256,512 --json           # raw results on stdout

The code lives in `napari_affmae.bench.efficiency`; see ``--help`` for every option.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for folder in ("src", "kernels"):  # runnable from a plain checkout, too
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))

from napari_affmae.bench.efficiency import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/efficiency.py"))
