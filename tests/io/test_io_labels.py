"""labels/<name> writing: NGFF layout checked against the spec and ome-zarr's Reader, nearest pyramid,
resume after interruption (including kill -9 of a real process), image arrays never touched."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader

from napari_affmae.data import synthetic_em
from napari_affmae.io import LabelsWriter, write_labels, write_ome_zarr_image

CLASSES = ["membrane", "mitochondrion", "cytoplasm"]


def image_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file of the image store except the labels subtree."""
    sums = {}
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if file.is_file() and rel.parts[0] != "labels":
            sums[str(rel)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return sums


@pytest.fixture()
def em(tmp_path):
    image, labels = synthetic_em((3, 150, 101), seed=2)
    path = write_ome_zarr_image(tmp_path / "em.zarr", image, "zyx", {"z": 50.0, "y": 4.6, "x": 4.6}, levels=3,
                                chunks=(1, 64, 64))
    return Path(path), image, labels


def _ome(attrs) -> dict:
    return dict(attrs)["ome"]


def test_layout_follows_ngff_and_reads_back_with_ome_zarr(em):
    path, _, labels = em
    before = image_checksums(path)
    out = write_labels(path, "classes", labels, class_names=CLASSES, chunks=(1, 64, 64))
    assert Path(out) == path / "labels" / "classes"
    assert image_checksums(path) == before  # image arrays and metadata untouched

    image_ms = _ome(zarr.open_group(path, mode="r").attrs)["multiscales"][0]
    labels_root = _ome(zarr.open_group(path / "labels", mode="r").attrs)
    assert labels_root["labels"] == ["classes"] and labels_root["version"] == "0.5"
    group = zarr.open_group(path / "labels" / "classes", mode="r")
    ome = _ome(group.attrs)
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert ms["axes"] == image_ms["axes"]
    assert [d["path"] for d in ms["datasets"]] == [d["path"] for d in image_ms["datasets"]]
    assert [d["coordinateTransformations"] for d in ms["datasets"]] == [
        d["coordinateTransformations"] for d in image_ms["datasets"]
    ]
    il = ome["image-label"]
    assert il["source"] == {"image": "../../"}
    assert [c["label-value"] for c in il["colors"]] == [1, 2, 3]
    assert all(len(c["rgba"]) == 4 and all(0 <= v <= 255 for v in c["rgba"]) for c in il["colors"])
    assert il["properties"] == [{"label-value": i + 1, "class": n} for i, n in enumerate(CLASSES)]
    assert "affmae_progress" not in group  # bookkeeping removed once finished

    # every level: same shape as the image level, integer dtype, nearest downsampling of the level above
    image_group = zarr.open_group(path, mode="r")
    levels = [np.asarray(group[d["path"]]) for d in ms["datasets"]]
    np.testing.assert_array_equal(levels[0], labels)
    for k, d in enumerate(ms["datasets"]):
        assert levels[k].shape == image_group[d["path"]].shape
        assert np.issubdtype(levels[k].dtype, np.integer)
        if k:
            h, w = levels[k].shape[1:]
            assert levels[k - 1].shape[1] // 2 == h and levels[k - 1].shape[2] // 2 == w  # halves
            np.testing.assert_array_equal(levels[k], levels[k - 1][:, ::2, ::2][:, :h, :w])
    assert set(np.unique(levels[2])) <= {1, 2, 3}

    # ome-zarr's Reader finds the labels node, follows source.image back to the image, reads the data
    nodes = list(Reader(parse_url(str(path)))())
    label_nodes = [n for n in nodes if n.load(Label) is not None]
    assert len(label_nodes) == 1
    node = label_nodes[0]
    assert node.metadata["name"] == "classes"
    assert set(node.metadata["color"]) == {1, 2, 3}
    assert node.metadata["properties"][2] == {"class": "mitochondrion"}
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)
    assert [tuple(d.shape) for d in node.data] == [lv.shape for lv in levels]
    parent = list(Reader(parse_url(str(path / "labels" / "classes")))())
    assert any(str(n.zarr.path).rstrip("/").endswith("em.zarr") for n in parent)  # source image resolved


