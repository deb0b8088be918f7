"""Imports done once, when the first dock widget opens, so that jobs neither crash nor freeze the viewer.

`warm_up_once` runs both steps below the first time a `JobWidget` is built (not when
``napari_affmae.widgets`` is imported: importing the widgets does no heavy work).

`preload_triton`: load Triton's native library so that it cannot clash with the OpenGL driver's LLVM.

Inside napari the OpenGL canvas exists before any AFFMAE job runs. With Mesa drivers (llvmpipe,
radeonsi, ...) that loads the system libLLVM into the process; importing ``triton`` afterwards
(PyTorch imports it on the first optimiser step through ``torch._dynamo``) binds Triton's own
statically linked LLVM against those already loaded symbols and crashes the process
(segmentation fault). Loading Triton with ``RTLD_DEEPBIND`` makes it resolve to its own copy.
Harmless where there is no clash (NVIDIA drivers, no display) and a no-op without Triton.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)
_warmed_up = False


def warm_up_once() -> None:
    """`preload_triton`, then `warm_up_imports`; only the first call does anything (call it on the GUI
    thread, before a job can run)."""
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    preload_triton()  # before torch imports triton next to the OpenGL driver's LLVM
    warm_up_imports()  # keep the first job from freezing the viewer while it imports


def preload_triton() -> bool:
    """Import ``triton`` with ``RTLD_DEEPBIND`` (Linux) unless it is already imported; True if imported now."""
    if "triton" in sys.modules or not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken Triton install only disables the Triton kernels
        log.warning("could not import triton; AFFMAE uses its PyTorch reference kernels", exc_info=True)
        return False
    finally:
        sys.setdlopenflags(flags)
    return True


def warm_up_imports() -> None:
    """Import, on the GUI thread, what a job would otherwise import lazily in its worker thread.

    Importing a module holds Python's GIL for long stretches (loading extension modules, running
    module bodies); done inside the worker it froze the viewer for up to ~1.3 s at the start of the
    first job (measured on 2 CPU cores). Here it costs the same time once, when a widget is opened.
    ``torch._dynamo`` and ``torch.distributed`` are pulled in by the first optimiser and the
    distributed set-up; the I/O stack by the engine's input handling.
    """
    import torch

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # imports torch._dynamo through the optimiser
    import torch.distributed  # noqa: F401

    import affmae_kernels  # noqa: F401

    from .. import io  # noqa: F401


def warm_up_live_imports() -> None:
    """Import, on the GUI thread when the Fine-tune widget opens, what the first live-preview update would
    import in its worker: scikit-learn's forest, scikit-image's filter bank and SciPy's ndimage (~1-2 s
    on 2 CPU cores). Imported inside the worker they froze the viewer for 0.2-0.45 s at a time during
    the first update (measured on a 1024 x 1024 VNC slice); preloaded, the longest stall was 0.13 s."""
    from scipy import ndimage  # noqa: F401
    from skimage.feature import multiscale_basic_features  # noqa: F401
    from sklearn.ensemble import RandomForestClassifier  # noqa: F401
