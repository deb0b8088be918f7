"""Model packages: bit-identical round trips, no pickle, clear errors for foreign/tampered/incompatible files."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_affmae.engine.package import (MANIFEST_NAME, WEIGHTS_NAME, ModelPackage, PackageError, load_package,
                                          save_package)
from napari_affmae.models import create_model


def _model():
    torch.manual_seed(0)
    return create_model("affmae_tiny", task="segmentation", num_classes=3)


def _package(model=None) -> ModelPackage:
    return ModelPackage.from_model(model or _model(), normalization={"low": 10.0, "high": 200.0, "mean": 120.0,
                                                                       "std": 30.0},
                                   class_names=["membrane", "mito", "cyto"], pixel_size=[50.0, 4.6, 4.6],
                                   provenance={"job": "test", "steps": 3})


@pytest.mark.parametrize("name", ["model.affmae", "model_dir"])
def test_save_and_reload_is_bit_identical(tmp_path, name):
    model = _model()
    first = save_package(_package(model), tmp_path / name)
    loaded = load_package(first)
    # every tensor identical, bit for bit, and the metadata survived
    original = model.state_dict()
    assert set(loaded.state_dict) == set(original)
    for key, value in original.items():
        assert loaded.state_dict[key].dtype == value.dtype
        assert torch.equal(loaded.state_dict[key], value), key
    assert loaded.class_names == ["membrane", "mito", "cyto"]
    assert loaded.pixel_size == [50.0, 4.6, 4.6]
    assert loaded.provenance == {"job": "test", "steps": 3}
    assert loaded.stats.low == 10.0 and loaded.num_classes == 3 and loaded.label_offset == 1
    # saving the loaded package again gives the same bytes
    second = save_package(loaded, tmp_path / ("again" + first.suffix))
    if first.is_dir():
        for member in (MANIFEST_NAME, WEIGHTS_NAME):
            assert (first / member).read_bytes() == (second / member).read_bytes()
    else:
        assert first.read_bytes() == second.read_bytes()
    # the rebuilt model computes exactly what the original computes
    x = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.build_model()(x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_overwrite_replaces_atomically(tmp_path):
    path = save_package(_package(), tmp_path / "m.affmae")
    other = _model()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_package(_package(other), path)
    loaded = load_package(path)
    key = next(iter(other.state_dict()))
    assert torch.equal(loaded.state_dict[key], other.state_dict()[key])


def test_tampered_weights_are_refused(tmp_path):
    path = save_package(_package(), tmp_path / "m")
    weights = bytearray((path / WEIGHTS_NAME).read_bytes())
    weights[-5] ^= 0xFF
    (path / WEIGHTS_NAME).write_bytes(bytes(weights))
    with pytest.raises(PackageError, match="modified or damaged"):
        load_package(path)


def test_foreign_files_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pt = tmp_path / "model.pt"
    torch.save({"x": Evil()}, pt)  # a PyTorch pickle (itself a zip file)
    with pytest.raises(PackageError, match="not a model package|zip file but not a model package"):
        load_package(pt)
    raw = tmp_path / "random.affmae"
    raw.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(PackageError, match="not a model package"):
        load_package(raw)
    pickled = tmp_path / "pickled.affmae"
    pickled.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PackageError):
        load_package(pickled)
    assert not marker.exists(), "a pickle was executed"
    with pytest.raises(FileNotFoundError):
        load_package(tmp_path / "missing.affmae")


def _rewrite_zip(src: Path, dst: Path, manifest_edit=None, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(src) as archive:
        manifest = json.loads(archive.read(MANIFEST_NAME))
        weights = archive.read(WEIGHTS_NAME)
    if manifest_edit:
        manifest_edit(manifest)
    with zipfile.ZipFile(dst, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest))
        archive.writestr(WEIGHTS_NAME, weights)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return dst


def test_zip_with_path_traversal_is_refused(tmp_path):
    good = save_package(_package(), tmp_path / "good.affmae")
    bad = _rewrite_zip(good, tmp_path / "bad.affmae", extra={"../../evil.txt": b"x"})
    with pytest.raises(PackageError, match="unsafe member paths"):
        load_package(bad)
    absolute = _rewrite_zip(good, tmp_path / "abs.affmae", extra={"/etc/evil": b"x"})
    with pytest.raises(PackageError, match="unsafe"):
        load_package(absolute)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_other_version_or_architecture_is_a_clear_error(tmp_path):
    good = save_package(_package(), tmp_path / "good.affmae")

    def newer(m):
        m["format_version"] = 99

    with pytest.raises(PackageError, match="format version 99"):
        load_package(_rewrite_zip(good, tmp_path / "v99.affmae", newer))

    def unknown_model(m):
        m["model_name"] = "unet_giant"

    with pytest.raises(PackageError, match="does not know"):
        load_package(_rewrite_zip(good, tmp_path / "unet.affmae", unknown_model))

    def other_dims(m):
        m["config"]["dims"] = [96, 192, 384, 512]

    pkg = load_package(_rewrite_zip(good, tmp_path / "dims.affmae", other_dims))
    with pytest.raises(PackageError, match="do not fit"):
        pkg.build_model()

    def foreign(m):
        m["format"] = "someone-else"

    with pytest.raises(PackageError, match="not a napari-affmae model package"):
        load_package(_rewrite_zip(good, tmp_path / "foreign.affmae", foreign))
    with pytest.raises(PackageError, match="segmentation package, but a pretraining"):
        load_package(good, expect_task="mae")

    def other_scope(m):
        m["normalization_scope"] = "tile"

    with pytest.raises(PackageError, match="unknown normalization_scope 'tile'"):
        load_package(_rewrite_zip(good, tmp_path / "scope.affmae", other_scope))

    def older(m):  # written before packages named their normalisation scope
        del m["normalization_scope"]

    assert load_package(good).normalization_scope == "image"
    assert load_package(_rewrite_zip(good, tmp_path / "older.affmae", older)).normalization_scope == "image"


@pytest.mark.parametrize("name, legacy, mask", [
    ("affmae_tiny", {"mask_ratio": 0.6, "mask_type": "random"}, {"ratio": 0.6, "kind": "random"}),
    ("vit_mae_tiny", {"mask_ratio": 0.5}, {"ratio": 0.5, "kind": "random"}),
    ("greenmim_tiny", {"mask_ratio": 0.75}, {"ratio": 0.75, "kind": "unit"}),
])
def test_old_packages_with_masking_in_the_model_config_still_load(tmp_path, caplog, name, legacy, mask):
    """Packages written when masking was a model-config field: the fields are dropped with one log line, and a
    pretraining package's provenance records them as the masks it was trained with."""
    from napari_affmae.engine.pretrain import package_mask
    from napari_affmae.models import MaskSpec

    torch.manual_seed(0)
    saved = save_package(ModelPackage.from_model(create_model(name), provenance={"job": "pretrain"}),
                         tmp_path / "new.affmae")

    def old_style(manifest):
        manifest["config"].update(legacy)

    with caplog.at_level("INFO", logger="napari_affmae.engine.package"):
        package = load_package(_rewrite_zip(saved, tmp_path / "old.affmae", old_style), expect_task="mae")
    assert not set(legacy) & set(package.config)
    assert package.provenance["mask"] == mask and package_mask(package) == MaskSpec(**mask)
    assert [r.message for r in caplog.records if "masking is a pretraining setting" in r.message] == [
        f"{tmp_path / 'old.affmae'}: {legacy} in the model config ignored (masking is a pretraining setting now)"]
    model = package.build_model()
    for key, value in load_package(saved).state_dict.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_old_segmentation_package_with_masking_loads_and_fine_tuned_models_build(tmp_path):
    saved = save_package(_package(), tmp_path / "seg.affmae")

    def old_style(manifest):
        manifest["config"].update(mask_ratio=0.5, mask_type="blob")

    package = load_package(_rewrite_zip(saved, tmp_path / "old.affmae", old_style), expect_task="segmentation")
    assert "mask_ratio" not in package.config and "mask" not in package.provenance
    assert package.build_model().num_classes == 3
