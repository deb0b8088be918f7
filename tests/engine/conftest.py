"""Small trained packages shared by the engine and CLI tests (built once per session, on CPU)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@pytest.fixture(scope="session")
def em_stack() -> tuple[np.ndarray, np.ndarray]:
    """Synthetic EM stack [4, 96, 112] uint8 and its dense labels (1 membrane, 2 mito, 3 cytoplasm)."""
    from napari_affmae.data import synthetic_em

    return synthetic_em((4, 96, 112), seed=3)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, em_stack) -> dict[str, Path]:
    """A pretrained (MAE) package and a segmentation package fine-tuned from it, a few steps each."""
    from napari_affmae.data import sparse_strokes
    from napari_affmae.engine import FinetuneConfig, PretrainConfig, finetune, pretrain

    root = tmp_path_factory.mktemp("trained")
    image, truth = em_stack
    pre = pretrain(image, PretrainConfig(crop_size=(64, 64), batch_size=2, steps=3, warmup_steps=1, device="cpu",
                                         output_dir=root / "pre", checkpoint_every=10))
    strokes = sparse_strokes(truth, fraction=0.05, seed=0, slices=[0, 2])
    fine = finetune(image, strokes, FinetuneConfig(pretrained=pre.package_path, crop_size=(64, 64), batch_size=2,
                                                   steps=12, lr=2e-3, warmup_steps=2, device="cpu",
                                                   output_dir=root / "fine", checkpoint_every=100,
                                                   class_names=["membrane", "mito", "cyto"]))
    return {"pretrained": pre.package_path, "segmentation": fine.package_path, "root": root}


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: the repo's sources importable, one thread each (shared CI cores)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "kernels"), env.get("PYTHONPATH", "")])
    return env
