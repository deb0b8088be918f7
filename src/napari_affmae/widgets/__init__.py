"""napari dock widgets (the only part of the package that imports napari and Qt).

Thin front ends over `napari_affmae.engine`: each collects parameters, runs one engine job in a
napari thread worker (progress bar with ETA, Cancel), and puts the result back as layers.

* `PretrainWidget` — "Pretrain on this image" (self-supervised, with a live loss curve, Resume).
* `FinetuneWidget` — fine-tune on painted labels, then segment the current slice.
* `SegmentWidget` — whole stack / current slice / current view -> Labels layer.
* `BatchWidget` — many OME-Zarr datasets -> ``labels/<name>`` in each, resumable.
"""
from ._preload import preload_triton, warm_up_imports

preload_triton()  # before torch imports triton next to the OpenGL driver's LLVM (see _preload)
warm_up_imports()  # keep the first job from freezing the viewer while it imports (see _preload)

from .batch import BatchWidget  # noqa: E402
from .finetune import FinetuneWidget  # noqa: E402
from .pretrain import PretrainWidget  # noqa: E402
from .segment import SegmentWidget  # noqa: E402

__all__ = ["BatchWidget", "FinetuneWidget", "PretrainWidget", "SegmentWidget"]
