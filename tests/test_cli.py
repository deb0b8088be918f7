"""The ``affmae`` command: end-to-end runs on real files, help texts, and every bad-input case
ending with exit code 2, a one-line message and no traceback."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_affmae.cli import build_parser, main
from napari_affmae.data import sparse_strokes, synthetic_em

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    return env


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    image, truth = synthetic_em((3, 80, 96), seed=5)
    tifffile.imwrite(root / "stack.tif", image, imagej=True, metadata={"axes": "ZYX"})
    strokes = sparse_strokes(truth, fraction=0.05, seed=0, slices=[0, 2])
    tifffile.imwrite(root / "strokes.tif", strokes, imagej=True, metadata={"axes": "ZYX"})
    return {"root": root, "image": root / "stack.tif", "strokes": root / "strokes.tif"}


@pytest.fixture(scope="module")
def packages(files) -> dict[str, Path]:
    """pretrain -> finetune through the CLI (in-process), two steps each."""
    root = files["root"]
    common = ["--crop-size", "64", "--batch-size", "2", "--warmup-steps", "1", "--device", "cpu", "--quiet"]
    assert main(["pretrain", str(files["image"]), "-o", str(root / "pre"), "--steps", "2", *common]) == 0
    assert main(["finetune", str(files["image"]), str(files["strokes"]), "-o", str(root / "fine"), "--pretrained",
                 str(root / "pre" / "pretrained.affmae"), "--steps", "2", "--class-names", "membrane,mito,cyto",
                 "--val-slices", "2", *common]) == 0
    return {"pretrained": root / "pre" / "pretrained.affmae", "segmentation": root / "fine" / "segmentation.affmae"}


def test_end_to_end_segment_info_and_logs(files, packages, tmp_path, capsys):
    out = tmp_path / "labels.tif"
    code, stdout, _ = run_cli(capsys, "segment", packages["segmentation"], files["image"], "-o", out,
                              "--tile-size", "64", "--device", "cpu", "--quiet")
    assert code == 0 and "segmentation written" in stdout
    labels = tifffile.imread(out)
    assert labels.shape == (3, 80, 96) and set(np.unique(labels)) <= {1, 2, 3}
    code, _, err = run_cli(capsys, "segment", packages["segmentation"], files["image"], "-o", out)
    assert code == 2 and "already exists" in err
    npy = tmp_path / "probs.npy"
    code, _, _ = run_cli(capsys, "segment", packages["segmentation"], files["image"], "-o", npy, "--probabilities",
                         "--tile-size", "64", "--slices", "1", "--quiet")
    probs = np.load(npy, mmap_mode="r")
    assert code == 0 and probs.shape == (3, 3, 80, 96)
    np.testing.assert_allclose(np.asarray(probs[:, 1]).sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(probs[:, 1]).argmax(0) + 1, labels[1])
    code, stdout, _ = run_cli(capsys, "info", packages["segmentation"])
    assert code == 0 and "1=membrane, 2=mito, 3=cyto" in stdout and "val IoU" in stdout
    code, stdout, _ = run_cli(capsys, "info", packages["pretrained"], "--json")
    assert code == 0 and json.loads(stdout)["task"] == "mae"
    # one JSON-lines log per run, with start / progress / end events
    logs = sorted((files["root"] / "fine").glob("affmae-finetune-*.jsonl"))
    events = [json.loads(line) for line in logs[0].read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "progress" in kinds and "config" in kinds
    assert {e["run"] for e in events} == {events[0]["run"]}
    result = next(e for e in events if e["event"] == "result")
    assert result["metrics"]["val"]["val_slices"] == [2]


def test_help_explains_every_option(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert set(commands) == {"pretrain", "finetune", "segment", "batch", "info", "demo", "bench"}
    for name, sub in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:  # noqa: SLF001
            assert action.help and len(action.help) > 8, f"{name}: {action.dest} has no help"
            for flag in action.option_strings:
                assert flag in text, f"{name} --help does not mention {flag}"


def _bad_inputs(root: Path, packages: dict[str, Path]) -> dict[str, tuple[list, str]]:
    image, truth = synthetic_em((2, 64, 64), seed=1)
    tifffile.imwrite(root / "img.tif", image, imagej=True, metadata={"axes": "ZYX"})
    (root / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(200))
    tifffile.imwrite(root / "rgb.tif", np.zeros((2, 64, 64, 3), np.uint8), photometric="rgb")
    np.save(root / "four_d.npy", np.zeros((2, 2, 64, 64), np.uint8))
    tifffile.imwrite(root / "small_labels.tif", np.zeros((2, 32, 64), np.uint8))
    one = np.zeros_like(truth)
    one[0, 5:20, 5:20] = 3
    tifffile.imwrite(root / "one_class.tif", one)
    tifffile.imwrite(root / "unpainted.tif", np.zeros_like(truth))
    other = np.zeros_like(truth)
    other[0, 5:20, 5:20], other[1, 30:40, 30:40] = 1, 4  # classes 1 and 4: not those of the segmentation package
    tifffile.imwrite(root / "other_classes.tif", other)
    plain = zarr.open_group(str(root / "plain.zarr"), mode="w")
    plain.create_array("0", shape=(64, 64), dtype="uint8")
    with zipfile.ZipFile(packages["segmentation"]) as src, zipfile.ZipFile(root / "future.affmae", "w") as dst:
        manifest = json.loads(src.read("affmae.json"))
        manifest["format_version"] = 7
        dst.writestr("affmae.json", json.dumps(manifest))
        dst.writestr("model.safetensors", src.read("model.safetensors"))
    out = ["-o", root / "out"]
    train = ["--steps", "1", "--crop-size", "64", "--device", "cpu", "--quiet"]
    seg = packages["segmentation"]
    return {
        "missing file": (["pretrain", root / "nope.tif", *out, *train], "no such file"),
        "corrupt TIFF": (["pretrain", root / "corrupt.tif", *out, *train], "corrupt.tif"),
        "RGB stack": (["segment", seg, root / "rgb.tif", "-o", root / "o.tif"], "RGB"),
        "4D without axes": (["pretrain", root / "four_d.npy", *out, *train], "without axes"),
        "labels shape": (["finetune", root / "img.tif", root / "small_labels.tif", *out, "--scratch", *train],
                         "does not match the image shape"),
        "one class": (["finetune", root / "img.tif", root / "one_class.tif", *out, "--scratch", *train],
                      "at least two classes must be painted"),
        "nothing painted": (["finetune", root / "img.tif", root / "unpainted.tif", *out, "--scratch", *train],
                            "no painted pixels"),
        "no multiscales": (["segment", seg, root / "plain.zarr", "-o", root / "o2.tif"], "multiscales"),
        "package version": (["segment", root / "future.affmae", root / "img.tif", "-o", root / "o3.tif"],
                            "format version 7"),
        "continue a segmentation package with other classes": (
            ["finetune", root / "img.tif", root / "other_classes.tif", *out, "--pretrained", seg, *train],
            "these labels have [1, 4] (sparse). Paint the same classes to continue training it"),
        "crop size": (["pretrain", root / "img.tif", *out, "--crop-size", "60", "--steps", "1"], "multiples of 8"),
        "threads": (["segment", seg, root / "img.tif", "-o", root / "o4.tif", "--threads", "0"], "--threads must be >= 1"),
        "model option": (["pretrain", root / "img.tif", *out, *train, "--model-option", "no_such_field=1"],
                         "unknown AFFMAE option"),
        "masking as a model option": (["pretrain", root / "img.tif", *out, *train, "--model-option", "mask_ratio=0.3"],
                                      "mask_ratio is a pretraining setting, not a model option: give it as --mask-ratio"),
        "mask ratio": (["pretrain", root / "img.tif", *out, *train, "--mask-ratio", "1.5"],
                       "mask_ratio must be between 0 and 1"),
        "mask type of the family": (["pretrain", root / "img.tif", *out, *train, "--model", "greenmim_tiny",
                                     "--mask-type", "blob"], "greenmim_tiny: GreenMIM draws unit masks"),
        "pseudo-label confidence": (["finetune", root / "img.tif", root / "strokes_ok.tif", *out, "--scratch", *train,
                                     "--pseudo-label-confidence", "0.3"], "pseudo_label_confidence must be in [0.5, 1)"),
        "segmentation head": (["finetune", root / "img.tif", root / "strokes_ok.tif", *out, "--scratch", *train,
                               "--model-option", "seg_head=unet"], "seg_head must be one of"),
    }


def test_every_bad_input_exits_2_with_one_line(packages, tmp_path, capsys):
    image, truth = synthetic_em((2, 64, 64), seed=1)
    tifffile.imwrite(tmp_path / "strokes_ok.tif", sparse_strokes(truth, fraction=0.05, seed=0))
    for name, (args, expected) in _bad_inputs(tmp_path, packages).items():
        code, _, err = run_cli(capsys, *args)
        assert code == 2, f"{name}: exit code {code}; stderr {err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("affmae: error: "), f"{name}: {err}"
        assert expected.lower() in lines[0].lower(), f"{name}: {lines[0]}"
        assert "Traceback" not in err


def test_pseudo_label_confidence_can_be_switched_off_and_refuses_words(capsys):
    argv = ["finetune", "img.tif", "labels.tif", "-o", "out", "--scratch", "--pseudo-label-confidence"]
    assert build_parser().parse_args([*argv, "0.9"]).pseudo_label_confidence == 0.9
    assert build_parser().parse_args([*argv, "off"]).pseudo_label_confidence is None
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "high"])
    assert exit_info.value.code == 2 and "expected a probability like 0.8, or 'off'; got 'high'" in (
        capsys.readouterr().err)


def test_console_script_bad_input_has_no_traceback(tmp_path):
    result = subprocess.run([PYTHON, "-m", "napari_affmae.cli", "segment", str(tmp_path / "missing.affmae"),
                             str(tmp_path / "missing.tif"), "-o", str(tmp_path / "x.tif")],
                            env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("affmae: error:") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _without_root_powers(command: list[str]) -> list[str]:
    """Root may write anywhere: run the command with every capability dropped (util-linux setpriv),
    so directory permissions apply to it as to any user."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root needs util-linux 'setpriv' to drop capabilities for this test"
    return [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--", *command]


def test_read_only_output_location_exits_2(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", synthetic_em((64, 64), seed=0)[0])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        command = [PYTHON, "-m", "napari_affmae.cli", "pretrain", str(tmp_path / "img.tif"), "-o",
                   str(locked / "run"), "--steps", "1", "--crop-size", "32", "--device", "cpu"]
        result = subprocess.run(_without_root_powers(command), env=_env(), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert "not writable" in result.stderr or "cannot write" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (locked / "run").exists()
    finally:
        locked.chmod(stat.S_IRWXU)


def test_demo_runs_end_to_end_at_tiny_scale(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run_cli(capsys, "demo", "--out", out, "--pretrain-steps", "2", "--finetune-steps", "2",
                              "--size", "4,64,64", "--device", "cpu", "--quiet")
    assert code == 0
    assert "membrane" in stdout and "IoU" in stdout and "mean" in stdout
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out_slices"] == [0, 3] and set(metrics["iou"]) == {"membrane", "mitochondrion", "cytoplasm"}
    labels = zarr.open_group(str(out / "synthetic_em.ome.zarr" / "labels"), mode="r")
    assert set(labels.attrs["ome"]["labels"]) == {"affmae", "ground_truth", "strokes"}
    assert labels["affmae"]["s0"].shape == (4, 64, 64)


def test_model_options_reach_the_package(files, tmp_path):
    """--model-option KEY=VALUE (JSON values) sets fields of the model's config; the package records them."""
    from napari_affmae.engine import load_package

    out = tmp_path / "pre"
    assert main(["pretrain", str(files["image"]), "-o", str(out), "--steps", "1", "--crop-size", "64",
                 "--batch-size", "2", "--device", "cpu", "--quiet", "--model-option", "target_pool=2",
                 "--model-option", "norm_pix_loss=false", "--model-option", 'loss_weights={"res2": 1.0}']) == 0
    config = load_package(out / "pretrained.affmae").config
    assert config["target_pool"] == 2 and config["norm_pix_loss"] is False and config["loss_weights"] == {"res2": 1.0}


def test_pretraining_progress_shows_the_flat_patch_baseline(files, tmp_path):
    import io

    from napari_affmae.cli import TerminalProgress
    from napari_affmae.engine import PretrainConfig, pretrain

    stream = io.StringIO()
    pretrain(str(files["image"]), PretrainConfig(crop_size=(64, 64), batch_size=2, steps=2, warmup_steps=1,
                                                 device="cpu", output_dir=tmp_path / "pre"),
             progress=TerminalProgress(stream))
    lines = stream.getvalue().replace("\r", "\n").splitlines()  # tqdm redraws with carriage returns
    last = [line for line in lines if "2/2" in line][-1]
    baseline = float(last.split("(flat patches ")[1].split(")")[0])
    assert baseline == pytest.approx(63 / 64 * 1.17, rel=0.05)  # (p*p - 1)/(p*p) x the summed loss weights


def _neighbour_agreement(mask) -> float:
    """Share of 4-neighbour lattice pairs that are both masked or both visible: ~0.6 for i.i.d. random masks at
    0.75, above 0.85 for blobs of 2+ cells."""
    import torch

    return float(torch.cat([(mask[:, 1:] == mask[:, :-1]).flatten(1),
                            (mask[:, :, 1:] == mask[:, :, :-1]).flatten(1)], 1).float().mean())


def test_mask_options_reach_the_masks_drawn(tmp_path, monkeypatch):
    """--mask-ratio and --mask-type change the masks each step draws (their hidden share and structure), and the
    package records them; without them the family's own masks (AFFMAE: 50 % blobs) are drawn."""
    from napari_affmae.engine import load_package
    from napari_affmae.engine.pretrain import PretrainTask

    masks, draw = [], PretrainTask.batch

    def batch(self, shard, device):
        x, mask = draw(self, shard, device)
        masks.append(mask.clone())  # [B, h, w], True = masked
        return x, mask

    monkeypatch.setattr(PretrainTask, "batch", batch)
    image, _ = synthetic_em((2, 128, 128), seed=3)
    np.save(tmp_path / "img.npy", image)
    common = ["--steps", "1", "--crop-size", "128", "--batch-size", "4", "--device", "cpu", "--quiet"]
    assert main(["pretrain", str(tmp_path / "img.npy"), "-o", str(tmp_path / "a"), *common,
                 "--mask-ratio", "0.75", "--mask-type", "random"]) == 0
    assert main(["pretrain", str(tmp_path / "img.npy"), "-o", str(tmp_path / "b"), *common]) == 0
    given, default = masks
    assert given.shape == default.shape == (4, 16, 16)
    assert given.flatten(1).float().mean(1).tolist() == [0.75] * 4  # 192 of 256 patches hidden in every crop
    assert default.flatten(1).float().mean(1).tolist() == [0.5] * 4
    # samples 1-3 use blob scales of 2, 4 and 8 cells (sample 0's 1-cell blobs look almost i.i.d.)
    assert _neighbour_agreement(given[1:]) < 0.72 < 0.8 < _neighbour_agreement(default[1:])
    assert load_package(tmp_path / "a" / "pretrained.affmae").provenance["mask"] == {"ratio": 0.75, "kind": "random"}
