"""The ``affmae`` command: pretrain, fine-tune, segment, batch-segment, inspect packages, run the demo.

Every sub-command is a thin front end of a job in `napari_affmae.engine`. Bad input (missing or
corrupt files, wrong shapes, unusable labels, incompatible packages, unwritable outputs) ends with
a one-line message on stderr and exit code 2; Ctrl-C (or a stop file) cancels cleanly: training
writes a checkpoint first, and the exit code is 130. Each run appends JSON lines (start, progress,
end/error events) to a log file.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from .engine import BatchConfig, FinetuneConfig, PretrainConfig, SegmentConfig
from .engine.settings import (TRAINING_OPTIONS, DeviceSettings, TrainingSettings, add_options, parse_int_list,
                              parse_size, values_from)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


# --------------------------------------------------------------------------------------- output helpers

class RunLog:
    """Append-only JSON-lines log of one run (one object per line, with time and run id)."""

    def __init__(self, path: Path | None, command: str) -> None:
        self.path = path
        self.command = command
        self.run_id = uuid.uuid4().hex[:12]
        self._handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event: str, **fields: Any) -> None:
        if self._handle is None:
            return
        record = {"time": round(time.time(), 3), "run": self.run_id, "command": self.command, "event": event}
        record.update({k: _json_safe(v) for k, v in fields.items()})
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class TerminalProgress:
    """Progress on stderr with tqdm: one bar per job (redrawn in place on a terminal; at most one update
    every 30 s into a log file), the job's messages printed above it."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = 0.2 if tty else 30.0  # seconds between redraws
        self.bar: Any = None
        self.job: str | None = None

    def __call__(self, event: Any) -> None:
        if self.quiet:
            return
        from tqdm import tqdm  # noqa: PLC0415

        if event.message:
            tqdm.write(f"[{event.job}] {event.message}", file=self.stream)
        if not event.total or (event.loss is None and event.images_per_s is None and event.step != event.total):
            return
        if self.bar is None or self.job != event.job or self.bar.total != event.total:
            self.close()
            unit = "tile" if event.job == "segment" else "step"
            self.bar = tqdm(total=event.total, desc=event.job, unit=unit, file=self.stream, dynamic_ncols=True,
                            mininterval=self.min_interval, maxinterval=max(10.0, self.min_interval),
                            miniters=1, leave=True)
            self.job = event.job
        parts = []
        if event.loss is not None:
            parts.append(f"loss {event.loss:.4f}")
        if event.extra and "trivial" in event.extra:  # learning beyond flat patches once loss is below it
            parts.append(f"(flat patches {event.extra['trivial']:.4f})")
        if event.lr is not None:
            parts.append(f"lr {event.lr:.2e}")
        if event.images_per_s is not None:
            parts.append(f"{event.images_per_s:.1f} {'tiles' if event.job == 'segment' else 'img'}/s")
        self.bar.set_postfix_str("  ".join(parts), refresh=False)
        self.bar.update(min(event.step, event.total) - self.bar.n)
        if event.step >= event.total:
            self.close()

    def close(self) -> None:
        """End the current bar (its last state stays on screen)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_and_log(bar: TerminalProgress, run_log: RunLog) -> Callable[[Any], None]:
    def on_event(event: Any) -> None:
        bar(event)
        run_log.write("progress", job=event.job, step=event.step, total=event.total, loss=event.loss, lr=event.lr,
                      images_per_s=event.images_per_s, eta_s=event.eta_s, message=event.message or None)

    return on_event


# --------------------------------------------------------------------------------------- argument parsing

class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and a one-line message (its default), plus the usage line."""


def _add_common(parser: argparse.ArgumentParser, *, training: bool) -> None:
    group = parser.add_argument_group("execution")
    add_options(group, DeviceSettings, ["device", "precision"])
    group.add_argument("--log-file", type=Path, default=None,
                       help="JSON-lines log file (one event per line; default: a file in the output directory)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for PyTorch (default: this job's share of the free cores, re-measured "
                            "while it runs, so jobs started side by side do not slow each other down)")
    group.add_argument("--stop-file", type=Path, default=None,
                       help="cancel cleanly when this file appears (like Ctrl-C; training saves a checkpoint)")
    if training:
        add_options(group, TrainingSettings, TRAINING_OPTIONS)
        group.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                           help="continue from the checkpoint in --output-dir (no value) or from the given "
                                "checkpoint file/directory; restores weights, optimiser, schedule, step and RNG "
                                "(the checkpoint's checksum is verified first)")


