"""napari sample data contribution: LayerData tuples, no napari import, valid npe2 manifest."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_affmae


def test_make_synthetic_em_layer_data():
    from napari_affmae._sample_data import make_synthetic_em

    (image, image_meta, image_kind), (labels, labels_meta, labels_kind) = make_synthetic_em()
    assert (image_kind, labels_kind) == ("image", "labels")
    assert image_meta["name"] == "Synthetic EM" and labels_meta["name"] == "Synthetic EM labels"
    assert image.shape == labels.shape and image.ndim == 3
    assert image.dtype == np.uint8 and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {1, 2, 3}


def test_sample_module_does_not_import_napari():
    code = (
        "import sys; from napari_affmae._sample_data import make_synthetic_em; make_synthetic_em(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5')]; print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_manifest_declares_the_sample():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(Path(napari_affmae.__file__).with_name("napari.yaml"))
    assert manifest.name == "napari-affmae" and manifest.display_name == "AFFMAE"
    samples = {s.display_name: s for s in manifest.contributions.sample_data}
    assert "Synthetic EM" in samples
    command = {c.id: c for c in manifest.contributions.commands}[samples["Synthetic EM"].command]
    module, func = command.python_name.split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.gui
def test_sample_opens_in_a_real_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-affmae", "synthetic_em")
    assert [layer.name for layer in viewer.layers] == ["Synthetic EM", "Synthetic EM labels"]
    image_layer, labels_layer = viewer.layers
    assert type(image_layer).__name__ == "Image" and type(labels_layer).__name__ == "Labels"
    assert image_layer.data.shape == labels_layer.data.shape and image_layer.data.ndim == 3
    assert viewer.dims.ndim == 3
