"""Fixtures of the kernel tests: run the Triton code itself.

Without a GPU the kernels run under the Triton CPU interpreter. Triton picks the interpreter
when an ``@triton.jit`` decorator executes, i.e. when a module defining kernels is imported --
both Triton's own ``triton.language.standard`` (``tl.sum``, ``tl.max``, ...) and our kernel
modules. Hence:

* this conftest sets ``TRITON_INTERPRET=1`` at collection time, before any test of the
  session imports Triton (it stays set for the session; nothing else can run Triton on a CPU);
* the ``tops`` fixture checks the mode anyway and, if Triton or the kernels were imported in
  the other mode earlier in the session, reloads those modules in the right mode.

``AFFMAE_KERNELS_TEST_DEVICE=cpu|cuda`` forces the interpreter or compiled CUDA kernels;
default: compiled on CUDA when a GPU is visible, interpreter otherwise.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

#: Modules whose @triton.jit functions must be rebuilt when the mode changes (in this order).
TRITON_LIBRARY_MODULES = ("triton.language.standard", "triton.language.random", "triton.language")
KERNEL_MODULES = ("affmae_kernels.triton_attention", "affmae_kernels.triton_merge", "affmae_kernels.triton_knn",
                  "affmae_kernels.triton_ops")


def _use_interpreter() -> bool:
    choice = os.environ.get("AFFMAE_KERNELS_TEST_DEVICE", "auto").lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise pytest.UsageError(f"AFFMAE_KERNELS_TEST_DEVICE={choice!r}: use auto, cpu or cuda")
    if choice == "auto":
        return not torch.cuda.is_available()
    return choice == "cpu"


if _use_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415
    return isinstance(fn, InterpretedFunction)


def _ensure_mode(interpret: bool):
    """Import affmae_kernels.triton_ops with Triton and our kernels built for the wanted mode."""
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    import triton.language as tl  # noqa: PLC0415

    if _interpreted(tl.sum) != interpret:
        for name in TRITON_LIBRARY_MODULES:
            importlib.reload(importlib.import_module(name))
    ops = importlib.import_module("affmae_kernels.triton_ops")
    if ops.interpreted() != interpret or _interpreted(ops._att.na_fwd_token_kernel) != interpret:
        for name in KERNEL_MODULES:
            importlib.reload(sys.modules[name])
    assert ops.interpreted() == interpret and _interpreted(tl.sum) == interpret
    return ops


@pytest.fixture(scope="module")
def tops():
    """`affmae_kernels.triton_ops`, built for the interpreter on CPU (compiled on CUDA)."""
    interpret = _use_interpreter()
    if not interpret:
        pytest.importorskip("triton", reason="Triton is not installed on this platform")
    return _ensure_mode(interpret)


@pytest.fixture(scope="module")
def device(tops) -> torch.device:
    return torch.device("cpu" if tops.interpreted() else "cuda")
