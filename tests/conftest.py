"""Shared fixtures. Real EM data lives beside the project (never inside it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two small cores: one intra-op thread per process avoids oversubscription when pytest, a
# subprocess and Qt share the machine (measured: 100 s -> 14 s for the baseline tests).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("AFFMAE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def em_data_dir() -> Path:
    """The real EM data directory; tests that need it skip with a reason when it is absent."""
    path = shared_data_dir()
    if not (path / "vnc" / "stack1_raw.tif").exists():
        pytest.skip(f"real EM data not found at {path} (set AFFMAE_DATA)")
    return path
