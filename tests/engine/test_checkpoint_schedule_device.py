"""Checkpoints (exact state round trip), the lr schedule, layer-wise decay groups, device/precision choice."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from napari_affmae.engine.checkpoint import (CheckpointError, RngStates, load_checkpoint, restore_checkpoint,
                                             save_checkpoint)
from napari_affmae.engine.device import make_grad_scaler, resolve_device, resolve_precision
from napari_affmae.engine.schedule import WarmupCosine, warmup_cosine
from napari_affmae.engine.training import param_groups
from napari_affmae.models import create_model


def _trained_state():
    rng = RngStates.seeded(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model.model_name = "toy"
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=2, base_lr=1e-2)
    for step in range(3):
        sched.apply(step)
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    rng.numpy.random(3)
    return model, opt, sched, rng


def test_checkpoint_restores_everything_exactly(tmp_path):
    model, opt, sched, rng = _trained_state()
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", model=model, optimizer=opt, scheduler=sched, scaler=None,
                           step=3, rng=rng, job_config={"lr": 1e-2}, extra={"losses": [1.0, 0.5, math.nan]})
    # what the original would draw next
    expect = (torch.rand(4), rng.numpy.random(4), random.random(), torch.rand(2, generator=rng.torch))

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(param_groups(model2, 0.05), lr=1e-2)
    sched2 = WarmupCosine(opt2, total_steps=1, warmup_steps=0, base_lr=1.0)
    rng2 = RngStates.seeded(99)
    checkpoint = load_checkpoint(tmp_path)  # the directory works too
    assert checkpoint.step == 3 and checkpoint.job_config == {"lr": 1e-2}
    assert checkpoint.extra["losses"][:2] == [1.0, 0.5] and math.isnan(checkpoint.extra["losses"][2])
    step = restore_checkpoint(checkpoint, model=model2, optimizer=opt2, scheduler=sched2, scaler=None, rng=rng2)
    assert step == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for group1, group2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for key in group1:
            assert torch.equal(torch.as_tensor(group1[key]), torch.as_tensor(group2[key])), key
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert sched2.state_dict() == sched.state_dict()
    got = (torch.rand(4), rng2.numpy.random(4), random.random(), torch.rand(2, generator=rng2.torch))
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]
    assert torch.equal(got[3], expect[3])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _rewrite_meta(path, change) -> None:
    """Rewrite a checkpoint's JSON metadata with ``change(meta)``; the tensors stay byte-identical."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["affmae_checkpoint"])
    change(meta)
    save_file(load_file(str(path)), str(path), metadata={"affmae_checkpoint": json.dumps(meta, allow_nan=True)})


def test_the_checksum_covers_the_metadata_and_is_required(tmp_path, caplog):
    model, opt, sched, rng = _trained_state()
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", model=model, optimizer=opt, scheduler=sched, scaler=None,
                           step=3, rng=rng, job_config={"lr": 1e-2}, extra={"stats": {"mean": 0.25}})
    original = path.read_bytes()
    edits = {
        "step": lambda m: m.update(step=4),
        "stats": lambda m: m["extra"]["stats"].update(mean=0.26),
        "numpy rng": lambda m: m["rng"]["numpy"]["state"].update(state=m["rng"]["numpy"]["state"]["state"] + 1),
        "checksum removed": lambda m: m.pop("sha256"),
    }
    for what, change in edits.items():
        path.write_bytes(original)
        _rewrite_meta(path, change)
        with pytest.raises(CheckpointError, match="is damaged"):
            load_checkpoint(path)
    # a version-1 file (before metadata was hashed) without any checksum still loads, with a warning
    path.write_bytes(original)
    _rewrite_meta(path, lambda m: (m.pop("sha256"), m.update(version=1)))
    with caplog.at_level("WARNING", logger="napari_affmae.engine"):
        assert load_checkpoint(path).step == 3
    assert "without a checksum" in caplog.text


def test_foreign_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a napari-affmae training checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing-here")


def test_warmup_cosine_matches_the_formula():
    base, total, warm = 1e-3, 110, 10
    assert warmup_cosine(0, total, warm, base) == pytest.approx(base / 10)
    assert warmup_cosine(9, total, warm, base) == pytest.approx(base)
    # halfway through the cosine part: midpoint between base and the floor (1 % of base)
    assert warmup_cosine(60, total, warm, base) == pytest.approx((base + 0.01 * base) / 2)
    assert warmup_cosine(110, total, warm, base) == pytest.approx(0.01 * base)
    values = [warmup_cosine(s, total, warm, base) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_layer_decay_scales_encoder_depth():
    model = create_model("affmae_tiny", task="segmentation", num_classes=3)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    total = sum(model.config.depths)  # 6 blocks -> stem gets 0.5 ** 7
    assert scale_of[id(named["encoder.stem.convs.0.weight"])][0] == pytest.approx(0.5 ** (total + 1))
    assert scale_of[id(named["fusion.out.weight"])][0] == 1.0
    first_block = next(n for n in named if n.startswith("encoder.stages.0.0.") and n.endswith("weight")
                       and named[n].ndim == 2)
    last_block = next(n for n in named if n.startswith("encoder.stages.3.0.") and n.endswith("weight")
                      and named[n].ndim == 2)
    assert scale_of[id(named[first_block])][0] == pytest.approx(0.5 ** total)
    assert scale_of[id(named[last_block])][0] == pytest.approx(0.5 ** 1)
    assert scale_of[id(named["fusion.out.bias"])][1] == 0.0 and scale_of[id(named["fusion.out.weight"])][1] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_device_and_precision_choice():
    device = resolve_device("auto")
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision(torch.device("cpu"), "auto") == torch.float32
    with pytest.raises(ValueError, match="not supported on the CPU"):
        resolve_precision(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision(torch.device("cpu"), "int8")
    assert not make_grad_scaler(torch.device("cpu"), torch.float32).is_enabled()