def test_resume_skips_finished_chunks(em):
    path, _, labels = em
    writer = LabelsWriter(path, "seg", class_names=CLASSES, chunks=(1, 64, 64))
    assert writer.grid == (3, 3, 2) and writer.n_chunks == 18
    first = writer.pending_chunks()[:7]
    for index in first:
        writer.write_chunk(index, labels[writer.chunk_region(index)])
    del writer  # "crash"
    computed = []

    def compute(region):
        computed.append(region)
        return labels[region]

    out = write_labels(path, "seg", compute, class_names=CLASSES, chunks=(1, 64, 64))
    assert len(computed) == 11
    rerun = LabelsWriter(path, "seg", class_names=CLASSES, chunks=(1, 64, 64))
    def key(region):
        return tuple((s.start, s.stop) for s in region)

    done_regions = {key(rerun.chunk_region(i)) for i in first}
    assert not done_regions & {key(r) for r in computed}
    np.testing.assert_array_equal(np.asarray(zarr.open_group(out, mode="r")["s0"]), labels)
    # a finished labels group is left alone by a further run
    assert rerun.complete and rerun.pending_chunks() == []
    write_labels(path, "seg", lambda region: pytest.fail("must not recompute"), class_names=CLASSES, chunks=(1, 64, 64))


def test_resume_after_kill_9_of_a_real_process(em, tmp_path):
    path, _, labels = em
    np.save(tmp_path / "labels.npy", labels)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from napari_affmae.io import LabelsWriter
        labels = np.load({str(tmp_path / 'labels.npy')!r})
        writer = LabelsWriter({str(path)!r}, "seg", chunks=(1, 32, 32))
        for index in writer.pending_chunks():
            writer.write_chunk(index, labels[writer.chunk_region(index)])
            print("done", flush=True)
            time.sleep(0.2)
        writer.finalize()
        print("finished", flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 4 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line.startswith("done")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert seen == 4 and proc.returncode == -signal.SIGKILL

    writer = LabelsWriter(path, "seg", chunks=(1, 32, 32))
    assert not writer.complete
    finished = int(writer.finished_mask().sum())
    assert 4 <= finished < writer.n_chunks
    before = image_checksums(path)
    computed = []
    write_labels(path, "seg", lambda r: computed.append(r) or labels[r], chunks=(1, 32, 32))
    assert len(computed) == writer.n_chunks - finished
    assert image_checksums(path) == before
    node = [n for n in Reader(parse_url(str(path)))() if n.load(Label) is not None][0]
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)


def test_ranks_split_the_chunks(em):
    path, _, _ = em
    writer = LabelsWriter(path, "seg", chunks=(1, 64, 64))
    parts = [set(writer.pending_chunks(rank, 3)) for rank in range(3)]
    assert sum(len(p) for p in parts) == writer.n_chunks
    assert set.union(*parts) == set(writer.chunk_indices())


def test_second_labels_group_is_listed_next_to_the_first(em):
    path, _, labels = em
    write_labels(path, "a", labels)
    write_labels(path, "b", (labels == 1).astype(np.uint8))
    assert _ome(zarr.open_group(path / "labels", mode="r").attrs)["labels"] == ["a", "b"]
    names = {n.metadata["name"] for n in Reader(parse_url(str(path)))() if n.load(Label) is not None}
    assert names == {"a", "b"}


def test_existing_foreign_labels_and_overwrite(em):
    path, _, labels = em
    zarr.open_group(path / "labels" / "theirs", mode="w")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_labels(path, "theirs", labels)
    write_labels(path, "theirs", labels, overwrite=True)
    write_labels(path, "theirs", np.ones_like(labels), overwrite=True)
    assert (np.asarray(zarr.open_group(path / "labels" / "theirs", mode="r")["s0"]) == 1).all()
    with pytest.raises(FileExistsError, match="chunks"):
        LabelsWriter(path, "theirs", chunks=(1, 16, 16))


