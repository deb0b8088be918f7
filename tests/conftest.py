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
def package_without_fields():
    """``drop(src, dst, keys)``: copy the package archive ``src`` to ``dst`` with ``keys`` removed from its
    manifest's model config, as a package written before those fields existed -> ``dst``."""
    import json
    import zipfile

    def drop(src: Path, dst: Path, keys) -> Path:
        with zipfile.ZipFile(src) as archive:
            items = {name: archive.read(name) for name in archive.namelist()}
        name = next(n for n in items if n.endswith(".json"))
        manifest = json.loads(items[name])
        for key in keys:
            manifest["config"].pop(key)
        items[name] = json.dumps(manifest).encode()
        with zipfile.ZipFile(dst, "w") as archive:
            for name, data in items.items():
                archive.writestr(name, data)
        return dst

    return drop


@pytest.fixture
def em_data_dir() -> Path:
    """The real EM data directory; tests that need it skip with a reason when it is absent."""
    path = shared_data_dir()
    if not (path / "vnc" / "stack1_raw.tif").exists():
        pytest.skip(f"real EM data not found at {path} (set AFFMAE_DATA)")
    return path
