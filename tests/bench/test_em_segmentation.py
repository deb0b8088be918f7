"""End-to-end smoke test of the real-EM benchmark script on a tiny synthetic data directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_affmae.bench import em_segmentation as S
from napari_affmae.data import MEMBRANE, MITOCHONDRION, synthetic_em
from napari_affmae.models import create_model

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """The real layout (vnc/, isbi2012/) with 6 x 96 x 96 synthetic stacks."""
    root = tmp_path / "data"
    image, classes = synthetic_em((6, 96, 96), seed=1, cell_size=24.0)
    other, _ = synthetic_em((6, 96, 96), seed=2, cell_size=24.0)
    _write(root / "vnc" / "stack1_raw.tif", image)
    _write(root / "vnc" / "stack1_mito.tif", (classes == MITOCHONDRION).astype(np.uint8))
    _write(root / "vnc" / "stack1_membranes.tif", (classes == MEMBRANE).astype(np.uint8))
    _write(root / "vnc" / "stack2_raw.tif", other)
    return root


def test_script_runs_end_to_end_and_writes_the_page(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "results.md"
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "benchmarks" / "em_segmentation.py"), "--data-dir", str(tiny_data_dir),
           "--work-dir", str(work), "--out", str(out), "--tasks", "vnc_mito,vnc_membranes", "--k", "1",
           "--regimes", "sparse", "--pretrain-steps", "2", "--finetune-steps", "2", "--batch-size", "2",
           "--crop", "32", "--tile", "64", "--device", "cpu", "--threads", "1"]
    env = dict(os.environ, AFFMAE_DATA=str(tmp_path / "nowhere"))  # the option wins over the variable
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    assert results["splits"]["vnc_mito"]["eval_slices"] == [3, 4, 5]
    assert results["splits"]["vnc_mito"]["labelled"] == {"1": [1]}
    runs = results["runs"]
    assert len(runs) == 2 * len(S.ARMS)  # tasks x arms
    for run in runs:
        assert run["scores"] is not None or run["error"], run
        if run["scores"] is not None:
            assert run["scores"]["eval_slices"] == [3, 4, 5]
            assert 0.0 <= run["scores"]["fg_iou"] <= 1.0
            assert ("boundary_f1" in run["scores"]) == (run["task"] == "vnc_membranes")
            assert 0 < run["labelled_fraction"] < 0.05  # sparse strokes
    scored = {r["arm"] for r in runs if r["scores"] is not None}
    assert {"affmae_pretrained", "affmae_scratch", "unet_scratch"} <= scored
    page = out.read_text()
    assert "| VNC mitochondria | sparse | 1 | unet_scratch |" in page
    assert "doi:10.6084/m9.figshare.856713" in page and "device: **cpu**" in page
    assert "evaluated on z [3, 4, 5]" in page
    for png in ("results_iou_vs_k.png", "results_overlays.png"):
        assert (out.parent / "images" / png).stat().st_size > 1000


def test_bad_options_give_a_clear_error(tmp_path: Path, capsys) -> None:
    assert S.main(["--data-dir", str(tmp_path), "--tasks", "nuclei", "--out", str(tmp_path / "r.md")]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert S.main(["--data-dir", str(tmp_path), "--work-dir", str(tmp_path / "w"),
                   "--out", str(tmp_path / "r.md"), "--quiet"]) == 2
    assert "stack1_raw.tif" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_unet_baseline_is_segmentation_only() -> None:
    import torch

    model = create_model("unet_tiny", task="segmentation", num_classes=3)
    x = torch.randn(2, 1, 40, 72)  # rectangle, multiples of 8
    assert model(x).shape == (2, 3, 40, 72)
    with pytest.raises(ValueError, match="segmentation model only"):
        create_model("unet_tiny", task="mae")
    with pytest.raises(ValueError, match="multiple"):
        model(torch.randn(1, 1, 36, 40))
    with pytest.raises(ValueError, match="no pretrained"):
        model.load_encoder_from(create_model("affmae_tiny"))
