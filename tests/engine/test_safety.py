"""Issue 13: a user's result is never lost or mixed. Each test reproduces one case of the issue on real
files (and real processes where it is about kill or concurrency): bad options leave earlier output
byte-identical, a training folder is never silently replaced, label values are classes (mapped, and
written back), a batch run is never resumed with another model, damaged or finished checkpoints are
handled, and every refusal is one line."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from napari_affmae.cli import main
from napari_affmae.data import synthetic_em
from napari_affmae.engine import BatchConfig, CancelToken, JobCancelled, PretrainConfig, SegmentConfig, \
    batch_segment, load_package, pretrain, segment
from napari_affmae.engine.checkpoint import CHECKPOINT_NAME
from napari_affmae.engine.training import LOCK_NAME, RunLock
from napari_affmae.io import write_ome_zarr_image

PYTHON = sys.executable
TINY = ["--crop-size", "32", "--batch-size", "2", "--warmup-steps", "1", "--device", "cpu", "--quiet"]


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The single stderr line of a refused command (asserts there is exactly one, without traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("affmae: error: "), err
    return lines[0]


def digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """SHA-256 over every file under ``path`` (or of the file), names included; ``skip``: folder names left out."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not set(p.relative_to(path).parts) & set(skip)) \
        if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    image, truth = synthetic_em((4, 64, 64), seed=7)
    tifffile.imwrite(root / "stack.tif", image, imagej=True, metadata={"axes": "ZYX"})
    strokes = np.where(np.random.default_rng(0).random(truth.shape) < 0.05, truth, 0).astype(np.uint8)
    tifffile.imwrite(root / "strokes.tif", strokes, imagej=True, metadata={"axes": "ZYX"})
    return {"root": root, "image": root / "stack.tif", "strokes": root / "strokes.tif"}


@pytest.fixture(scope="module")
def second_package(trained, stack) -> Path:
    """A second, different segmentation model for the 'two models' cases: the first with its output classes
    rotated (class c's logits become class c + 1's), so the two label every pixel differently."""
    from napari_affmae.engine import ModelPackage, load_package, save_package

    first = load_package(trained["segmentation"])
    model = first.build_model("cpu")
    out = model.fusion.out  # [K, C, 1, 1] 1x1 conv to the class logits
    with torch.no_grad():
        out.weight.copy_(out.weight.roll(1, dims=0))
        out.bias.copy_(out.bias.roll(1, dims=0))
    package = ModelPackage.from_model(model, normalization=first.normalization, class_names=first.class_names,
                                      label_mode=first.label_mode, label_values=first.label_values,
                                      provenance={"job": "finetune", "note": "classes rotated"})
    return save_package(package, stack["root"] / "other" / "segmentation.affmae")


# ------------------------------------------------------------------------- 1. invalid options wipe output

@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_invalid_slices_with_overwrite_keep_the_earlier_output(trained, stack, tmp_path, capsys, suffix):
    out = tmp_path / f"k{suffix}"
    code, _, err = run(capsys, "segment", trained["segmentation"], stack["image"], "-o", out, "--tile-size", "32")
    assert code == 0, err
    before = digest(out)
    labels = np.load(out) if suffix == ".npy" else np.asarray(zarr.open_array(str(out), mode="r")[...])
    assert labels.any()
    code, _, err = run(capsys, "segment", trained["segmentation"], stack["image"], "-o", out, "--overwrite",
                       "--slices", "9")
    assert code == 2 and "outside the stack of 4 slices" in one_line_error(err)
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".jsonl")) == [out.name]


def test_batch_with_batch_size_0_keeps_the_labels(trained, tmp_path, capsys):
    dataset = tmp_path / "ds.ome.zarr"
    write_ome_zarr_image(dataset, synthetic_em((2, 64, 64), seed=2)[0], axes="zyx")
    common = ["batch", trained["segmentation"], dataset, "--name", "seg", "--tile-size", "32", "--device", "cpu",
              "--quiet"]
    assert run(capsys, *common)[0] == 0
    before = digest(dataset)
    code, _, err = run(capsys, *common, "--overwrite", "--batch-size", "0")
    assert code == 2 and "batch_size" in one_line_error(err) and ">= 1" in err
    assert digest(dataset) == before
    attrs = dict(zarr.open_group(str(dataset / "labels"), mode="r").attrs)
    assert "seg" in attrs.get("ome", attrs)["labels"]


