"""Live preview benchmark: end to end on a tiny synthetic data directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_affmae import cli
from napari_affmae.bench import preview as B
from napari_affmae.engine import save_package
from napari_affmae.models import create_model


def test_bench_preview_prints_the_ratios_and_iou_by_round(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    package = save_package(create_model("affmae_tiny"), tmp_path / "pre.affmae")
    out = tmp_path / "preview.json"
    code = cli.main(["bench", "preview", "--data-dir", str(tiny_data_dir), "--tasks", "vnc_mito",
                     "--rounds", "1", "--repeats", "1", "--trees", "10", "--threads", "1",
                     "--package", f"vnc={package}", "--json", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "vnc_mito"
    for key in ("update_vs_rf", "first_preview_vs_rf"):
        assert summary[key] > 0
    assert summary["update_vs_rf"] == pytest.approx(summary["update_s"]["live"] / summary["update_s"]["rf_filters"])
    for key in ("iou_live", "iou_rf_filters"):
        assert 0.0 <= summary[key] <= 1.0
    assert set(summary["iou_by_round"]) == {"vnc_mito"}
    assert all(len(v) == 2 for arms in summary["iou_by_round"].values() for v in arms.values())  # rounds 0, 1
    results = json.loads(out.read_text())
    mito = results["tasks"]["vnc_mito"]
    assert mito["labelled_slice"] == 1 and mito["eval_slices"] == [3, 4, 5]
    rounds = mito["arms"]["live"]["rounds"]
    assert rounds[1]["painted_pixels"] > rounds[0]["painted_pixels"]  # a correction round adds strokes
    assert mito["arms"]["live"]["n_features"] > mito["arms"]["rf_filters"]["n_features"] == 20
    assert mito["arms"]["rf_filters"]["peak_rss_mb"] > 0


def test_bad_preview_options_are_refused(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    assert B.main(["--data-dir", str(tiny_data_dir), "--tasks", "nuclei"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert B.main(["--data-dir", str(tiny_data_dir), "--package", f"vnc={tmp_path / 'missing.affmae'}"]) == 2
    assert "package for vnc not found" in capsys.readouterr().err
    assert B.main(["--data-dir", str(tiny_data_dir), "--rounds", "-1"]) == 2


def test_preview_without_a_data_folder_names_the_option_and_the_variable(tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    monkeypatch.delenv("AFFMAE_DATA", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        B.parse_args([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "$AFFMAE_DATA" in err
    config, _ = B.parse_args([], fallback_data_dir=tmp_path)  # a checkout's script names its own folder
    assert config.data_dir == tmp_path
