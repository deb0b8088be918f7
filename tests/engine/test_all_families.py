"""Every registered pretraining family runs through the engine's pretrain and finetune jobs."""
from __future__ import annotations

import pytest

from napari_affmae.data import sparse_strokes, synthetic_em
from napari_affmae.engine import FinetuneConfig, PretrainConfig, finetune, load_package, pretrain
from napari_affmae.models import MaskSpec


@pytest.mark.parametrize("name", ["vit_mae_tiny", "um_mae_tiny", "greenmim_tiny"])
def test_baseline_pretrains_and_finetunes_through_the_engine(tmp_path, name):
    image, labels = synthetic_em((2, 160, 160), seed=1)
    pre = pretrain([image], PretrainConfig(model=name, crop_size=(128, 128), batch_size=2, steps=2,
                                           output_dir=tmp_path / "pre", checkpoint_every=2))
    package = load_package(pre.package_path)
    assert package.model_name == name and package.task == "mae"
    strokes = sparse_strokes(labels, 0.03, seed=0)
    tuned = finetune(image, strokes, FinetuneConfig(pretrained=pre.package_path, crop_size=(128, 128), batch_size=2,
                                                    steps=2, output_dir=tmp_path / "ft"))
    seg = load_package(tuned.package_path)
    assert seg.task == "segmentation" and seg.model_name == name and seg.num_classes == 3


def _recording_batches(monkeypatch) -> list:
    """Record the masks ``[B, h, w]`` the pretraining job draws at each step."""
    from napari_affmae.engine.pretrain import PretrainTask

    masks, draw = [], PretrainTask.batch

    def batch(self, shard, device):
        x, mask = draw(self, shard, device)
        masks.append(mask.clone())
        return x, mask

    monkeypatch.setattr(PretrainTask, "batch", batch)
    return masks


def test_a_family_without_mask_fields_pretrains_with_the_mask_spec_it_is_given(tmp_path, monkeypatch):
    """ViT-MAE's config has no masking: PretrainConfig's ratio and type reach the drawn masks and the package
    records them (provenance ``mask``), not in the model config."""
    masks = _recording_batches(monkeypatch)
    image, _ = synthetic_em((2, 128, 128), seed=1)
    config = PretrainConfig(model="vit_mae_tiny", mask_ratio=0.5, mask_type="blob", crop_size=(128, 128),
                            batch_size=2, steps=2, output_dir=tmp_path / "pre", checkpoint_every=2)
    assert config.mask_spec() == MaskSpec(0.5, "blob")
    package = load_package(pretrain([image], config).package_path)
    assert len(masks) == 2 and all(m.shape == (2, 16, 16) for m in masks)
    assert all(float(m.float().mean()) == 0.5 for m in masks)  # 128 of 256 patches hidden in every crop
    assert package.provenance["mask"] == {"ratio": 0.5, "kind": "blob"}
    assert "mask_ratio" not in package.config and "mask_type" not in package.config
    masks.clear()  # the family default without a ratio: 75 % random
    pretrain([image], PretrainConfig(model="vit_mae_tiny", crop_size=(128, 128), batch_size=2, steps=1,
                                     output_dir=tmp_path / "default"))
    assert float(masks[0].float().mean()) == 0.75
