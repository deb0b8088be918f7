"""The writer contributions (Labels layer -> OME-Zarr labels group) through napari's save, and the
npe2 manifest: it validates and every widget opens from the Plugins menu entry."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_affmae.data import CLASS_NAMES, synthetic_em
from napari_affmae.io import read_image, write_ome_zarr_image
from napari_affmae.io.omezarr import ngff_attrs

pytestmark = pytest.mark.gui


def _image_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "labels" not in p.relative_to(path).parts):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def _labels_level0(image_path: Path, name: str) -> tuple[np.ndarray, dict]:
    group = zarr.open_group(str(image_path / "labels" / name), mode="r")
    attrs = ngff_attrs(group)
    return np.asarray(group[attrs["multiscales"][0]["datasets"][0]["path"]]), attrs


def test_save_labels_layer_into_an_existing_ome_zarr_image(make_napari_viewer, tmp_path):
    image, truth = synthetic_em((2, 72, 96), seed=0)
    path = Path(write_ome_zarr_image(tmp_path / "em.zarr", image, "zyx", levels=2))
    before = _image_digest(path)
    viewer = make_napari_viewer()
    layer = viewer.add_labels(truth.astype(np.int32), name="my strokes", metadata={"class_names": list(CLASS_NAMES)})
    viewer.layers.selection = {layer}
    written = viewer.layers.save(str(path), selected=True, plugin="napari-affmae")
    assert written == [str(path / "labels" / "my_strokes")]
    level0, attrs = _labels_level0(path, "my_strokes")
    assert level0.dtype == np.uint8 and np.array_equal(level0, truth)
    assert attrs["image-label"]["source"] == {"image": "../../"}
    assert [p["class"] for p in attrs["image-label"]["properties"]] == list(CLASS_NAMES)
    assert len(attrs["multiscales"][0]["datasets"]) == 2  # the image's pyramid, mirrored
    level1 = np.asarray(zarr.open_group(str(path / "labels" / "my_strokes"), mode="r")[
        attrs["multiscales"][0]["datasets"][1]["path"]])
    assert np.array_equal(level1, truth[:, ::2, ::2])  # nearest-neighbour downsampling
    assert "my_strokes" in ngff_attrs(zarr.open_group(str(path / "labels"), mode="r"))["labels"]
    assert _image_digest(path) == before

    # saving again after more painting replaces our own labels group
    layer.data[0, :10, :10] = 2
    viewer.layers.save(str(path), selected=True, plugin="napari-affmae")
    assert np.array_equal(_labels_level0(path, "my_strokes")[0][0, :10, :10], np.full((10, 10), 2))

    # ome-zarr's reader finds the labels next to the image
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(path)))())
    assert any(node.load(Label) is not None for node in nodes)


def test_writer_refuses_bad_targets(make_napari_viewer, tmp_path):
    from napari_affmae._writer import OmeZarrSaveError, write_labels_layer

    image, truth = synthetic_em((64, 80), seed=1)
    path = Path(write_ome_zarr_image(tmp_path / "flat.zarr", image, "yx"))
    viewer = make_napari_viewer()
    layer = viewer.add_labels(truth, name="labels")
    viewer.layers.selection = {layer}
    # the message reaches the user: napari passes a non-ValueError from a writer on (it hides ValueErrors)
    with pytest.raises(OmeZarrSaveError, match="does not exist"):
        viewer.layers.save(str(tmp_path / "new.zarr"), selected=True, plugin="napari-affmae")
    (tmp_path / "plain.zarr").mkdir()
    with pytest.raises(OmeZarrSaveError, match="cannot save labels into"):
        viewer.layers.save(str(tmp_path / "plain.zarr"), selected=True, plugin="napari-affmae")
    with pytest.raises(OmeZarrSaveError, match="does not match|must cover"):
        write_labels_layer(str(path), np.zeros((10, 10), np.uint8), {"name": "small"})
    foreign = path / "labels" / "theirs"
    zarr.open_group(str(foreign), mode="w").attrs["note"] = "written by another tool"
    with pytest.raises(FileExistsError, match="not written by napari-affmae"):
        write_labels_layer(str(path), truth, {"name": "theirs"})
    assert dict(zarr.open_group(str(foreign), mode="r").attrs) == {"note": "written by another tool"}


def test_save_image_with_labels_to_a_new_ome_zarr(make_napari_viewer, tmp_path):
    image, truth = synthetic_em((2, 72, 96), seed=2)
    viewer = make_napari_viewer()
    image_layer = viewer.add_image(image, name="em", scale=(50.0, 4.6, 4.6))
    labels_layer = viewer.add_labels(truth, name="truth", scale=(50.0, 4.6, 4.6))
    viewer.layers.selection = {image_layer, labels_layer}
    target = tmp_path / "export.zarr"
    assert viewer.layers.save(str(target), selected=True, plugin="napari-affmae") == [str(target)]
    read = read_image(target)
    assert np.array_equal(np.asarray(read.array), image)
    assert read.pixel_size == {"z": 50.0, "y": 4.6, "x": 4.6}
    level0, _ = _labels_level0(target, "truth")
    assert np.array_equal(level0, truth)


def test_manifest_validates_and_every_widget_opens(make_napari_viewer):
    result = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-affmae"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr

    from napari_affmae.widgets import BatchWidget, FinetuneWidget, PretrainWidget, SegmentWidget

    viewer = make_napari_viewer()
    expected = {"Pretrain": PretrainWidget, "Fine-tune": FinetuneWidget, "Segment": SegmentWidget,
                "Batch OME-Zarr": BatchWidget}
    for name, cls in expected.items():
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-affmae", name)
        assert isinstance(widget, cls)
    viewer.open_sample("napari-affmae", "synthetic_em")  # the sample stays in the manifest
    assert "Synthetic EM" in viewer.layers