def parse_model_option(text: str) -> tuple[str, Any]:
    """'target_pool=2' -> ('target_pool', 2): the value is read as JSON (numbers, true/false, lists, objects),
    else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. target_pool=2; got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-option", dest="model_options", action="append", type=parse_model_option,
                        default=[], metavar="KEY=VALUE",
                        help="a field of the model's config, repeatable; the value is JSON, e.g. "
                             "--model-option target_pool=2 --model-option 'loss_weights={\"res2\": 1.0}' "
                             "(unknown fields are refused with the list of known ones)")


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--axes", default=None,
                        help="axes of TIFF/.npy input when the file does not say, e.g. zyx, czyx (with --channel)")
    parser.add_argument("--channel", type=int, default=None, help="channel index for multi-channel input")
    parser.add_argument("--timepoint", type=int, default=None, help="time point index for time series")


def _add_training_options(p: argparse.ArgumentParser, config_cls: type, names: list[str]) -> None:
    """What every training command takes after its inputs: --output-dir, the job's settings (``names`` of
    ``config_cls``), --model-option, the image and execution options (read back by `_training_config`)."""
    p.add_argument("--output-dir", "-o", type=Path, required=True, help="where the package, checkpoint and log go")
    add_options(p, config_cls, names)
    _add_model_option(p)
    _add_image_options(p)
    _add_common(p, training=True)


PRETRAIN_OPTIONS = ["model", "crop_size", "batch_size", "steps", "epochs", "lr", "weight_decay", "warmup_steps",
                    "mask_ratio", "mask_type", "keep_rate"]
FINETUNE_OPTIONS = ["model", "class_names", "label_mode", "crop_size", "batch_size", "steps", "lr", "weight_decay",
                    "layer_decay", "warmup_steps", "dice_weight", "augment", "val_slices", "val_fraction",
                    "pseudo_label_confidence"]
SEGMENT_OPTIONS = ["tile_size", "overlap", "batch_size", "normalization"]  # batch has them too
BATCH_OPTIONS = ["overwrite", "channel", "timepoint"]


def _add_pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised MAE pretraining on one or more images",
                       description="Pretrain an AFFMAE masked autoencoder on EM images (no labels needed). "
                                   "Writes pretrained.affmae (model package) and checkpoint.safetensors into "
                                   "--output-dir.")
    p.add_argument("images", nargs="+", type=Path, help="TIFF / OME-Zarr / .npy images or stacks (Z, Y, X)")
    _add_training_options(p, PretrainConfig, PRETRAIN_OPTIONS)


def _add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="train a segmentation model on painted labels",
                       description="Fine-tune a segmentation model on an image and its labels (same shape). "
                                   "Sparse mode: 0 = unlabelled (ignored), classes 1..K, at least two classes "
                                   "painted. Dense mode: every pixel labelled, 0 = background. Writes "
                                   "segmentation.affmae and checkpoint.safetensors into --output-dir.")
    p.add_argument("image", type=Path, help="the image or stack (TIFF / OME-Zarr / .npy)")
    p.add_argument("labels", type=Path, help="integer labels with the image's shape (TIFF / .npy / OME-Zarr)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--pretrained", type=Path, help="pretraining package (pretrained.affmae) to start from, "
                       "or a segmentation package to continue training with corrected labels (same classes)")
    start.add_argument("--scratch", action="store_true", help="start from random weights (for comparison)")
    _add_training_options(p, FinetuneConfig, FINETUNE_OPTIONS)


def _add_segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="tiled segmentation of one image or stack",
                       description="Segment an image or stack (slice by slice) with a fine-tuned package. "
                                   "Memory stays bounded: tiles are blended strip by strip and written into "
                                   "the output as they finish.")
    p.add_argument("package", type=Path, help="segmentation package (segmentation.affmae)")
    p.add_argument("image", type=Path, help="image or stack (TIFF / OME-Zarr / .npy)")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="output file: .tif/.tiff, .npy (written incrementally) or .zarr (zarr array, chunked)")
    p.add_argument("--probabilities", action="store_true",
                   help="write per-class probabilities [K, (Z,) Y, X] float32 instead of labels")
    add_options(p, SegmentConfig, SEGMENT_OPTIONS + ["slices"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_image_options(p)
    _add_common(p, training=False)


def _add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="segment many OME-Zarr datasets into labels/<name>",
                       description="Segment a list, folder or glob of OME-Zarr images; each gets an NGFF "
                                   "labels/<name> group (multiscale, image-label metadata) next to its image. "
                                   "Image arrays are never written. Resumable: rerun the same command after an "
                                   "interruption and only missing chunks are computed. A failing dataset is "
                                   "reported and the others continue (exit code 1 if any failed).")
    p.add_argument("package", type=Path, help="segmentation package (segmentation.affmae)")
    p.add_argument("datasets", nargs="+", help="OME-Zarr images, folders of them, or glob patterns (quote them)")
    p.add_argument("--name", default="affmae", help="labels group name (default: affmae)")
    add_options(p, SegmentConfig, SEGMENT_OPTIONS)
    add_options(p, BatchConfig, BATCH_OPTIONS)
    p.add_argument("--report", type=Path, default=None, help="write the per-dataset report as JSON here")
    _add_common(p, training=False)


def _add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="show what a model package contains",
                       description="Print a model package's manifest: model, task, classes, normalisation, "
                                   "provenance. The package is verified (checksum, format, architecture).")
    p.add_argument("package", type=Path, help="package file (.affmae) or directory")
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on synthetic EM (a few minutes on a laptop CPU)",
                       description="Pretrain AFFMAE-tiny on a synthetic EM stack, fine-tune on sparse strokes "
                                   "drawn from the ground truth on two slices, segment the rest, print per-class "
                                   "IoU, and write an OME-Zarr with the labels, demo.png and metrics.json.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    from .engine.demo import DemoConfig  # noqa: PLC0415

    defaults = DemoConfig()
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps,
                   help=f"pretraining steps (default: {defaults.pretrain_steps})")
    p.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps,
                   help=f"fine-tuning steps (default: {defaults.finetune_steps})")
    p.add_argument("--size", type=parse_int_list, default=None, metavar="Z,Y,X",
                   help="synthetic stack size (default: 8,192,192)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and training (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: this job's share of the free cores)")


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks to run on this machine and your data (affmae bench efficiency "
                       "--help)",
                       description="Run a benchmark of napari_affmae.bench; everything after its name is passed "
                                   "to it (see 'affmae bench efficiency --help'). Each prints a table or JSON and "
                                   "writes its results as JSON where asked.")
    p.add_argument("name", choices=("efficiency", "segmentation", "ablation", "preview"),
                   help="which benchmark: efficiency (FLOPs, memory, step times of AFFMAE and the baselines), "
                        "segmentation (fine-tuning on EM stacks from few labels, all arms) or ablation (one-change "
                        "variants of AFFMAE pretraining on the segmentation benchmark's setting) or preview (Live preview "
                        "vs the ilastik-style rf_filters: update times and IoU over correction rounds)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                   help="options of the benchmark (e.g. --device cuda --json)")


def build_parser() -> argparse.ArgumentParser:
    """The ``affmae`` parser: global options and one sub-parser per command."""
    parser = _Parser(prog="affmae", description=(
        "Self-supervised AFFMAE pretraining, fine-tuning on painted labels and tiled segmentation of EM "
        "images (2D or Z-stacks; TIFF, OME-Zarr, .npy). Run 'affmae demo' for an end-to-end example."),
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad input, 130 cancelled. Multi-GPU/multi-node: run "
               "pretrain/finetune/batch under 'torchrun --nproc-per-node N -m napari_affmae.cli ...'.")
    parser.add_argument("--verbose", "-v", action="count", default=0, help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_pretrain_parser(sub)
    _add_finetune_parser(sub)
    _add_segment_parser(sub)
    _add_batch_parser(sub)
    _add_info_parser(sub)
    _add_demo_parser(sub)
    _add_bench_parser(sub)
    return parser


# --------------------------------------------------------------------------------------- commands

def _cancel_token(args: argparse.Namespace):
    from .engine import CancelToken  # noqa: PLC0415

    token = CancelToken(stop_file=getattr(args, "stop_file", None))

    def on_sigint(signum, frame):  # first Ctrl-C: clean stop; second: default behaviour
        sys.stderr.write("\naffmae: stopping after the current step (Ctrl-C again to abort)\n")
        token.cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if _is_main_rank():
        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not in the main thread (e.g. called from a test harness)
            pass
    return token


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resume_value(value: str | None) -> bool | str:
    if value is None:
        return False
    return True if value == "latest" else value


def _read_input(args: argparse.Namespace, path: Path) -> Any:
    """The `InputImage` at ``path``, read with the command's --axes / --channel / --timepoint."""
    from .engine.inputs import as_input_image  # noqa: PLC0415

    return as_input_image(path, what=str(path), axes=args.axes, channel=args.channel, timepoint=args.timepoint)


