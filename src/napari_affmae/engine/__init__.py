"""Training and inference jobs. No Qt, no napari imports: widgets and CLI are front ends.

Every job takes a config dataclass, an optional progress callback (called with `ProgressEvent`)
and an optional `CancelToken`. On cancel a job raises `JobCancelled`; training jobs first write a
valid checkpoint and package, and the exception's ``result`` attribute holds the job's result
object with ``cancelled=True`` (so a front end can say "cancelled, checkpoint saved at ...").

>>> from napari_affmae.engine import PretrainConfig, pretrain, FinetuneConfig, finetune, segment
"""
from .batch import BatchConfig, BatchReport, DatasetResult, batch_segment, find_datasets
from .checkpoint import CheckpointError, load_checkpoint
from .device import resolve_device, resolve_precision
from .finetune import FinetuneConfig, FinetuneResult, finetune
from .package import ModelPackage, PackageError, load_package, save_package
from .pretrain import PretrainConfig, PretrainResult, pretrain
from .progress import CancelToken, JobCancelled, ProgressCallback, ProgressEvent
from .segment import SegmentConfig, segment

__all__ = [
    "BatchConfig",
    "BatchReport",
    "CancelToken",
    "CheckpointError",
    "DatasetResult",
    "FinetuneConfig",
    "FinetuneResult",
    "JobCancelled",
    "ModelPackage",
    "PackageError",
    "PretrainConfig",
    "PretrainResult",
    "ProgressCallback",
    "ProgressEvent",
    "SegmentConfig",
    "batch_segment",
    "find_datasets",
    "finetune",
    "load_checkpoint",
    "load_package",
    "pretrain",
    "resolve_device",
    "resolve_precision",
    "save_package",
    "segment",
]
