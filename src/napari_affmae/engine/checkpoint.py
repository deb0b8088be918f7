"""Training checkpoints for exact resume: one safetensors file, no pickle.

Tensors (model weights, optimiser moments, torch/CUDA RNG states) are safetensors entries; the
rest (step, optimiser hyper-parameters, scheduler and grad-scaler state, numpy and Python RNG
states, job config, free-form ``extra``) is one JSON document stored in the file's metadata.
The SHA-256 of the tensor bytes is stored in the metadata and verified on load, so a damaged file
is refused instead of resumed. The file is written to a temporary sibling, fsynced and renamed over the old one, so a process
killed at any moment leaves either the previous or the new checkpoint, never a torn one.

Tensor keys: ``model/<name>``, ``optim/<param index>/<state name>``, ``rng/torch``,
``rng/cuda/<device>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from .schedule import WarmupCosine

CHECKPOINT_FORMAT = "napari-affmae-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"
_META_KEY = "affmae_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is missing, foreign, damaged or does not fit the job."""


@dataclass
class RngStates:
    """The random generators a training job draws from; all are saved and restored."""

    numpy: np.random.Generator  # data sampling and augmentation
    torch: torch.Generator  # masks

    @classmethod
    def seeded(cls, seed: int) -> RngStates:
        """Seed every generator (global torch, Python ``random`` too) from ``seed``."""
        random.seed(seed)
        torch.manual_seed(seed)
        return cls(numpy=np.random.default_rng(seed), torch=torch.Generator().manual_seed(seed + 1))


@dataclass
class Checkpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optim_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def extra(self) -> dict[str, Any]:
        return self.meta.get("extra", {})

    @property
    def job_config(self) -> dict[str, Any]:
        return self.meta.get("job_config", {})


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        plain[str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain[str(index)][name] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for index, entries in meta["plain_state"].items():
        state[int(index)] = dict(entries)
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: WarmupCosine, scaler: torch.amp.GradScaler | None, step: int, rng: RngStates,
                    job_config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Atomically write the full training state after ``step`` completed steps."""
    path = Path(path)
    model = getattr(model, "module", model)  # unwrap DDP
    tensors = {f"model/{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = _optimizer_split(optimizer)
    tensors.update(optim_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/mask"] = rng.torch.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    py_state = random.getstate()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "model_name": getattr(model, "model_name", None),
        "num_classes": getattr(model, "num_classes", None),
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": {"numpy": rng.numpy.bit_generator.state, "python": [py_state[0], list(py_state[1]), py_state[2]]},
        "job_config": job_config,
        "extra": extra or {},
    }
    meta["tensors_sha256"] = hashlib.sha256(_data_section(save_safetensors_bytes(tensors))).hexdigest()
    data = save_safetensors_bytes(tensors, metadata={_META_KEY: json.dumps(meta, allow_nan=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _data_section(data: bytes) -> bytes:
    """The tensor bytes of a safetensors file (after the 8-byte length and the JSON header); they do not
    depend on the metadata, so their checksum can be stored in it."""
    if len(data) < 8:
        raise CheckpointError("the checkpoint file is truncated (no safetensors header)")
    header = int.from_bytes(data[:8], "little")
    if 8 + header > len(data):
        raise CheckpointError("the checkpoint file is truncated (header reaches past the end)")
    return data[8 + header:]


def find_checkpoint(location: str | os.PathLike) -> Path:
    """A checkpoint file, or a directory holding ``checkpoint.safetensors`` -> the file path."""
    location = Path(location)
    candidate = location / CHECKPOINT_NAME if location.is_dir() else location
    if not candidate.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {location} (expected {CHECKPOINT_NAME})")
    return candidate


def load_checkpoint(location: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` (file or its directory)."""
    path = find_checkpoint(location)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(_META_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({err})") from err
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a napari-affmae training checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"{path}: the checkpoint metadata is damaged ({err}); resume from another checkpoint "
                              "or start again without --resume") from err
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"version {meta.get('version')!r}")
    expected = meta.get("tensors_sha256")
    if expected is not None and hashlib.sha256(_data_section(path.read_bytes())).hexdigest() != expected:
        raise CheckpointError(f"{path} is damaged: its tensors do not match the checksum written with them; resume "
                              "from another checkpoint or start again with --overwrite")
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    rng = {k: v for k, v in tensors.items() if k.startswith("rng/")}
    return Checkpoint(step=int(meta["step"]), model_state=model_state, meta=meta, optim_tensors=optim,
                      rng_tensors=rng, path=path)


def restore_checkpoint(checkpoint: Checkpoint, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: WarmupCosine, scaler: torch.amp.GradScaler | None, rng: RngStates) -> int:
    """Load model, optimiser, scheduler, scaler and every RNG state; returns the step to continue from."""
    model = getattr(model, "module", model)
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
        optimizer.load_state_dict(_optimizer_join(checkpoint.optim_tensors, checkpoint.meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{checkpoint.path} does not fit this model/optimiser: {err}") from err
    scheduler.load_state_dict(checkpoint.meta["scheduler"])
    if scaler is not None and checkpoint.meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(checkpoint.meta["scaler"])
    torch.set_rng_state(checkpoint.rng_tensors["rng/torch"])
    rng.torch.set_state(checkpoint.rng_tensors["rng/mask"])
    cuda_states = [checkpoint.rng_tensors[k] for k in sorted(checkpoint.rng_tensors) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    rng.numpy.bit_generator.state = checkpoint.meta["rng"]["numpy"]
    version, internal, gauss = checkpoint.meta["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    return checkpoint.step
