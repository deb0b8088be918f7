"""Every registered pretraining family runs through the engine's pretrain and finetune jobs."""
from __future__ import annotations

import pytest

from napari_affmae.data import sparse_strokes, synthetic_em
from napari_affmae.engine import FinetuneConfig, PretrainConfig, finetune, load_package, pretrain


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
