"""Importing the widgets does no heavy work (no optimiser, no Triton, no torch._dynamo); the first
widget that opens does the warm-up once."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_widgets_builds_no_optimiser_and_imports_no_triton():
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys, torch.optim\n"
            "built = []\n"
            "init = torch.optim.AdamW.__init__\n"
            "torch.optim.AdamW.__init__ = lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1]\n"
            "import napari_affmae.widgets\n"
            "print(len(built), 'torch._dynamo' in sys.modules, 'triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["0", "False", "False"]


def test_the_first_widget_warms_up_once(make_napari_viewer, dock, monkeypatch):
    from napari_affmae.widgets import BatchWidget, SegmentWidget, _preload

    calls = []
    monkeypatch.setattr(_preload, "_warmed_up", False)
    monkeypatch.setattr(_preload, "preload_triton", lambda: calls.append("triton"))
    monkeypatch.setattr(_preload, "warm_up_imports", lambda: calls.append("imports"))
    viewer = make_napari_viewer()
    dock(viewer, SegmentWidget)
    dock(viewer, BatchWidget)
    assert calls == ["triton", "imports"]
