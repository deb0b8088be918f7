"""Training checkpoints for exact resume: one safetensors file, no pickle.

Tensors (model weights, optimiser moments, torch/CUDA RNG states) are safetensors entries; the
rest (step, optimiser hyper-parameters, scheduler and grad-scaler state, numpy and Python RNG
states, job config, free-form ``extra``) is one JSON document stored in the file's metadata.
The SHA-256 of the whole content (the JSON document in canonical form, the tensor table and the
tensor bytes) is stored in the metadata as ``sha256`` and verified on load, so a damaged file (a
weight, the step, an RNG state or the normalisation statistics) is refused instead of resumed.
Version 1 files hashed the tensor bytes only (``tensors_sha256``), or nothing; they still load, with
a logged warning when nothing can be verified. The file is written to a temporary sibling, fsynced and renamed over the old one, so a process
killed at any moment leaves either the previous or the new checkpoint, never a torn one.

Tensor keys: ``model/<name>``, ``optim/<param index>/<state name>``, ``rng/torch``,
``rng/cuda/<device>``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .schedule import WarmupCosine

CHECKPOINT_FORMAT = "napari-affmae-checkpoint"
CHECKPOINT_VERSION = 2  # 2: ``sha256`` over metadata + tensors, required; 1: tensor bytes only, optional
_READABLE_VERSIONS = (1, CHECKPOINT_VERSION)
CHECKPOINT_NAME = "checkpoint.safetensors"
_META_KEY = "affmae_checkpoint"
_HASH_KEY = "sha256"

log = logging.getLogger("napari_affmae.engine")


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
    table, body = _split(save_safetensors_bytes(tensors))
    meta[_HASH_KEY] = _content_sha256(json.loads(json.dumps(meta, allow_nan=True)), table, body)
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


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file -> (its JSON header, ``__metadata__`` included; the tensor bytes after it)."""
    if len(data) < 8:
        raise CheckpointError("the checkpoint file is truncated (no safetensors header)")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise CheckpointError("the checkpoint file is truncated (header reaches past the end)")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as err:
        raise CheckpointError(f"the checkpoint header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError("the checkpoint header is not a JSON object")
    return header, data[8 + size:]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def _content_sha256(meta: dict[str, Any], header: dict[str, Any], body: bytes) -> str:
    """SHA-256 over the metadata (canonical JSON, without the hash itself), the tensor table (names,
    dtypes, shapes, offsets; not ``__metadata__``, which holds the hash) and the tensor bytes."""
    digest = hashlib.sha256()
    digest.update(_canonical({k: v for k, v in meta.items() if k != _HASH_KEY}))
    digest.update(_canonical({k: v for k, v in header.items() if k != "__metadata__"}))
    digest.update(body)
    return digest.hexdigest()


def _verify(path: Path, meta: dict[str, Any], header: dict[str, Any], body: bytes) -> None:
    """Refuse a checkpoint whose content does not match its stored checksum (or, in the current format,
    that has none); a version-1 file without one loads with a warning."""
    damaged = (f"{path} is damaged: its content does not match the checksum written with it; resume from "
               "another checkpoint or start again with --overwrite")
    if meta["version"] == 1:
        expected = meta.get("tensors_sha256")
        if expected is None:
            log.warning("%s is an older checkpoint without a checksum; it cannot be verified", path)
        elif hashlib.sha256(body).hexdigest() != expected:
            raise CheckpointError(damaged)
        return
    expected = meta.get(_HASH_KEY)
    if not isinstance(expected, str):
        raise CheckpointError(f"{path} is damaged: its checksum is missing; resume from another checkpoint or "
                              "start again with --overwrite")
    if _content_sha256(meta, header, body) != expected:
        raise CheckpointError(damaged)


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
        data = path.read_bytes()  # read once: verified and parsed from the same bytes
        header, body = _split(data)
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({err})") from err
    raw = (header.get("__metadata__") or {}).get(_META_KEY)
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a napari-affmae training checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"{path}: the checkpoint metadata is damaged ({err}); resume from another checkpoint "
                              "or start again without --resume") from err
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or \
            meta.get("version") not in _READABLE_VERSIONS:
        found = meta if isinstance(meta, dict) else {}
        raise CheckpointError(f"{path}: unsupported checkpoint format {found.get('format')!r} "
                              f"version {found.get('version')!r}")
    _verify(path, meta, header, body)
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
