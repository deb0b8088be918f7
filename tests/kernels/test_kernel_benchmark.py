"""The kernel benchmark runs end to end and writes its page and plot (tiny CPU run)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_writes_page_and_plot(tmp_path):
    page, plot = tmp_path / "kernels.md", tmp_path / "plot.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AFFMAE_KERNELS", "TRITON_INTERPRET"))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--device", "cpu", "--sizes", "64,128",
         "--modes", "token,cluster", "--heads", "2", "--repeats", "1", "--warmup", "1", "--no-compile-report",
         "--out", str(page), "--plot", str(plot)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = page.read_text()
    assert "CPU only" in text and "Not measured on a GPU yet" in text
    assert "| B1 H2 N128 M64 D32 | float32 | cluster | reference |" in text
    assert "| B1 H2 N64 M64 D32 | float32 | dense | sdpa |" in text
    assert "BH·e·(4·N·D + N·M)" in text  # roofline formulas for the GPU run
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
