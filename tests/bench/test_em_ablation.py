"""Pretraining-variant study (`bench.em_ablation`) on a tiny synthetic data directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from napari_affmae.bench import em_ablation as A
from napari_affmae.engine import load_package

TINY = ["--pretrain-steps", "2", "--finetune-steps", "1", "--batch-size", "2", "--crop", "32", "--tile", "64",
        "--device", "cpu", "--max-eval-slices", "1", "--quiet"]


def test_variants_run_and_the_page_compares_each_with_its_scratch_model(tiny_data_dir: Path, tmp_path: Path,
                                                                         bench_script, capsys) -> None:
    work, out = tmp_path / "work", tmp_path / "docs" / "results-ablations.md"
    script = bench_script("em_ablation")
    code = script.main(["--data-dir", str(tiny_data_dir), "--work-dir", str(work), "--out", str(out),
                   "--variants", "steps_x3,no_refine,keep_70", *TINY])  # the reference is added
    assert code == 0
    rows = {r["variant"]: r for r in json.loads((work / "ablations.json").read_text())["rows"]}
    assert list(rows) == ["reference", "steps_x3", "no_refine", "keep_70"]
    assert rows["keep_70"]["scratch_fg_iou"] is not None  # keep rate shapes the segmentation encoder too
    for arm in ("affmae_pretrained", "affmae_scratch"):
        seg = load_package(work / "keep_70" / "vnc_mito" / f"{arm}_sparse_k1_s0" / "segmentation.affmae")
        assert seg.config["keep_rate"] == 0.7, arm
    assert rows["reference"]["pretrain_steps"] == 2 and rows["steps_x3"]["pretrain_steps"] == 6
    assert rows["steps_x3"]["scratch_fg_iou"] is None  # pretraining-only change: compared with the reference
    assert rows["no_refine"]["scratch_fg_iou"] is not None  # its own scratch model without the head
    scratch = load_package(work / "no_refine" / "vnc_mito" / "affmae_scratch_sparse_k1_s0" / "segmentation.affmae")
    assert scratch.config["refine"] is False
    assert not (work / "steps_x3" / "vnc_mito" / "affmae_scratch_sparse_k1_s0").exists()
    page = out.read_text()
    for name in rows:
        assert f"| {name} |" in page
        assert rows[name]["fg_iou"] is not None and 0.0 <= rows[name]["fg_iou"] <= 1.0
    ref = rows["reference"]
    assert f"| {ref['fg_iou']:.3f} | {ref['scratch_fg_iou']:.3f} | {ref['fg_iou'] - ref['scratch_fg_iou']:+.3f} |" \
        in page
    # every variant's pretrained package is probed against the flat-patch predictor (per-patch normalised
    # targets: 63/64 of the summed loss weights 1.17, up to the 1e-6 variance epsilon and flat crop borders)
    for row in rows.values():
        assert row["trivial_loss"] == pytest.approx(63 / 64 * 1.17, rel=0.05)
        assert row["ratio"] == pytest.approx(row["probe_loss"] / row["trivial_loss"])
        assert f"{row['probe_loss']:.3f} / {row['trivial_loss']:.3f} ({row['ratio']:.3f})" in page
    # probing again needs no training and rewrites the page with the run's own command
    out.write_text("stale")
    assert script.main(["--work-dir", str(work), "--out", str(out), "--probe-only", "--quiet"]) == 0
    again = out.read_text()
    assert "--variants steps_x3,no_refine,keep_70" in again and again.split("Reconstruction probe")[1] == \
        page.split("Reconstruction probe")[1]
    # the packaged command probes the same packages, prints the same rows and writes JSON only
    capsys.readouterr()
    kept = tmp_path / "kept.json"
    assert A.main(["--work-dir", str(work), "--out", str(kept), "--probe-only", "--quiet"]) == 2  # no kept.json yet
    (kept).write_text((work / "ablations.json").read_text())
    assert A.main(["--work-dir", str(work), "--out", str(kept), "--probe-only", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for cells in A.table_rows(json.loads(kept.read_text())):
        assert cells[0] in printed and cells[4] in printed  # variant and probe
    assert json.loads(kept.read_text())["rows"] == json.loads((work / "ablations.json").read_text())["rows"]


def _results_json(path: Path, **config) -> Path:
    base = {"pretrain_steps": 300, "finetune_steps": 200, "batch_size": 8, "crop": 128, "tile": 256, "size": "tiny",
            "max_eval_slices": None, "affmae_options": {}}
    runs = [{"task": "vnc_mito", "regime": "sparse", "k": 1, "seed": 0, "arm": arm, "error": None,
             "scores": {"fg_iou": iou}} for arm, iou in (("affmae_pretrained", 0.31), ("affmae_scratch", 0.27))]
    env = {"device": config.pop("device", "cpu")}
    path.write_text(json.dumps({"config": {"data_dir": str(path.parent), **base, **config}, "environment": env,
                                "summary": [],
                                "runs": runs, "pretraining": [
        {"task": "vnc_mito", "seed": 0, "family": "affmae", "steps": 300, "first_loss": 1.5, "final_loss": 1.15}]}))
    return path


def test_reference_is_reused_only_from_a_run_with_the_same_budget(tmp_path: Path) -> None:
    config = A.AblationConfig(data_dir=tmp_path, device="cpu")
    ref = A.reference_from(_results_json(tmp_path / "same.json"), config)
    assert [r["scores"]["fg_iou"] for r in ref["runs"]] == [0.31, 0.27]
    with pytest.raises(ValueError, match="another budget.*finetune_steps"):
        A.reference_from(_results_json(tmp_path / "short.json", finetune_steps=50), config)
    with pytest.raises(ValueError, match="another budget.*affmae_options"):
        A.reference_from(_results_json(tmp_path / "opts.json", affmae_options={"refine": False}), config)
    with pytest.raises(ValueError, match="another budget.*device"):
        A.reference_from(_results_json(tmp_path / "gpu.json", device="cuda"), config)
    with pytest.raises(ValueError, match="another budget.*data_dir"):
        A.reference_from(_results_json(tmp_path / "same.json"), A.AblationConfig(data_dir=tmp_path / "x", device="cpu"))
    with pytest.raises(ValueError, match="no scored AFFMAE"):
        A.reference_from(_results_json(tmp_path / "k4.json"), A.AblationConfig(data_dir=tmp_path, k=4, device="cpu"))
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a results.json"):
        A.reference_from(tmp_path / "other.json", config)


def test_bad_ablation_options_give_a_clear_error(tmp_path: Path, capsys) -> None:
    assert A.main(["--data-dir", str(tmp_path), "--variants", "reference,bigger", "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown variant(s) ['bigger']" in capsys.readouterr().err
    assert A.main(["--data-dir", str(tmp_path), "--reference", str(tmp_path / "none.json"),
                   "--out", str(tmp_path / "r.json")]) == 2
    assert "no such results.json" in capsys.readouterr().err
    short = _results_json(tmp_path / "short.json", finetune_steps=50)  # refused before any training
    assert A.main(["--data-dir", str(tmp_path), "--reference", str(short), "--device", "cpu",
                   "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")]) == 2
    assert "another budget" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "w").exists()
    assert A.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    assert "not a Markdown page" in capsys.readouterr().err


def test_affmae_bench_ablation_is_the_same_script(tmp_path: Path, capsys) -> None:
    from napari_affmae.cli import main as cli_main

    assert cli_main(["bench", "ablation", "--data-dir", str(tmp_path), "--variants", "mask_75,raw",
                     "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown variant(s) ['raw']; choose from reference, raw_pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "ablation", "--help"])
    assert exit_info.value.code == 0
    assert "--reference" in capsys.readouterr().out
