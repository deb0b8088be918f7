"""Batch segmentation of many OME-Zarr images: each gets ``labels/<name>`` next to its image.

For every dataset the labels are written with `napari_affmae.io.LabelsWriter` (NGFF image-label
metadata, nearest-neighbour pyramid, ``source.image`` link). Level 0 is computed band by band:
a band is one row of label chunks of one slice; the slice's tiles that touch the band are run
(`TiledPredictor` with a row range, so values equal a whole-slice run) and the band's chunks are
stored. Bands whose chunks were all stored by an earlier, interrupted run are skipped, so a rerun
only computes what is missing. The labels record the SHA-256 of the package; resuming them with
another package is refused (``overwrite`` starts again), so one result never mixes two models. An
overwrite is built beside the earlier labels; an interrupted one is resumed by a rerun with
``overwrite`` and the same package, and named (not reported complete) by a rerun without it. The
image group is opened read-only: image arrays are never written.

A dataset that fails (unreadable, no multiscales, ...) is recorded in the `BatchReport` with its
message and the others continue. Under torchrun the datasets are split across ranks round-robin;
every rank returns the combined report.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .device import resolve_device, resolve_precision
from .distributed import setup_distributed, teardown_distributed
from .inputs import as_input_image
from .package import ModelPackage, package_bytes
from .progress import CancelToken, JobCancelled, ProgressCallback, ProgressEvent
from .segment import SegmentConfig, SliceNormalizer, TiledPredictor, intensity_warning, model_predictor, \
    output_labels, predicted_labels_to_names, resolve_package
from .settings import setting
from .training import emit

log = logging.getLogger(__name__)


@dataclass
class BatchConfig:
    """Options of a batch run: tiling, device, precision and normalisation in ``segment`` (a `SegmentConfig`;
    batch writes labels of every slice, so its ``output`` must be "labels" and ``slices`` None), plus what
    only a batch run has."""

    segment: SegmentConfig = field(default_factory=SegmentConfig)
    overwrite: bool = setting(False, "recompute labels that are already complete")
    channel: int | None = setting(None, "channel index for multi-channel images", parse=int)
    timepoint: int | None = setting(None, "time point for time series", parse=int)
    chunks: Sequence[int] | None = None  # label chunk shape (default: one plane, <= 512 x 512)

    def __post_init__(self) -> None:
        if not isinstance(self.segment, SegmentConfig):
            raise TypeError(f"BatchConfig.segment must be a SegmentConfig; got {type(self.segment).__name__}")
        if self.segment.output != "labels":
            raise ValueError(f"batch segmentation writes labels; got output={self.segment.output!r}")
        if self.segment.slices is not None:
            raise ValueError("batch segmentation writes every slice of every dataset; leave slices unset")


@dataclass
class DatasetResult:
    path: str
    status: str  # "done" | "already complete" | "failed"
    labels_path: str | None = None
    chunks_written: int = 0
    chunks_total: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass
class BatchReport:
    label_name: str
    results: list[DatasetResult] = field(default_factory=list)

    @property
    def failed(self) -> list[DatasetResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"label_name": self.label_name, "results": [asdict(r) for r in self.results]}


def find_datasets(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand paths: an OME-Zarr directory stays; a plain folder gives its ``*.zarr`` children; a glob
    pattern gives its matches. Missing entries are kept (they fail with a clear message later)."""
    from ..io import is_zarr_path  # noqa: PLC0415

    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[str] = []
    for item in items:
        text = str(item)
        path = Path(text)
        if path.exists():
            if is_zarr_path(path):
                found.append(text)
            elif path.is_dir():
                children = sorted(str(p) for p in path.iterdir() if p.is_dir() and is_zarr_path(p))
                if not children:
                    raise ValueError(f"{path} contains no OME-Zarr datasets (*.zarr directories)")
                found.extend(children)
            else:
                found.append(text)  # a file: reported as not an OME-Zarr dataset
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise ValueError(f"the pattern {text!r} matches no files")
            found.extend(matches)
        else:
            found.append(text)
    if not found:
        raise ValueError("no datasets given")
    return list(dict.fromkeys(found))


