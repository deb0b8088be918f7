"""Device and numeric precision: ``"auto"`` picks cuda -> mps -> cpu, never hard-codes cuda.

Precision ``"auto"``: bf16 autocast on CUDA devices that support it, else fp16 autocast with a
gradient scaler; fp32 on MPS and CPU. ``"fp32"``, ``"bf16"``, ``"fp16"`` force a choice
(half precision on CPU is refused: it is slow and ill-supported there).
"""
from __future__ import annotations

import contextlib
import os
import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"`` | ``"mps"`` -> an available torch.device.

    Under torchrun (``LOCAL_RANK`` set, or ``local_rank`` given) a bare ``"cuda"`` becomes
    ``cuda:<local_rank>`` so every process drives its own GPU.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name).strip().lower()
    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif _mps_available():
            name = "mps"
        else:
            name = "cpu"
    kind = name.split(":")[0]
    if kind not in DEVICES[1:]:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device auto or cpu")
        if name == "cuda":
            index = (local_rank or 0) % max(torch.cuda.device_count(), 1)
            return torch.device("cuda", index)
        return torch.device(name)
    if kind == "mps" and not _mps_available():
        raise ValueError("device 'mps' was requested but Apple MPS is not available; use --device auto or cpu")
    return torch.device(kind)


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """Compute dtype for autocast on ``device``: float32 means autocast is off."""
    precision = str(precision).strip().lower()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = _DTYPES[precision]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"precision {precision} is not supported on the CPU; use fp32 (or auto)")
    return dtype


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast context for ``dtype`` on ``device``; a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