def _training_config(args: argparse.Namespace, run_log: RunLog, config_cls: type, names: list[str],
                     **extra: Any) -> Any:
    """The job config of a training command from the options `_add_training_options` made (logged)."""
    config = config_cls(output_dir=args.output_dir, resume=_resume_value(args.resume),
                        model_options=dict(args.model_options), **_training_values(args),
                        **values_from(args, config_cls, names), **extra)
    run_log.write("config", config=config.to_dict())
    return config


def _cmd_pretrain(args, progress, cancel, run_log) -> int:
    from .engine import pretrain  # noqa: PLC0415

    images = [_read_input(args, p) for p in args.images]
    config = _training_config(args, run_log, PretrainConfig, PRETRAIN_OPTIONS)
    result = pretrain(images, config, progress=progress, cancel=cancel)
    run_log.write("result", package=result.package_path, checkpoint=result.checkpoint_path, step=result.step,
                  final_loss=result.final_loss, seconds=result.seconds)
    _say(f"pretraining done: {result.step} steps, final loss {result.final_loss:.4f}; package {result.package_path}")
    return EXIT_OK


def _cmd_finetune(args, progress, cancel, run_log) -> int:
    from .engine import finetune  # noqa: PLC0415

    image, labels = _read_input(args, args.image), _read_input(args, args.labels).array
    config = _training_config(args, run_log, FinetuneConfig, FINETUNE_OPTIONS,
                              pretrained=None if args.scratch else args.pretrained)
    result = finetune(image, labels, config, progress=progress, cancel=cancel)
    run_log.write("result", package=result.package_path, step=result.step, final_loss=result.final_loss,
                  metrics=result.metrics, seconds=result.seconds)
    _say(f"fine-tuning done: {result.step} steps, final loss {result.final_loss:.4f}; package {result.package_path}")
    for split in ("train", "val"):
        if split in result.metrics:
            _say(f"{split} IoU: " + _format_scores(result.metrics[split]["iou"]))
    return EXIT_OK