def batch_segment(paths: str | os.PathLike | Sequence[str | os.PathLike], package: ModelPackage | str | Path,
                  config: BatchConfig | None = None, label_name: str = "affmae",
                  progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> BatchReport:
    """Segment every OME-Zarr dataset in ``paths`` into ``<dataset>/labels/<label_name>``.

    ``progress`` gets `ProgressEvent` (job "batch") with ``step`` = datasets finished and a message
    per band of chunks. On cancel `JobCancelled` is raised with ``.result`` = the report so far;
    rerunning the same command resumes.
    """
    config = config or BatchConfig()
    pkg = resolve_package(package)
    datasets = find_datasets(paths)
    fingerprint = hashlib.sha256(package_bytes(pkg)).hexdigest()  # recorded in the labels; a resume must match
    device = resolve_device(config.segment.device)
    dtype = resolve_precision(device, config.segment.precision)
    context = setup_distributed(device)
    try:
        model = pkg.build_model(device)
        predict = model_predictor(model, device, dtype)
        mine = datasets[context.rank::context.world_size]
        report = BatchReport(label_name)
        total = len(datasets)
        for i, path in enumerate(mine):
            emit(progress, ProgressEvent("batch", i, len(mine), message=f"segmenting {path}"))
            started = time.perf_counter()
            try:
                result = _segment_dataset(path, pkg, predict, config, label_name, device, progress, cancel, i,
                                          len(mine), fingerprint)
            except JobCancelled as err:
                report.results.append(DatasetResult(path, "cancelled", seconds=time.perf_counter() - started))
                err.result = report
                raise
            except (ValueError, OSError, RuntimeError, KeyError) as err:  # one bad dataset must not stop the rest
                log.warning("batch: %s failed: %s", path, err)
                result = DatasetResult(path, "failed", error=f"{type(err).__name__}: {err}")
            result.seconds = time.perf_counter() - started
            report.results.append(result)
            emit(progress, ProgressEvent("batch", i + 1, len(mine), message=f"{path}: {result.status}"))
        if context.enabled:
            gathered: list[Any] = [None] * context.world_size
            dist.all_gather_object(gathered, report.to_dict())
            merged = [DatasetResult(**r) for part in gathered for r in part["results"]]
            order = {p: n for n, p in enumerate(datasets)}
            report = BatchReport(label_name, sorted(merged, key=lambda r: order.get(r.path, total)))
        return report
    finally:
        teardown_distributed(context)


def _segment_dataset(path: str, pkg: ModelPackage, predict, config: BatchConfig, label_name: str,
                     device: torch.device, progress: ProgressCallback | None, cancel: CancelToken | None,
                     index: int, count: int, fingerprint: str) -> DatasetResult:
    from ..io import LabelsWriter, is_zarr_path  # noqa: PLC0415

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such dataset")
    if not is_zarr_path(path):
        raise ValueError(f"{path} is not an OME-Zarr dataset (batch mode reads OME-Zarr only)")
    image = as_input_image(path, channel=config.channel, timepoint=config.timepoint)
    lut, dtype = output_labels(pkg)
    named = {v: n for v, n in predicted_labels_to_names(pkg).items() if v != 0} if pkg.class_names else None
    writer = LabelsWriter(path, label_name, class_names=named, chunks=config.chunks, dtype=dtype,
                          overwrite=config.overwrite, fingerprint=fingerprint,
                          provenance={"model_package": None if pkg.path is None else str(pkg.path),
                                      "model_name": pkg.model_name, "package_sha256": fingerprint, "job": "batch"})
    if writer.complete:
        return DatasetResult(path, "already complete", writer.path, 0, writer.n_chunks)
    axes = writer.axes
    y_axis, x_axis = axes.index("y"), axes.index("x")
    lead = next((axes.index(a) for a in "zt" if a in axes and writer.shape[axes.index(a)] > 1), None)
    if lead is None:
        lead = next((axes.index(a) for a in "zt" if a in axes), None)
    tiling = config.segment
    normalizer = SliceNormalizer(pkg, image, tiling.normalization)
    warning = intensity_warning(pkg, image, tiling.normalization)
    if warning:
        log.warning("%s: %s", path, warning)
        emit(progress, ProgressEvent("batch", index, count, message=f"warning: {Path(path).name}: {warning}"))
    predictor = TiledPredictor(predict, int(pkg.num_classes), tiling.tile_size, tiling.overlap, tiling.batch_size,
                               normalizer.for_slice(0), device, cancel=cancel)
    pending = writer.pending_chunks()
    # group pending chunks by (slice, band of rows)
    bands: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    for chunk in pending:
        z = chunk[lead] if lead is not None else 0
        bands.setdefault((z, chunk[y_axis]), []).append(chunk)
    written = 0
    height, width = image.shape[-2], image.shape[-1]
    for (z, band), chunks in sorted(bands.items()):
        region = writer.chunk_region(chunks[0])
        r0, r1 = region[y_axis].start, region[y_axis].stop
        buffer = np.zeros((r1 - r0, width), dtype=writer.dtype)

        def write(a: int, b: int, logits: np.ndarray, buffer=buffer, r0=r0) -> None:
            buffer[a - r0:b - r0] = lut[logits.argmax(0)]

        z_index = z if image.ndim == 3 else 0
        predictor.normalize = normalizer.for_slice(z_index)  # per slice: computed once per slice, not per band
        predictor.run_slice(image.array, z_index, write, row_range=(r0, r1))
        for chunk in chunks:
            cols = writer.chunk_region(chunk)[x_axis]
            writer.write_chunk(chunk, buffer[:, cols])
            written += 1
        emit(progress, ProgressEvent("batch", index, count, message=(
            f"{Path(path).name}: slice {z}, rows {r0}-{r1} of {height} "
            f"({writer.n_chunks - len(pending) + written}/{writer.n_chunks} chunks)")))
    labels_path = writer.finalize()
    return DatasetResult(path, "done", labels_path, written, writer.n_chunks)
