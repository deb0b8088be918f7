"""napari dock widgets (the only part of the package that imports napari and Qt).

Thin front ends over `napari_affmae.engine`: each collects parameters, runs one engine job in a
napari thread worker (progress bar with ETA, Cancel), and puts the result back as layers.

* `PretrainWidget` — "Pretrain on this image" (self-supervised, with a live loss curve, Resume).
* `FinetuneWidget` — fine-tune on painted labels, then segment the current slice.
* `SegmentWidget` — whole stack / current slice / current view -> Labels layer.
* `BatchWidget` — many OME-Zarr datasets -> ``labels/<name>`` in each, resumable.

Importing this package does no heavy work: Triton's preload and the imports a first job would make
happen when the first widget opens (`_preload.warm_up_once`).
"""
from .batch import BatchWidget
from .finetune import FinetuneWidget
from .pretrain import PretrainWidget
from .segment import SegmentWidget

__all__ = ["BatchWidget", "FinetuneWidget", "PretrainWidget", "SegmentWidget"]