def _training_values(args: argparse.Namespace) -> dict[str, Any]:
    """The execution options every training command has (device, precision, seed, gradients, checkpoints)."""
    return values_from(args, TrainingSettings, ["device", "precision", *TRAINING_OPTIONS])


def _format_scores(scores: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in scores.items())


INCOMPLETE_ATTR = "affmae_incomplete"  # set on a .zarr output while it is being written


def _check_output(path: Path, overwrite: bool) -> None:
    """Everything about ``--output`` that can be checked before any work: type, an existing result without
    --overwrite, a writable folder (a clash with an input is refused earlier, `_check_outputs_apart`)."""
    from .engine.training import prepare_output_dir  # noqa: PLC0415

    suffix = path.suffix.lower()
    if suffix not in (".tif", ".tiff", ".npy", ".zarr"):
        raise ValueError(f"unsupported output type {suffix or '(none)'!r} for {path}; use .tif, .npy or .zarr")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite or choose another --output")
    prepare_output_dir(path.parent if str(path.parent) else Path("."))


def _open_output(path: Path, shape: tuple[int, ...], dtype: Any):
    """An array to stream results into at ``path`` (a temporary sibling of the real output): .npy memory
    map, zarr array marked incomplete until `_finish_output`, or in memory for TIFF."""
    import numpy as np  # noqa: PLC0415

    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if suffix == ".zarr":
        import zarr  # noqa: PLC0415

        chunks = tuple([1] * (len(shape) - 2) + [min(512, shape[-2]), min(512, shape[-1])])
        array = zarr.open_array(str(path), mode="w", shape=shape, dtype=dtype, chunks=chunks, fill_value=0)
        array.attrs[INCOMPLETE_ATTR] = True
        return array
    return np.zeros(shape, dtype)