def test_an_interrupted_overwrite_is_resumed_or_named(em):
    """After an interrupted overwrite: a plain rerun says an overwrite is in progress (not "complete"); an
    overwrite with the same fingerprint resumes the staged chunks; another fingerprint starts them again."""
    path, _, labels = em
    write_labels(path, "seg", np.zeros_like(labels), class_names=CLASSES, chunks=(1, 64, 64))
    staged = path / "labels" / "seg.affmae-new"
    writer = LabelsWriter(path, "seg", class_names=CLASSES, chunks=(1, 64, 64), overwrite=True, fingerprint="b" * 64)
    first = writer.pending_chunks()[:7]
    for index in first:
        writer.write_chunk(index, labels[writer.chunk_region(index)])
    del writer  # "crash"
    with pytest.raises(FileExistsError, match=r"is being overwritten.*rerun with overwrite \(--overwrite\)"):
        LabelsWriter(path, "seg", class_names=CLASSES, chunks=(1, 64, 64), fingerprint="b" * 64)
    other = LabelsWriter(path, "seg", class_names=CLASSES, chunks=(1, 64, 64), overwrite=True, fingerprint="c" * 64)
    assert len(other.pending_chunks()) == other.n_chunks  # another package: the staging starts again
    for index in first:
        other.write_chunk(index, np.ones_like(labels[other.chunk_region(index)]))
    del other
    again = LabelsWriter(path, "seg", class_names=CLASSES, chunks=(1, 64, 64), overwrite=True, fingerprint="c" * 64)
    assert again.pending_chunks() == [i for i in again.chunk_indices() if i not in first]  # resumed
    assert (np.asarray(zarr.open_group(path / "labels" / "seg", mode="r")["s0"]) == 0).all()  # still the old ones
    for index in again.pending_chunks():
        again.write_chunk(index, labels[again.chunk_region(index)])
    again.finalize()
    assert not staged.exists()
    result = np.asarray(zarr.open_group(path / "labels" / "seg", mode="r")["s0"])
    expected = labels.copy()
    for index in first:
        expected[again.chunk_region(index)] = 1
    np.testing.assert_array_equal(result, expected)
    assert _ome(zarr.open_group(path / "labels", mode="r").attrs)["labels"] == ["seg"]


def test_bad_input(em):
    path, _, labels = em
    writer = LabelsWriter(path, "seg", chunks=(1, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        writer.write_chunk((0, 0, 0), np.zeros((1, 10, 10), np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        writer.write_chunk((0, 0, 0), np.full((1, 64, 64), -1, np.int32))
    with pytest.raises(ValueError, match="integers"):
        writer.write_chunk((0, 0, 0), np.zeros((1, 64, 64), np.float32))
    with pytest.raises(IndexError):
        writer.chunk_region((5, 0, 0))
    with pytest.raises(RuntimeError, match="not written yet"):
        writer.finalize()
    with pytest.raises(ValueError, match="match the image"):
        write_labels(path, "other", labels[:, :100])
    with pytest.raises(ValueError, match="plain name"):
        LabelsWriter(path, "../escape")


def test_ngff_04_image_gets_zarr_v2_labels(tmp_path):
    image, labels = synthetic_em((96, 130), seed=1)
    path = Path(write_ome_zarr_image(tmp_path / "v04.zarr", image, "yx", levels=2, ngff_version="0.4"))
    before = image_checksums(path)
    write_labels(path, "classes", labels, class_names=CLASSES)
    assert image_checksums(path) == before
    group = zarr.open_group(path / "labels" / "classes", mode="r")
    assert group.metadata.zarr_format == 2
    attrs = dict(group.attrs)
    assert attrs["multiscales"][0]["version"] == "0.4" and attrs["image-label"]["version"] == "0.4"
    assert attrs["image-label"]["source"] == {"image": "../../"}
    assert dict(zarr.open_group(path / "labels", mode="r").attrs)["labels"] == ["classes"]
    node = [n for n in Reader(parse_url(str(path)))() if n.load(Label) is not None][0]
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)
    np.testing.assert_array_equal(np.asarray(node.data[1]), labels[::2, ::2][:48, :65])


def test_channel_axis_becomes_singleton(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, size=(2, 3, 40, 56), dtype=np.uint8)
    path = write_ome_zarr_image(tmp_path / "c.zarr", image, "czyx", levels=1)
    labels = np.random.default_rng(1).integers(0, 4, size=(3, 40, 56), dtype=np.uint8)
    write_labels(path, "seg", labels)  # labels given without the channel axis
    writer = LabelsWriter(path, "seg")
    assert writer.complete and writer.axes == "czyx"
    assert writer.chunk_region_by_axis((0, 1, 0, 0)) == {
        "c": slice(0, 1), "z": slice(1, 2), "y": slice(0, 40), "x": slice(0, 56)
    }
    level0 = np.asarray(zarr.open_group(Path(path) / "labels" / "seg", mode="r")["s0"])
    assert level0.shape == (1, 3, 40, 56)
    np.testing.assert_array_equal(level0[0], labels)
