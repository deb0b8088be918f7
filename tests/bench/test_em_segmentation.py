"""End-to-end smoke test of the real-EM benchmark script on a tiny synthetic data directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_affmae.bench import em_segmentation as S
from napari_affmae.models import create_model

REPO = Path(__file__).resolve().parents[2]


def test_script_runs_end_to_end_and_writes_the_page(tiny_data_dir: Path, tmp_path: Path, bench_script) -> None:
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
    assert len(runs) == 2 * len(S.DEFAULT_ARMS)  # tasks x arms
    for run in runs:
        assert run["scores"] is not None or run["error"], run
        if run["scores"] is not None:
            assert run["scores"]["eval_slices"] == [3, 4, 5]
            assert 0.0 <= run["scores"]["fg_iou"] <= 1.0
            assert ("boundary_f1" in run["scores"]) == (run["task"] == "vnc_membranes")
            assert 0 < run["labelled_fraction"] < 0.05  # sparse strokes
    scored = {r["arm"] for r in runs if r["scores"] is not None}
    assert {"affmae_pretrained", "affmae_scratch", "unet_scratch", "affmae_taught", "unet_taught"} <= scored
    taught = next(r for r in runs if r["arm"] == "affmae_taught")
    assert results["config"]["pseudo_label_confidence"] == S.PSEUDO_LABEL_CONFIDENCE
    assert "`affmae_taught` and `unet_taught` (the fine-tuning default)" in out.read_text() and taught["model"] == (
        "affmae_tiny")
    from napari_affmae.engine import load_package

    def provenance(arm: str) -> dict:
        return load_package(work / "vnc_mito" / f"{arm}_sparse_k1_s0" / "segmentation.affmae").provenance

    assert provenance("affmae_taught")["pseudo_labels"]["confidence"] == S.PSEUDO_LABEL_CONFIDENCE
    assert "pseudo_labels" not in provenance("affmae_scratch")  # the strokes-only arms stay strokes only
    page = out.read_text()
    assert "| VNC mitochondria | sparse | 1 | unet_scratch |" in page
    assert "doi:10.6084/m9.figshare.856713" in page and "device: **cpu**" in page
    assert "evaluated on z [3, 4, 5]" in page
    for png in ("results_iou_vs_k.png", "results_overlays.png"):
        assert (out.parent / "images" / png).stat().st_size > 1000
    # the page can be written again from results.json alone (e.g. after a change of wording)
    script = bench_script("em_segmentation")
    (out.parent / script.ABLATION_PAGE).write_text("# variants\n")
    assert script.main(["--render-only", str(work / "results.json"), "--out", str(out)]) == 0
    again = out.read_text()
    assert again.replace(f"[{script.ABLATION_PAGE}]({script.ABLATION_PAGE})", "") != again  # links the variants page
    assert again.split("## Verdict")[0] == page.split("## Verdict")[0]  # same command, table and plots
    assert script.main(["--render-only", str(tiny_data_dir / "vnc" / "stack1_raw.tif"), "--out", str(out)]) == 2


def test_packaged_command_prints_scores_and_writes_json_only(tiny_data_dir: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    from napari_affmae.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AFFMAE_DATA", str(tiny_data_dir))  # data from the variable when --data-dir is absent
    out = tmp_path / "kept" / "scores.json"
    assert cli_main(["bench", "segmentation", "--work-dir", str(tmp_path / "w"), "--out", str(out), "--k", "1",
                     "--arms", "threshold", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fg IoU" in printed and "VNC mitochondria" in printed and "threshold" in printed
    results = json.loads(out.read_text())
    assert results["command"].startswith("affmae bench segmentation --work-dir")
    assert results["config"]["data_dir"] == str(tiny_data_dir) and [r["arm"] for r in results["runs"]] == ["threshold"]
    assert not (tmp_path / "w" / "results.json").exists() and not list(tmp_path.rglob("*.md"))
    assert cli_main(["bench", "segmentation", "--out", str(tmp_path / "page.md")]) == 2
    assert "not a Markdown page" in capsys.readouterr().err


def test_missing_data_folder_names_the_option_and_the_variable(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("AFFMAE_DATA", raising=False)
    assert S.main(["--work-dir", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "$AFFMAE_DATA" in err
    assert not (tmp_path / "w").exists()


def test_bad_options_give_a_clear_error(tmp_path: Path, capsys) -> None:
    assert S.main(["--data-dir", str(tmp_path), "--tasks", "nuclei", "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert S.main(["--data-dir", str(tmp_path), "--work-dir", str(tmp_path / "w"),
                   "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert "stack1_raw.tif" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


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


def test_affmae_options_reach_pretraining_and_both_affmae_arms(tiny_data_dir: Path, tmp_path: Path,
                                                              bench_script) -> None:
    from napari_affmae.engine import load_package

    work = tmp_path / "work"
    code = bench_script("em_segmentation").main(["--data-dir", str(tiny_data_dir), "--work-dir", str(work), "--out", str(tmp_path / "r.md"),
                   "--k", "1", "--arms", "affmae_pretrained,affmae_scratch", "--pretrain-steps", "2",
                   "--finetune-steps", "1", "--batch-size", "2", "--crop", "32", "--tile", "64", "--device", "cpu",
                   "--max-eval-slices", "1", "--quiet", "--affmae-option", "mask_ratio=0.75",
                   "--affmae-option", "norm_pix_loss=false", "--affmae-option", "refine=false",
                   "--affmae-option", "keep_rate=0.6"])
    assert code == 0
    mae = load_package(next((work / "vnc_mito").glob("pretrain_affmae_s0/*.affmae")))
    assert mae.provenance["mask"] == {"ratio": 0.75, "kind": "blob"} and mae.config["norm_pix_loss"] is False
    assert "mask_ratio" not in mae.config  # masking is a pretraining setting, not a model field
    assert mae.config["keep_rate"] == 0.6
    for arm in ("affmae_pretrained", "affmae_scratch"):  # the options that shape the segmentation model
        seg = load_package(next((work / "vnc_mito").glob(f"{arm}_sparse_k1_s0/*.affmae")))
        assert seg.config["refine"] is False, arm
        assert seg.config["keep_rate"] == 0.6, arm
        assert not any(k.startswith("refine.") for k in seg.state_dict), arm
    page = (tmp_path / "r.md").read_text()
    assert "blob masks 75%" in page and '"norm_pix_loss": false' in page


def test_bad_affmae_options_are_refused_before_training(tmp_path: Path, capsys) -> None:
    assert S.parse_options(["mask_ratio=0.75", "refine=False", "neighborhood=cluster"]) == {
        "mask_ratio": 0.75, "refine": False, "neighborhood": "cluster"}
    base = ["--data-dir", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")]
    assert S.main([*base, "--affmae-option", "maskratio=0.7"]) == 2
    assert "unknown AFFMAE option(s) ['maskratio']" in capsys.readouterr().err
    assert S.main([*base, "--affmae-option", "keep_rate=0"]) == 2
    assert "keep_rate must be in (0, 1]" in capsys.readouterr().err
    assert S.main([*base, "--affmae-option", "mask_ratio=1.5"]) == 2
    assert "mask_ratio must be between 0 and 1" in capsys.readouterr().err
    assert S.main([*base, "--affmae-option", "refine"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert S.main([*base, "--pseudo-label-confidence", "0.2"]) == 2
    assert "pseudo_label_confidence must be in [0.5, 1)" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_runs_of_different_arms_merge_into_one_page(tiny_data_dir: Path, tmp_path: Path, capsys,
                                                    bench_script) -> None:
    common = ["--data-dir", str(tiny_data_dir), "--k", "1,2", "--finetune-steps", "1", "--batch-size", "2",
              "--crop", "32", "--tile", "64", "--device", "cpu", "--quiet"]
    jsons = {}
    for name, arms, extra in (("a", "threshold", []), ("b", "unet_scratch", []),
                              ("c", "unet_scratch,threshold", ["--tile", "32"]), ("d", "threshold", ["--seeds", "1"]),
                              ("e", "threshold", ["--k", "3", "--rounds", "1"])):
        work = tmp_path / name
        assert S.main([*common, *extra, "--arms", arms, "--work-dir", str(work)]) == 0
        jsons[name] = work / "results.json"
    overlays = S.read_results(jsons["b"])["overlays"]  # the overlay arrays come back from their .npz
    (task, item), = overlays.items()
    assert set(item["pred"]) == {"unet_scratch"} and item["raw"].shape == item["truth"].shape == item["pred"][
        "unet_scratch"].shape and isinstance(item["slice"], int)
    out = tmp_path / "merged.md"
    script = bench_script("em_segmentation")
    assert script.main(["--render-only", str(jsons["b"]), str(jsons["a"]), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("Commands (one page from several runs): `") == 1 and "--arms threshold" in page
    rows = [line.split(" | ")[2:4] for line in page.splitlines() if line.startswith("| VNC mitochondria")]
    assert rows == [["1", "unet_scratch"], ["1", "threshold"], ["2", "unet_scratch"], ["2", "threshold"]]
    assert "![overlays](images/results_overlays.png)" in page and (tmp_path / "images/results_overlays.png").exists()
    # runs of other seeds merge too: the threshold rows then pool seeds 0 and 1
    assert script.main(["--render-only", str(jsons["a"]), str(jsons["d"]), "--out", str(out)]) == 0
    assert "seeds [0, 1]" in out.read_text()
    # and runs of other label counts, with or without correction rounds: the overlays stay those of the smallest k
    parts = [S.read_results(jsons[n]) for n in ("e", "a")]
    merged = script.merge_results(parts, ["e", "a"])
    assert merged["config"]["ks"] == [1, 2, 3] and merged["config"]["rounds"] == 1
    assert [(r["k"], len(r["rounds"])) for r in merged["summary"]] == [("1", 1), ("2", 1), ("3", 2)]
    (task, item), = merged["overlays"].items()
    assert (item["pred"]["threshold"] == parts[1]["overlays"][task]["pred"]["threshold"]).all()
    assert script.main(["--render-only", str(jsons["e"]), str(jsons["a"]), "--out", str(out)]) == 0
    assert "| VNC mitochondria | sparse | 3 | threshold |" in out.read_text().split("## Correction rounds")[1]
    capsys.readouterr()
    assert script.main(["--render-only", str(jsons["a"]), str(jsons["c"]), "--out", str(out)]) == 2
    assert "differs from" in capsys.readouterr().err  # another tile size: not the same budget
    assert script.main(["--render-only", str(jsons["a"]), str(jsons["a"]), "--out", str(out)]) == 2
    assert "repeats the run" in capsys.readouterr().err


def test_verdict_names_pretraining_ties_and_networks_no_better_than_a_threshold(bench_script) -> None:
    def row(arm: str, iou: float, k: str = "1") -> dict:
        return {"task": "vnc_mito", "regime": "sparse", "k": k, "arm": arm, "n_labelled": int(k),
                "fg_iou": {"mean": iou, "std": None, "n": 1}}

    results = {"config": {"seeds": [0]}, "summary": [
        row("affmae_pretrained", 0.125), row("affmae_scratch", 0.120), row("unet_scratch", 0.300),
        row("threshold", 0.118), row("affmae_pretrained", 0.40, "4"), row("threshold", 0.13, "4")]}
    text = bench_script("em_segmentation").verdict(results)
    assert "did **not** beat AFFMAE from scratch" in text and "k=1: +0.005 IoU" in text
    assert "k=1 (threshold 0.118): affmae_pretrained, affmae_scratch." in text  # both within 0.01 of it
    assert "unet_scratch" not in text.split("threshold 0.118")[1] and "k=4" not in text.split("IoU, i.e.")[1]


def test_verdict_names_networks_no_better_than_the_forest(bench_script) -> None:
    def row(arm: str, iou: float) -> dict:
        return {"task": "vnc_mito", "regime": "sparse", "k": "1", "arm": arm, "n_labelled": 1,
                "fg_iou": {"mean": iou, "std": None, "n": 1}}

    results = {"config": {"seeds": [0]}, "summary": [
        row("affmae_pretrained", 0.116), row("affmae_scratch", 0.115), row("unet_scratch", 0.30),
        row("rf_filters", 0.197)]}
    text = bench_script("em_segmentation").verdict(results)
    assert "ilastik-style random forest (rf_filters) by more than 0.01 IoU: VNC mitochondria, sparse, k=1 " \
           "(rf_filters 0.197): affmae_pretrained, affmae_scratch." in text
    assert "unet_scratch" not in text.split("rf_filters 0.197")[1]


def test_verdict_sets_the_recipe_against_the_forest_and_the_unet_from_scratch(bench_script) -> None:
    def row(arm: str, iou: float, k: str) -> dict:
        return {"task": "vnc_mito", "regime": "sparse", "k": k, "arm": arm, "n_labelled": int(k),
                "fg_iou": {"mean": iou, "std": None, "n": 1}}

    results = {"config": {"seeds": [0]}, "summary": [
        row("affmae_taught", 0.36, "1"), row("rf_filters", 0.20, "1"),
        row("affmae_taught", 0.37, "4"), row("unet_scratch", 0.25, "4"), row("rf_filters", 0.27, "4")]}
    text = bench_script("em_segmentation").verdict(results)
    forest, unet = text.split("Against the U-Net")
    assert "k=1: 0.360 vs 0.200 (1.80x, +0.160); VNC mitochondria, sparse, k=4: 0.370 vs 0.270" in forest
    assert "(`unet_scratch`): VNC mitochondria, sparse, k=4: 0.370 vs 0.250 (1.48x, +0.120)." in unet
    assert "k=1" not in unet.split(".")[0]  # no U-Net row at k = 1: no comparison made up


def test_rf_filters_arm_is_the_filter_forest_fitted_on_the_strokes(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = S.EMBenchConfig(data_dir=tiny_data_dir, work_dir=tmp_path / "w", arms=["rf_filters", "threshold"],
                             ks=[1], tile=64, crop=32)
    results = S.run_benchmark(config)
    runs = {r["arm"]: r for r in results["runs"]}
    assert runs["rf_filters"]["error"] is None and runs["rf_filters"]["model"] == "rf_filters"
    # the synthetic mitochondria are dark blobs with texture: the forest separates them better than one cut
    assert runs["rf_filters"]["scores"]["fg_iou"] > runs["threshold"]["scores"]["fg_iou"]
    assert results["parameters"] == {}  # no network among these arms


def test_correction_rounds_paint_where_each_arm_is_wrong_and_networks_train_on(tiny_data_dir: Path, tmp_path: Path,
                                                                              capsys, bench_script) -> None:
    from napari_affmae.bench import em_protocol as P
    from napari_affmae.engine import load_package

    work = tmp_path / "w"
    assert S.main(["--data-dir", str(tiny_data_dir), "--work-dir", str(work), "--k", "1", "--arms",
                   "affmae_taught,rf_filters,threshold", "--rounds", "2", "--round-steps", "3", "--finetune-steps",
                   "2", "--batch-size", "2", "--crop", "32", "--tile", "64", "--threads", "1", "--quiet"]) == 0
    assert "fg IoU by round" in capsys.readouterr().out
    results = json.loads((work / "results.json").read_text())
    for run in results["runs"]:
        rounds = run["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[0]["fg_iou"] == run["scores"]["fg_iou"]
        added = [b["labelled_fraction"] - a["labelled_fraction"] for a, b in zip(rounds, rounds[1:])]
        # about CORRECTION_FRACTION of the slice per round (3 px brush, whole strokes), never a repaint
        assert all(0.3 * P.CORRECTION_FRACTION < a < 3 * P.CORRECTION_FRACTION for a in added), (run["arm"], added)
        assert all(r["train_s"] >= 0 for r in rounds) and "look_s" in rounds[0] and "look_s" not in rounds[2]
    summary = {r["arm"]: r for r in results["summary"]}
    assert [r["round"] for r in summary["rf_filters"]["rounds"]] == [0, 1, 2]
    first = work / "vnc_mito" / "affmae_taught_sparse_k1_s0"
    r1 = load_package(first / "round1" / "segmentation.affmae").provenance
    r2 = load_package(first / "round2" / "segmentation.affmae").provenance
    assert r1["continued_from"] == str(first / "segmentation.affmae") and r1["steps"] == 3
    assert r2["continued_from"] == str(first / "round1" / "segmentation.affmae")
    assert "pseudo_labels" in r1 and "pseudo_labels" in r2  # the taught arm's teacher sees the corrections too
    page = tmp_path / "docs" / "results.md"
    assert bench_script("em_segmentation").main(["--render-only", str(work / "results.json"), "--out", str(page)]) == 0
    text = page.read_text()
    assert "## Correction rounds" in text and "| IoU round 0 | IoU round 1 | IoU round 2 |" in text
    assert "After the correction rounds, `affmae_taught` against `rf_filters`, foreground IoU: VNC mitochondria, " \
           "sparse, k=1, round 2: " in text
    assert (page.parent / "images" / "results_iou_vs_round.png").stat().st_size > 1000
    assert S.main(["--data-dir", str(tiny_data_dir), "--work-dir", str(work), "--rounds", "-1", "--quiet"]) == 2
    assert "rounds must be >= 0" in capsys.readouterr().err
    assert S.main(["--data-dir", str(tiny_data_dir), "--work-dir", str(work), "--rounds", "1", "--regimes",
                   "sparse,dense", "--quiet"]) == 2
    assert "run --rounds with --regimes sparse" in capsys.readouterr().err
    labelled = {r["arm"]: r["rounds"][0]["labelled_fraction"] for r in results["runs"]}
    assert len(set(labelled.values())) == 1  # every arm starts from the same strokes