def _finish_output(result: Any, tmp: Path, output: Path, probabilities: bool) -> None:
    """Complete the temporary output and move it onto ``output`` (an earlier result is replaced only now)."""
    import numpy as np  # noqa: PLC0415

    from .io.files import replace_path  # noqa: PLC0415

    suffix = output.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile  # noqa: PLC0415

        tifffile.imwrite(tmp, np.asarray(result), imagej=not probabilities and result.ndim <= 3, compression="zlib")
    elif suffix == ".npy":
        result.flush()
    else:
        del result.attrs[INCOMPLETE_ATTR]
    replace_path(tmp, output)


def _cmd_segment(args, progress, cancel, run_log) -> int:
    import numpy as np  # noqa: PLC0415

    from .engine import load_package, segment  # noqa: PLC0415
    from .engine.segment import output_labels, resolve_package, slice_list  # noqa: PLC0415
    from .io.files import remove_path  # noqa: PLC0415

    package = resolve_package(load_package(args.package, expect_task="segmentation"))
    image = _read_input(args, args.image)
    config = SegmentConfig(output="probabilities" if args.probabilities else "labels",
                           **values_from(args, SegmentConfig, ["device", "precision", *SEGMENT_OPTIONS, "slices"]))
    slice_list(config.slices, image.shape[0] if image.ndim == 3 else 1, image.ndim)
    _check_output(args.output, args.overwrite)
    if args.probabilities:
        shape, dtype = (int(package.num_classes), *image.shape), np.float32
    else:
        shape, dtype = image.shape, output_labels(package)[1]
    # everything is checked: write into a hidden sibling, moved onto --output only when complete
    tmp = args.output.with_name(f".{args.output.name}.tmp-{uuid.uuid4().hex[:8]}{args.output.suffix}")
    run_log.write("config", package=str(args.package), image=str(args.image), output=str(args.output),
                  tile_size=list(config.tile_size), overlap=config.overlap)
    started = time.perf_counter()
    try:
        result = segment(package, image, config, progress=progress, cancel=cancel,
                         out=_open_output(tmp, shape, dtype))
        _finish_output(result, tmp, args.output, args.probabilities)
    finally:
        remove_path(tmp)
    seconds = time.perf_counter() - started
    run_log.write("result", output=str(args.output), shape=list(shape), seconds=seconds)
    _say(f"segmentation written to {args.output} ({' x '.join(map(str, shape))}, {seconds:.1f} s)")
    return EXIT_OK


def _check_report(path: Path) -> None:
    """Refuse an unusable --report before the work starts (a directory, an unwritable file or folder);
    creates nothing."""
    from .engine.package import check_writable_dir  # noqa: PLC0415

    if path.is_dir():
        raise IsADirectoryError(f"--report {path} is a directory; give a file name such as report.json")
    try:
        check_writable_dir(path.parent if str(path.parent) else Path("."))
    except PermissionError as err:
        raise PermissionError(f"--report {path}: {err}") from err
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"--report {path} is not writable; choose another --report path")


