"""Batch segmentation of OME-Zarr datasets: NGFF labels read back with ome-zarr, failures isolated,
image arrays untouched, and a run killed with kill -9 resumes with only the missing chunks."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_affmae.engine import BatchConfig, SegmentConfig, batch_segment, load_package, segment
from napari_affmae.io import write_ome_zarr_image

PYTHON = sys.executable


def _image_checksum(dataset: Path) -> str:
    """SHA-256 over every file of the dataset except the labels group."""
    digest = hashlib.sha256()
    for path in sorted(dataset.rglob("*")):
        if path.is_file() and "labels" not in path.relative_to(dataset).parts:
            digest.update(str(path.relative_to(dataset)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _datasets(root: Path, images: list[np.ndarray]) -> list[Path]:
    paths = []
    for i, image in enumerate(images):
        path = root / f"ds{i}.ome.zarr"
        write_ome_zarr_image(path, image, axes="zyx" if image.ndim == 3 else "yx", pixel_size={"y": 4.6, "x": 4.6})
        paths.append(path)
    return paths


def _read_labels_with_ome_zarr(dataset: Path, name: str):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = [n for n in Reader(parse_url(str(dataset / "labels" / name)))() if n.load(Label) is not None]
    assert nodes, "ome-zarr found no label image"
    return nodes[0]


def test_batch_writes_ngff_labels_and_isolates_failures(trained, em_stack, tmp_path):
    image, _ = em_stack
    good = _datasets(tmp_path, [image, image[1, :80, :100]])
    broken = tmp_path / "broken.zarr"
    zarr.open_group(str(broken), mode="w").create_array("0", shape=(8, 8), dtype="uint8")
    checksums = {p: _image_checksum(p) for p in good}
    events = []
    package = load_package(trained["segmentation"])
    report = batch_segment([good[0], broken, good[1], tmp_path / "missing.zarr"], package,
                           BatchConfig(SegmentConfig(tile_size=(64, 64))), label_name="seg", progress=events.append)
    status = {Path(r.path).name: r.status for r in report.results}
    assert status == {"ds0.ome.zarr": "done", "broken.zarr": "failed", "ds1.ome.zarr": "done",
                      "missing.zarr": "failed"}
    assert "multiscales" in report.failed[0].error and "no such dataset" in report.failed[1].error
    assert not report.ok
    for path in good:
        assert _image_checksum(path) == checksums[path], "image arrays must never be written"
    # NGFF layout, read back with ome-zarr's own reader
    node = _read_labels_with_ome_zarr(good[0], "seg")
    meta = node.zarr.root_attrs.get("ome", node.zarr.root_attrs)
    assert meta["image-label"]["source"]["image"] == "../../"
    assert [p["class"] for p in meta["image-label"]["properties"]] == ["membrane", "mito", "cyto"]
    image_group = zarr.open_group(str(good[0]), mode="r")
    image_ms = image_group.attrs["ome"]["multiscales"][0]
    assert len(node.data) == len(image_ms["datasets"])
    for level, dataset in zip(node.data, image_ms["datasets"]):
        assert level.shape == image_group[dataset["path"]].shape
    level0 = np.asarray(node.data[0])
    if len(node.data) > 1:
        np.testing.assert_array_equal(np.asarray(node.data[1]), level0[:, ::2, ::2])  # nearest downsampling
    # the batch result equals plain tiled segmentation of the same image
    np.testing.assert_array_equal(level0, segment(package, image, SegmentConfig(tile_size=(64, 64))))
    assert np.asarray(zarr.open_group(str(good[1] / "labels" / "seg"), mode="r")["s0"]).shape == (80, 100)
    assert events[-1].job == "batch"
    # rerun: everything complete, nothing recomputed
    again = batch_segment(good, package, BatchConfig(SegmentConfig(tile_size=(64, 64))), label_name="seg")
    assert [r.status for r in again.results] == ["already complete"] * 2


def test_batch_killed_midway_resumes_only_missing_chunks(trained, tmp_path, cli_env):
    from napari_affmae.data import synthetic_em

    images = [synthetic_em((6, 96, 96), seed=s)[0] for s in (10, 11)]
    paths = _datasets(tmp_path, images)
    checksums = {p: _image_checksum(p) for p in paths}
    log = tmp_path / "batch.jsonl"
    args = [PYTHON, "-m", "napari_affmae.cli", "batch", str(trained["segmentation"]), str(tmp_path / "*.ome.zarr"),
            "--name", "seg", "--tile-size", "64", "--device", "cpu", "--quiet", "--log-file", str(log)]
    proc = subprocess.Popen(args, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240

    def bands_done() -> int:
        if not log.exists():
            return 0
        return sum('chunks)' in line for line in log.read_text().splitlines())

    while time.time() < deadline and proc.poll() is None and bands_done() < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "the batch run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = bands_done()
    assert 2 <= done_before < 12
    rerun = subprocess.run(args + ["--report", str(tmp_path / "report.json")], env=cli_env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((tmp_path / "report.json").read_text())["results"]
    written = sum(r["chunks_written"] for r in report)
    assert sum(r["chunks_total"] for r in report) == 12
    # only what was missing: the logged bands (and a band stored just before the kill, not yet logged) are skipped
    assert 12 - done_before - 1 <= written <= 12 - done_before
    package = load_package(trained["segmentation"])
    for path, image in zip(paths, images):
        assert _image_checksum(path) == checksums[path]
        labels = np.asarray(_read_labels_with_ome_zarr(path, "seg").data[0])
        np.testing.assert_array_equal(labels, segment(package, image, SegmentConfig(tile_size=(64, 64))))


def test_an_interrupted_overwrite_is_named_then_resumed(trained, tmp_path):
    """After an interrupted overwrite, a rerun without it reports the overwrite in progress (not "already
    complete"); a rerun with it and the same package computes only the chunks the staging lacks."""
    import pytest

    from napari_affmae.data import synthetic_em
    from napari_affmae.engine import CancelToken, JobCancelled

    image = synthetic_em((4, 64, 64), seed=2)[0]
    dataset = _datasets(tmp_path, [image])[0]
    config = BatchConfig(SegmentConfig(tile_size=(32, 32), device="cpu"))
    first = batch_segment(dataset, trained["segmentation"], config, label_name="seg").results[0]
    assert first.status == "done"
    token, staged_chunks = CancelToken(), []

    def stop_after_two_bands(event) -> None:
        if event.message and "chunks)" in event.message:
            staged_chunks.append(event.message)
            if len(staged_chunks) == 2:
                token.cancel()

    overwrite = BatchConfig(SegmentConfig(tile_size=(32, 32), device="cpu"), overwrite=True)
    with pytest.raises(JobCancelled):
        batch_segment(dataset, trained["segmentation"], overwrite, label_name="seg", progress=stop_after_two_bands,
                      cancel=token)
    staged = dataset / "labels" / "seg.affmae-new"
    done = int(zarr.open_array(str(staged / "affmae_progress"), mode="r")[...].sum())
    assert 0 < done < first.chunks_total
    plain = batch_segment(dataset, trained["segmentation"], config, label_name="seg").results[0]
    assert plain.status == "failed" and "is being overwritten" in plain.error and "--overwrite" in plain.error
    again = batch_segment(dataset, trained["segmentation"], overwrite, label_name="seg").results[0]
    assert again.status == "done" and again.chunks_written == first.chunks_total - done
    assert not staged.exists()
    labels = np.asarray(_read_labels_with_ome_zarr(dataset, "seg").data[0])
    np.testing.assert_array_equal(labels, segment(load_package(trained["segmentation"]), image,
                                                  SegmentConfig(tile_size=(32, 32), device="cpu")))


def test_batch_config_holds_a_segment_config():
    config = BatchConfig(SegmentConfig(tile_size=(64, 96), overlap=0.1, batch_size=2), overwrite=True)
    assert config.segment.tile_size == (64, 96) and config.segment.batch_size == 2 and config.overwrite
    assert BatchConfig().segment == SegmentConfig()  # the tiling defaults are SegmentConfig's
    with pytest.raises(ValueError, match="tile_size must be multiples of 8"):
        BatchConfig(SegmentConfig(tile_size=(60, 64)))
    with pytest.raises(ValueError, match="batch segmentation writes labels"):
        BatchConfig(SegmentConfig(output="probabilities"))
    with pytest.raises(ValueError, match="every slice"):
        BatchConfig(SegmentConfig(slices=[0]))