def test_an_interrupted_batch_overwrite_keeps_the_earlier_labels(trained, second_package, tmp_path, capsys):
    dataset = tmp_path / "ds.ome.zarr"
    write_ome_zarr_image(dataset, synthetic_em((4, 64, 64), seed=2)[0], axes="zyx")
    common = ["--name", "seg", "--tile-size", "32", "--device", "cpu", "--quiet"]
    assert run(capsys, "batch", trained["segmentation"], dataset, *common)[0] == 0
    before = digest(dataset / "labels")
    token = CancelToken()

    def stop_after_one(event) -> None:
        if event.message and "chunks)" in event.message:
            token.cancel()

    config = BatchConfig(SegmentConfig(tile_size=(32, 32), device="cpu"), overwrite=True)
    with pytest.raises(JobCancelled):
        batch_segment(dataset, second_package, config, label_name="seg", progress=stop_after_one, cancel=token)
    staged = dataset / "labels" / "seg.affmae-new"
    assert staged.is_dir()  # the replacement is staged beside the earlier labels, which stay intact and listed
    assert digest(dataset / "labels", skip=(staged.name,)) == before
    assert run(capsys, "batch", second_package, dataset, *common, "--overwrite")[0] == 0
    assert not staged.exists()
    attrs = zarr.open_group(str(dataset / "labels" / "seg"), mode="r").attrs["affmae_labels"]
    assert attrs["status"] == "complete" and attrs["provenance"]["model_package"] == str(second_package)


def test_output_equal_to_an_input_is_refused(trained, stack, tmp_path, capsys):
    image = tmp_path / "image.tif"
    image.write_bytes(stack["image"].read_bytes())
    dataset = tmp_path / "ds.ome.zarr"
    write_ome_zarr_image(dataset, synthetic_em((1, 64, 64), seed=2)[0], axes="zyx")
    before = {p: digest(p) for p in (image, dataset)}
    for source, output in ((image, image), (dataset, dataset), (dataset, dataset / "0.zarr")):
        code, _, err = run(capsys, "segment", trained["segmentation"], source, "-o", output, "--overwrite")
        assert code == 2 and "would destroy the input" in one_line_error(err), err
    code, _, err = run(capsys, "pretrain", dataset, "-o", dataset, "--steps", "1", *TINY)
    assert code == 2 and "would destroy the input" in one_line_error(err)
    assert {p: digest(p) for p in (image, dataset)} == before


# ------------------------------------------------------------------------- 2. training outputs

def test_a_folder_holding_a_run_is_not_replaced(stack, tmp_path, capsys):
    out = tmp_path / "pre"
    args = ["pretrain", stack["image"], "-o", out, "--steps", "1", *TINY]
    assert run(capsys, *args)[0] == 0
    before = {name: digest(out / name) for name in ("pretrained.affmae", CHECKPOINT_NAME)}
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds a run" in one_line_error(err) and "--overwrite" in err
    assert {name: digest(out / name) for name in before} == before
    code, _, err = run(capsys, *args, "--seed", "5", "--overwrite")
    assert code == 0, err
    assert digest(out / "pretrained.affmae") != before["pretrained.affmae"]
    logs = sorted(out.glob("affmae-pretrain-*.jsonl"))
    assert len(logs) == 3  # one log per run, also for the refused one
    assert all(len({json.loads(line)["run"] for line in log.read_text().splitlines()}) == 1 for log in logs)


