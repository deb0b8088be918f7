"""Pieces shared by the training jobs: optimiser groups, the step meter, output folders, resume lookup."""
from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import CHECKPOINT_NAME
from .progress import CancelToken, ProgressCallback, ProgressEvent

log = logging.getLogger("napari_affmae.engine")

_STAGE_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.(\d+)\.")
_MERGE = re.compile(r"^encoder\.merges\.(\d+)\.")
_STAGE_NORM = re.compile(r"^encoder\.norms\.(\d+)\.")


def layer_id(name: str, depths: tuple[int, ...]) -> int:
    """Depth of a parameter for layer-wise lr decay: stem 0, encoder blocks 1..L, everything after L + 1."""
    total = sum(depths)
    if name.startswith("encoder.stem."):
        return 0
    if match := _STAGE_BLOCK.match(name):
        stage, block = int(match[1]), int(match[2])
        return 1 + sum(depths[:stage]) + block
    if match := _MERGE.match(name):
        return 1 + sum(depths[: int(match[1]) + 1])
    if match := _STAGE_NORM.match(name):
        return sum(depths[: int(match[1]) + 1])
    return total + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and 1-D tensors; with ``layer_decay`` < 1
    each group gets ``lr_scale = layer_decay ** (L + 1 - layer_id)`` (deeper = closer to 1)."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1]; got {layer_decay}")
    depths = tuple(getattr(getattr(model, "config", None), "depths", ()) or ())
    top = sum(depths) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "token" in name or "blank" in name
        lid = layer_id(name, depths) if (depths and layer_decay < 1.0) else top
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (top - lid), "layer_id": lid}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def prepare_output_dir(path: str | Path) -> Path:
    """Create ``path`` and check that files can be written there (clear PermissionError if not)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"output location {path} exists and is a file; choose a directory")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".affmae-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError as err:
        raise PermissionError(f"output location {path} is not writable ({err.strerror}); choose another "
                              "--output-dir") from err
    except OSError as err:
        if isinstance(err, NotADirectoryError) and str(err).startswith("output location"):
            raise
        raise PermissionError(f"cannot write to output location {path} ({err.strerror or err}); choose another "
                              "--output-dir") from err
    return path


def resume_location(resume: bool | str | Path | None, output_dir: Path) -> Path | None:
    """``True`` -> the checkpoint in ``output_dir`` (None if there is none yet: a fresh start);
    a path -> that checkpoint (must exist); ``False``/None -> no resume."""
    if resume is None or resume is False:
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "auto", "latest")):
        candidate = output_dir / CHECKPOINT_NAME
        return candidate if candidate.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {resume}")
    return path


class StepMeter:
    """Throughput and ETA from a sliding window of step times."""

    def __init__(self, total: int, window: int = 20) -> None:
        self.total = total
        self.times: deque[float] = deque(maxlen=window)
        self.last = time.perf_counter()

    def tick(self) -> float:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        return self.times[-1]

    def per_step(self) -> float:
        return sum(self.times) / len(self.times) if self.times else math.nan

    def eta(self, step: int) -> float | None:
        per = self.per_step()
        return None if math.isnan(per) else per * max(self.total - step, 0)


def emit(progress: ProgressCallback | None, event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


def cancelled(cancel: CancelToken | None) -> bool:
    return cancel is not None and cancel.cancelled


def finite_or_raise(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: the loss became {loss} at step {step}; lower the learning "
                                 "rate or use fp32 precision")



def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float | None) -> None:
    """Clip (after unscaling), step through the GradScaler, and clear the gradients."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