def _cmd_batch(args, progress, cancel, run_log) -> int:
    from .engine import batch_segment, load_package  # noqa: PLC0415

    package = load_package(args.package, expect_task="segmentation")
    tiling = SegmentConfig(**values_from(args, SegmentConfig, ["device", "precision", *SEGMENT_OPTIONS]))
    config = BatchConfig(tiling, **values_from(args, BatchConfig, BATCH_OPTIONS))
    if args.report is not None and _is_main_rank():
        _check_report(args.report)
    report = batch_segment(args.datasets, package, config, label_name=args.name, progress=progress, cancel=cancel)
    run_log.write("result", report=report.to_dict())
    if args.report is not None and _is_main_rank():
        args.report.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.report.with_name(f".{args.report.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        os.replace(tmp, args.report)
    if _is_main_rank():
        for item in report.results:
            detail = item.error if item.error else f"{item.chunks_written}/{item.chunks_total} chunks written"
            _say(f"{item.status:>16}  {item.path}  ({detail})")
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_info(args) -> int:
    from .engine import load_package  # noqa: PLC0415

    package = load_package(args.package)
    info = package.summary()
    if args.json:
        print(json.dumps(_json_safe(info), indent=2))
        return EXIT_OK
    prov = info.get("provenance") or {}
    lines = [
        f"package       {info['path']}",
        f"model         {info['model_name']} ({info['task']}, {info['parameters']:,} parameters)",
        f"format        v{info['format_version']}, written by napari-affmae {info['package_version']}",
    ]
    if info["task"] == "segmentation":
        first = 1 if info["label_mode"] == "sparse" else 0
        names = info["class_names"] or [f"class {first + i}" for i in range(info["num_classes"])]
        lines.append(f"classes       " + ", ".join(f"{first + i}={n}" for i, n in enumerate(names))
                     + f" ({info['label_mode']} labels)")
    norm = info.get("normalization")
    if norm:
        lines.append(f"normalisation {norm['low_percentile']}-{norm['high_percentile']} percentiles = "
                     f"{norm['low']:.4g}..{norm['high']:.4g} ({norm['dtype']})")
    if info.get("normalization_scope") == "slice":
        lines.append("              each slice by its own percentiles (as the model was trained)")
    if info.get("pixel_size"):
        lines.append(f"pixel size    {info['pixel_size']}")
    if prov:
        loss = prov.get("final_loss")
        lines.append(f"trained by    {prov.get('job')} for {prov.get('steps')} steps on {prov.get('device')}, "
                     f"final loss {'n/a' if loss is None else f'{loss:.4f}'}")
        if prov.get("sources") or prov.get("source"):
            lines.append(f"trained on    {', '.join(prov.get('sources') or [prov.get('source')])}")
        metrics = prov.get("metrics") or {}
        for split in ("train", "val"):
            if split in metrics and metrics[split].get("iou"):
                lines.append(f"{split + ' IoU':<13} " + _format_scores(metrics[split]["iou"]))
    print("\n".join(lines))
    return EXIT_OK


def _cmd_demo(args, progress, cancel, run_log) -> int:
    from .engine.demo import DemoConfig, run_demo  # noqa: PLC0415

    config = DemoConfig(out=args.out, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                        seed=args.seed, device=args.device)
    if args.size is not None:
        if len(args.size) != 3 or args.size[0] < 3:
            raise ValueError(f"--size needs Z,Y,X with Z >= 3 (two labelled slices + held-out ones); got {args.size}")
        config.shape = tuple(args.size)
        config.labelled_slices = (1, args.size[0] - 2) if args.size[0] > 3 else (0, 2)
    result = run_demo(config, progress=progress, cancel=cancel)
    metrics = result.metrics
    run_log.write("result", metrics=metrics, seconds=result.seconds)
    print(f"\nper-class scores on the {len(metrics['held_out_slices'])} held-out slices "
          f"(strokes on slices {metrics['labelled_slices']}, {metrics['painted_pixels']} painted pixels):")
    print(f"  {'class':<14}{'IoU':>7}{'Dice':>7}")
    for name, iou in metrics["iou"].items():
        dice = metrics["dice"][name]
        print(f"  {name:<14}{'n/a' if iou is None else f'{iou:.3f}':>7}{'n/a' if dice is None else f'{dice:.3f}':>7}")
    print(f"  {'mean':<14}{metrics['mean_iou']:>7.3f}{metrics['mean_dice']:>7.3f}   accuracy {metrics['accuracy']:.3f}")
    print(f"OME-Zarr with labels: {result.zarr_path}\nfigure: {result.figure_path}\n"
          f"total time {result.seconds:.0f} s")
    return EXIT_OK


def _say(text: str) -> None:
    if _is_main_rank():
        print(text)


def _check_outputs_apart(args: argparse.Namespace) -> None:
    """Refuse an output location that is (or is inside) an input before anything is written."""
    from .engine.training import check_output_not_input  # noqa: PLC0415

    if args.command == "segment":
        check_output_not_input(args.output, [args.image, args.package], nested_inputs=True)
    elif args.command == "pretrain":
        check_output_not_input(args.output_dir, args.images, option="--output-dir")
    elif args.command == "finetune":
        check_output_not_input(args.output_dir, [args.image, args.labels], option="--output-dir")
        if args.pretrained is not None:  # nor hold the starting package: --overwrite would delete it
            check_output_not_input(args.output_dir, [args.pretrained], option="--output-dir", nested_inputs=True)


def _default_log(args: argparse.Namespace) -> Path | None:
    if getattr(args, "log_file", None) is not None:
        return args.log_file
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.command in ("pretrain", "finetune"):  # one file per run: concurrent runs never share a log
        return args.output_dir / f"affmae-{args.command}-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
    if args.command == "segment":
        return args.output.parent / f"{args.output.name}.affmae-log.jsonl"
    if args.command == "demo":
        return args.out / f"affmae-demo-{stamp}.jsonl"
    return None  # batch: only with --log-file (datasets may live in many places)


# --------------------------------------------------------------------------------------- entry point

def _bad_input_types() -> tuple[type[BaseException], ...]:
    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``affmae`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "info":
        try:
            return _cmd_info(args)
        except _bad_input_types() as err:
            return _fail(str(err))
    if args.command == "bench":
        if args.name == "segmentation":
            from .bench.em_segmentation import main as bench_main  # noqa: PLC0415
        elif args.name == "ablation":
            from .bench.em_ablation import main as bench_main  # noqa: PLC0415
        elif args.name == "preview":
            from .bench.preview import main as bench_main  # noqa: PLC0415
        else:
            from .bench.efficiency import main as bench_main  # noqa: PLC0415
        return bench_main(args.bench_args, prog=f"affmae bench {args.name}")
    from .engine import JobCancelled  # noqa: PLC0415

    run_log = RunLog(None, args.command)
    started = time.perf_counter()
    try:
        _check_outputs_apart(args)  # before the log file: it is written next to the output
        log_path = _default_log(args) if _is_main_rank() else None
        try:
            run_log = RunLog(log_path, args.command)
        except OSError as err:
            raise PermissionError(f"cannot write the log file {log_path} ({err.strerror or err}); choose a writable "
                                  "output location or --log-file path") from err
        run_log.write("start", argv=list(sys.argv[1:] if argv is None else argv), pid=os.getpid(),
                      rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")))
        bar = TerminalProgress(quiet=args.quiet or not _is_main_rank())
        progress = _progress_and_log(bar, run_log)
        cancel = _cancel_token(args)
        handler = {"pretrain": _cmd_pretrain, "finetune": _cmd_finetune, "segment": _cmd_segment,
                   "batch": _cmd_batch, "demo": _cmd_demo}[args.command]
        threads = args.threads
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1; got {threads}")
        from .engine.cpu_share import CpuShare  # noqa: PLC0415  (imports torch)

        with CpuShare(threads) as share:
            code = handler(args, share.wrap(progress), cancel, run_log)
        bar.close()
        run_log.write("end", exit_code=code, seconds=time.perf_counter() - started)
        return code
    except JobCancelled as err:
        run_log.write("cancelled", message=str(err))
        sys.stderr.write(f"\naffmae: {err}\n")
        return EXIT_CANCELLED
    except _bad_input_types() as err:
        run_log.write("error", message=str(err), kind=type(err).__name__)
        return _fail(str(err))
    except FloatingPointError as err:  # training diverged: a run-time failure, not bad input
        run_log.write("error", message=str(err), kind=type(err).__name__)
        sys.stderr.write(f"affmae: error: {err}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        run_log.write("cancelled", message="interrupted")
        sys.stderr.write("\naffmae: interrupted\n")
        return EXIT_CANCELLED
    finally:
        run_log.close()


def _fail(message: str) -> int:
    message = " ".join(str(message).split())  # one line
    sys.stderr.write(f"affmae: error: {message}\n")
    return EXIT_BAD_INPUT


if __name__ == "__main__":  # python -m napari_affmae.cli (e.g. under torchrun)
    sys.exit(main())