def test_a_second_concurrent_run_is_refused_naming_the_pid(stack, tmp_path, capsys, cli_env):
    out = tmp_path / "pre"
    stop = tmp_path / "stop"
    proc = subprocess.Popen([PYTHON, "-m", "napari_affmae.cli", "pretrain", str(stack["image"]), "-o", str(out),
                             "--steps", "100000", "--stop-file", str(stop), *TINY], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        code, _, err = run(capsys, "pretrain", stack["image"], "-o", out, "--steps", "1", *TINY)
        assert code == 2 and f"in use by another run (pid {proc.pid}" in one_line_error(err)
        code, _, err = run(capsys, "pretrain", stack["image"], "-o", out, "--steps", "1", "--overwrite", *TINY)
        assert code == 2 and f"pid {proc.pid}" in err  # --overwrite does not break a lock
    finally:
        stop.touch()
        assert proc.wait(timeout=120) == 130
    assert not (out / LOCK_NAME).exists()
    first = load_package(out / "pretrained.affmae")  # the first run's result is intact and its own
    assert first.provenance["config"]["steps"] == 100000
    # a lock left by a process that died (kill -9) is taken over
    dead = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    code, _, err = run(capsys, "pretrain", stack["image"], "-o", out, "--steps", "1", "--overwrite", *TINY)
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()


def test_a_second_run_in_the_same_process_is_refused(stack, tmp_path):
    """Two runs into one folder from two threads of one process (two widget runs in one napari)."""
    out = tmp_path / "pre"
    config = dict(crop_size=(32, 32), batch_size=2, warmup_steps=1, device="cpu", output_dir=out)
    image = tifffile.imread(stack["image"])
    token, running, outcome = CancelToken(), threading.Event(), {}

    def first() -> None:
        try:
            pretrain(image, PretrainConfig(steps=100000, **config), progress=lambda e: running.set(), cancel=token)
        except BaseException as exc:  # noqa: BLE001 - the outcome is checked below
            outcome["first"] = exc

    def second() -> None:
        try:
            pretrain(image, PretrainConfig(steps=1, overwrite=True, **config))
            outcome["second"] = None
        except BaseException as exc:  # noqa: BLE001
            outcome["second"] = exc

    one = threading.Thread(target=first)
    one.start()
    try:
        assert running.wait(120), outcome
        two = threading.Thread(target=second)
        two.start()
        two.join(120)
        assert isinstance(outcome["second"], FileExistsError)
        assert f"in use by another run (pid {os.getpid()}" in str(outcome["second"])
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()  # the first run's lock is kept
    finally:
        token.cancel()
        one.join(120)
    assert isinstance(outcome["first"], JobCancelled)
    assert not (out / LOCK_NAME).exists()
    assert load_package(out / "pretrained.affmae").provenance["config"]["steps"] == 100000
    with RunLock(out):  # released: the folder can be locked again
        pass


TAKE_LOCK = """
import sys, time
from pathlib import Path
from napari_affmae.engine.training import RunLock
folder, signals = Path(sys.argv[1]), Path(sys.argv[2])
(signals / f"ready-{sys.argv[3]}").touch()
while not (signals / "go").exists():
    time.sleep(0.001)
try:
    lock = RunLock(folder).acquire()
except FileExistsError:
    print("refused", flush=True)
else:
    print("won", flush=True)
    while not (signals / "end").exists():  # hold the lock until every other process has tried
        time.sleep(0.01)
    lock.release()
"""


def test_processes_taking_over_a_stale_lock_at_once_do_not_both_win(tmp_path, cli_env):
    folder, signals = tmp_path / "run", tmp_path / "signals"
    folder.mkdir()
    signals.mkdir()
    dead = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    procs = [subprocess.Popen([PYTHON, "-c", TAKE_LOCK, str(folder), str(signals), str(i)], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
    try:
        deadline = time.time() + 120
        while len(list(signals.glob("ready-*"))) < len(procs) and time.time() < deadline:
            time.sleep(0.05)
        (signals / "go").touch()
        while sum(p.poll() is not None for p in procs) < len(procs) - 1 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        (signals / "end").touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert sorted(out.strip() for out, _ in results) == ["refused"] * 5 + ["won"]
    assert not (folder / LOCK_NAME).exists()


# ------------------------------------------------------------------------- 3. label values are classes

def test_sparse_label_values_are_mapped_and_written_back(stack, tmp_path, capsys):
    strokes = tifffile.imread(stack["strokes"]).astype(np.uint16)
    values = np.array([0, 1, 60000, 60000], np.uint16)  # classes 1, 2, 3 painted as 1, 60000, 60000
    sparse = values[strokes]
    tifffile.imwrite(tmp_path / "sparse.tif", sparse, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "fine"
    code, _, err = run(capsys, "finetune", stack["image"], tmp_path / "sparse.tif", "-o", out, "--scratch",
                       "--steps", "1", *TINY)
    assert code == 0, err
    package = load_package(out / "segmentation.affmae")
    assert package.num_classes == 2 and package.label_values == [1, 60000]
    code, _, err = run(capsys, "segment", out / "segmentation.affmae", stack["image"], "-o", tmp_path / "seg.tif",
                       "--tile-size", "32")
    assert code == 0, err
    result = tifffile.imread(tmp_path / "seg.tif")
    assert result.dtype == np.uint16 and set(np.unique(result)) <= {1, 60000}


def test_more_classes_than_the_limit_are_refused_naming_the_values(stack, tmp_path, capsys):
    many = np.zeros((4, 64, 64), np.uint16)
    many.reshape(-1)[:300] = np.arange(1, 301)
    tifffile.imwrite(tmp_path / "many.tif", many, imagej=True, metadata={"axes": "ZYX"})
    code, _, err = run(capsys, "finetune", stack["image"], tmp_path / "many.tif", "-o", tmp_path / "f", "--scratch",
                       "--steps", "1", *TINY)
    line = one_line_error(err)
    assert code == 2 and "300 different values (1, 2, 3, 4, 5, ..., 300)" in line and "at most 255" in line
    assert not (tmp_path / "f" / "segmentation.affmae").exists()


# ------------------------------------------------------------------------- 4. batch resume, other package

def test_batch_resume_with_another_package_is_refused(trained, second_package, tmp_path, capsys):
    image = synthetic_em((4, 64, 64), seed=4)[0]
    dataset, reference = tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"
    for path in (dataset, reference):
        write_ome_zarr_image(path, image, axes="zyx")
    token, bands = CancelToken(), []

    def stop_after_two(event) -> None:
        if event.message and "chunks)" in event.message:
            bands.append(event.message)
            if len(bands) == 2:
                token.cancel()

    config = BatchConfig(SegmentConfig(tile_size=(32, 32), device="cpu"))
    with pytest.raises(JobCancelled):
        batch_segment(dataset, trained["segmentation"], config, label_name="seg", progress=stop_after_two,
                      cancel=token)
    half = digest(dataset)
    common = ["--name", "seg", "--tile-size", "32", "--device", "cpu", "--quiet"]
    code, out, _ = run(capsys, "batch", second_package, dataset, *common)
    assert code == 1 and "half written by another model" in out and "--overwrite" in out
    assert digest(dataset) == half  # nothing added by the second model
    code, out, err = run(capsys, "batch", second_package, dataset, *common, "--overwrite")
    assert code == 0, out + err
    assert run(capsys, "batch", second_package, reference, *common)[0] == 0
    labels = np.asarray(zarr.open_array(str(dataset / "labels" / "seg" / "s0"), mode="r")[...])
    expected = np.asarray(zarr.open_array(str(reference / "labels" / "seg" / "s0"), mode="r")[...])
    np.testing.assert_array_equal(labels, expected)  # every slice from the second model
    first_model = segment(trained["segmentation"], image, SegmentConfig(tile_size=(32, 32), device="cpu"))
    assert all((first_model[z] != expected[z]).any() for z in range(2))  # the two models tell apart
    attrs = zarr.open_group(str(dataset / "labels" / "seg"), mode="r").attrs["affmae_labels"]
    assert attrs["provenance"]["package_sha256"] == attrs["fingerprint"]
    assert attrs["provenance"]["model_package"] == str(second_package)


# ------------------------------------------------------------------------- 5. checkpoints

def test_a_damaged_checkpoint_is_refused_on_resume(stack, tmp_path, capsys):
    out = tmp_path / "pre"
    args = ["pretrain", stack["image"], "-o", out, "--steps", "2", "--checkpoint-every", "1", *TINY]
    assert run(capsys, *args[:5], "1", *args[6:])[0] == 0  # stop at step 1 of a 1-step run
    checkpoint = out / CHECKPOINT_NAME
    data = bytearray(checkpoint.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_size])
    name = next(k for k in sorted(header) if k.startswith("model/") and header[k]["dtype"] == "F32")
    data[8 + header_size + header[name]["data_offsets"][0] + 2] ^= 0x01  # one bit of one weight
    checkpoint.write_bytes(bytes(data))
    package_before = digest(out / "pretrained.affmae")
    code, _, err = run(capsys, *args, "--resume")
    assert code == 2 and "is damaged" in one_line_error(err)
    assert digest(out / "pretrained.affmae") == package_before


@pytest.mark.parametrize("what", ["step", "stats"])
def test_a_checkpoint_with_edited_metadata_is_refused_on_resume(stack, tmp_path, capsys, what):
    """One digit of the stored step or normalisation statistics changed: the tensors are intact, but the
    checkpoint no longer matches its checksum."""
    out = tmp_path / "pre"
    args = ["pretrain", stack["image"], "-o", out, "--steps", "3", "--checkpoint-every", "1", *TINY]
    assert run(capsys, *args[:5], "1", *args[6:])[0] == 0  # stop at step 1 of a 1-step run
    checkpoint = out / CHECKPOINT_NAME
    data = checkpoint.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_size])
    meta = json.loads(header["__metadata__"]["affmae_checkpoint"])
    if what == "step":
        meta["step"] = 2
    else:
        mean = repr(meta["extra"]["stats"]["mean"])
        digit = next(i for i, c in enumerate(mean) if c in "123456789")
        meta["extra"]["stats"]["mean"] = float(mean[:digit] + str(int(mean[digit]) % 9 + 1) + mean[digit + 1:])
    header["__metadata__"]["affmae_checkpoint"] = json.dumps(meta, allow_nan=True)
    edited = json.dumps(header).encode()
    checkpoint.write_bytes(len(edited).to_bytes(8, "little") + edited + data[8 + header_size:])
    package_before = digest(out / "pretrained.affmae")
    code, _, err = run(capsys, *args, "--resume")
    assert code == 2 and "is damaged" in one_line_error(err)
    assert digest(out / "pretrained.affmae") == package_before


def test_resuming_a_finished_run_writes_the_package(stack, tmp_path, capsys):
    out = tmp_path / "pre"
    args = ["pretrain", stack["image"], "-o", out, "--steps", "2", "--checkpoint-every", "1", *TINY]
    assert run(capsys, *args)[0] == 0
    package = out / "pretrained.affmae"
    weights = load_package(package).state_dict
    package.unlink()
    code, stdout, err = run(capsys, *args[:-1], "--resume")  # not --quiet: the message is on stderr
    assert code == 0, err
    assert "already complete (2/2 steps)" in err and str(package) in stdout
    again = load_package(package)
    assert again.provenance["steps"] == 2
    assert all(np.array_equal(weights[k].numpy(), again.state_dict[k].numpy()) for k in weights)


# ------------------------------------------------------------------------- 6. smaller ones

def test_a_killed_zarr_segmentation_is_marked_incomplete(trained, tmp_path, cli_env):
    image = synthetic_em((40, 128, 128), seed=1)[0]
    tifffile.imwrite(tmp_path / "big.tif", image, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "seg.zarr"
    proc = subprocess.Popen([PYTHON, "-m", "napari_affmae.cli", "segment", str(trained["segmentation"]),
                             str(tmp_path / "big.tif"), "-o", str(out), "--tile-size", "32", "--device", "cpu",
                             "--quiet"], env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial: list[Path] = []
    while proc.poll() is None and time.time() < deadline:
        partial = [p for p in tmp_path.glob(".seg.zarr.tmp-*") if "affmae_incomplete" in
                   ((p / "zarr.json").read_text() if (p / "zarr.json").exists() else "")]
        if partial:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "segmentation ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing at the output path looks like a result
    assert zarr.open_array(str(partial[0]), mode="r").attrs["affmae_incomplete"] is True


def test_an_image_far_from_the_training_intensities_warns(trained, stack, tmp_path, capsys):
    image = tifffile.imread(stack["image"]).astype(np.uint16) * 200 + 1000
    tifffile.imwrite(tmp_path / "wide.tif", image, imagej=True, metadata={"axes": "ZYX"})
    code, _, err = run(capsys, "segment", trained["segmentation"], tmp_path / "wide.tif", "-o", tmp_path / "a.npy",
                       "--tile-size", "32", "--device", "cpu")
    assert code == 0 and "warning: this image (uint16" in err and "--normalization image" in err
    code, _, err = run(capsys, "segment", trained["segmentation"], stack["image"], "-o", tmp_path / "b.npy",
                       "--tile-size", "32", "--device", "cpu")
    assert code == 0 and "warning" not in err  # the image the package was trained on


@pytest.mark.parametrize(("shape", "value", "expected"), [
    ((1, 1), 5, "1 x 1 px is smaller than the minimum training crop of 32 x 32"),
    ((7, 7), 5, "7 x 7 px is smaller than the minimum training crop of 32 x 32"),
    ((40, 56), 5, "40 x 56 px is smaller than one 64 x 64 training crop; use --crop-size 40x56"),
    ((64, 64), 0, "every sampled pixel has the value 0"),
])
def test_images_too_small_or_empty_are_refused(tmp_path, capsys, shape, value, expected):
    image = np.full(shape, value, np.uint8)
    if value:
        image[...] = np.random.default_rng(0).integers(0, 255, shape)
    tifffile.imwrite(tmp_path / "img.tif", image)
    code, _, err = run(capsys, "pretrain", tmp_path / "img.tif", "-o", tmp_path / "out", "--steps", "1",
                       "--crop-size", "64", "--device", "cpu", "--quiet")
    assert code == 2 and expected in one_line_error(err)
    assert not list((tmp_path / "out").glob("*.affmae"))


def test_an_unusable_report_is_refused_before_any_work(trained, tmp_path, capsys):
    dataset = tmp_path / "ds.ome.zarr"
    write_ome_zarr_image(dataset, synthetic_em((1, 64, 64), seed=2)[0], axes="zyx")
    (tmp_path / "a-file").write_text("")
    for report in (tmp_path, tmp_path / "a-file" / "report.json"):
        code, _, err = run(capsys, "batch", trained["segmentation"], dataset, "--report", report, "--device", "cpu",
                           "--quiet")
        assert code == 2 and "--report" in one_line_error(err)
    assert not (dataset / "labels").exists()


def test_checking_the_report_creates_no_folder(trained, tmp_path, capsys):
    """The up-front --report check only checks: a refused run leaves no folder behind; a run that finishes
    creates the report's folder when it writes the report."""
    report = tmp_path / "new" / "sub" / "report.json"
    code, _, err = run(capsys, "batch", trained["segmentation"], tmp_path / "none-*.zarr", "--report", report,
                       "--device", "cpu", "--quiet")
    assert code == 2 and "matches no files" in one_line_error(err)
    assert not (tmp_path / "new").exists()
    dataset = tmp_path / "ds.ome.zarr"
    write_ome_zarr_image(dataset, synthetic_em((1, 64, 64), seed=2)[0], axes="zyx")
    code, _, err = run(capsys, "batch", trained["segmentation"], dataset, "--report", report, "--tile-size", "32",
                       "--device", "cpu", "--quiet")
    assert code == 0, err
    assert json.loads(report.read_text())["results"][0]["status"] == "done"


def test_segment_checks_the_output_against_its_inputs_once(trained, stack, tmp_path, capsys, monkeypatch):
    import napari_affmae.engine.training as training

    calls = []
    original = training.check_output_not_input

    def counted(*args, **kwargs) -> None:
        calls.append(args)
        original(*args, **kwargs)

    monkeypatch.setattr(training, "check_output_not_input", counted)
    code, _, err = run(capsys, "segment", trained["segmentation"], stack["image"], "-o", tmp_path / "k.npy",
                       "--tile-size", "32")
    assert code == 0, err
    assert len(calls) == 1


def test_a_truncated_tiff_prints_only_our_line(tmp_path, cli_env):
    tifffile.imwrite(tmp_path / "full.tif", np.zeros((4, 64, 64), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    result = subprocess.run([PYTHON, "-m", "napari_affmae.cli", "pretrain", str(tmp_path / "cut.tif"), "-o",
                             str(tmp_path / "out"), "--device", "cpu"], env=cli_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "truncated or corrupt" in one_line_error(result.stderr) and "tifffile:" not in result.stderr
