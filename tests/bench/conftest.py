"""Fixtures of the benchmark tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import pytest
import tifffile

from napari_affmae.data import MEMBRANE, MITOCHONDRION, synthetic_em

REPO = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` (a script that writes this repository's docs pages) as a module."""
    key = f"_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture
def bench_script() -> Callable[[str], ModuleType]:
    """Loads ``benchmarks/<name>.py`` by name."""
    return load_script


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """The real layout (vnc/, isbi2012/) with 6 x 96 x 96 synthetic stacks."""
    root = tmp_path / "data"
    image, classes = synthetic_em((6, 96, 96), seed=1, cell_size=24.0)
    other, _ = synthetic_em((6, 96, 96), seed=2, cell_size=24.0)
    _write(root / "vnc" / "stack1_raw.tif", image)
    _write(root / "vnc" / "stack1_mito.tif", (classes == MITOCHONDRION).astype(np.uint8))
    _write(root / "vnc" / "stack1_membranes.tif", (classes == MEMBRANE).astype(np.uint8))
    _write(root / "vnc" / "stack2_raw.tif", other)
    return root
