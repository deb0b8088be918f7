"""The training loop shared by pretraining and fine-tuning, and the pieces around it: optimiser
groups, the step meter, output folders and their lock, resume lookup.

`run_training` runs a `TrainingTask` (what one job supplies: its model, its batches, its loss, what
goes in its checkpoint and package, its result) through one `TrainingLoop`, which owns everything
the jobs share: resume (model, optimiser, scheduler, scaler, step, RNG), checkpoints every
``checkpoint_every`` steps, gradient accumulation with DDP ``no_sync`` on all but the last
micro-batch, autocast, cancellation (checked before every step: outputs are written, then
`JobCancelled` is raised with the task's result attached) and progress events.
"""
from __future__ import annotations

import abc

import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn as nn

from ..io.files import probe_writable_dir
from .checkpoint import CHECKPOINT_NAME, Checkpoint, RngStates, load_checkpoint, restore_checkpoint, save_checkpoint
from .device import autocast, make_grad_scaler, resolve_device, resolve_precision
from .distributed import DistContext, setup_distributed, teardown_distributed, wrap_model
from .package import ModelPackage, save_package
from .progress import CancelToken, JobCancelled, ProgressCallback, ProgressEvent
from .schedule import WarmupCosine

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
        probe_writable_dir(path)
    except PermissionError as err:
        raise PermissionError(f"output location {path} is not writable ({err.strerror}); choose another "
                              "--output-dir") from err
    except OSError as err:
        if isinstance(err, NotADirectoryError) and str(err).startswith("output location"):
            raise
        raise PermissionError(f"cannot write to output location {path} ({err.strerror or err}); choose another "
                              "--output-dir") from err
    return path


def check_output_not_input(output: str | Path, inputs: Sequence[Any], *, option: str = "--output",
                           nested_inputs: bool = False) -> None:
    """Refuse an output location that is one of the ``inputs`` or lies inside one (an OME-Zarr folder);
    with ``nested_inputs`` also one that contains an input (its replacement would delete the input)."""
    out = Path(output).resolve()
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            continue
        source = Path(item).resolve()
        if out == source or source in out.parents or (nested_inputs and out in source.parents):
            raise ValueError(f"the output location {output} is the input {item} or overlaps it; writing there would "
                             f"destroy the input: choose another {option}")


LOCK_NAME = ".affmae.lock"

try:  # an OS-level advisory lock where the platform has one (POSIX); elsewhere the pid in the file decides
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_HELD: set[Path] = set()  # run folders locked by this process (flock does not exclude threads sharing a check)
_HELD_GUARD = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder: the file ``LOCK_NAME``, holding the owner's pid and host.

    A second run into the same folder is refused with a message naming the running pid, whether it
    comes from another process or from this one (another widget run in the same napari). Where the
    platform has ``fcntl``, the file is kept open with an advisory ``flock`` for the whole run, so a lock
    file left by a dead process is taken over, and two processes taking it over at once cannot both
    win. Without ``fcntl``, a lock whose pid no longer runs on this host is taken over."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.key = self.path.parent.resolve()
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise `FileExistsError` naming the pid of the run that holds it."""
        with _HELD_GUARD:
            if self.key in _HELD:
                raise self._in_use({"pid": os.getpid(), "host": socket.gethostname()})
            _HELD.add(self.key)
        try:
            self._fd = self._take_flock() if fcntl is not None else self._take_exclusive()
        except BaseException:
            with _HELD_GUARD:
                _HELD.discard(self.key)
            raise
        self.held = True
        return self

    def _in_use(self, owner: dict[str, Any] | None) -> FileExistsError:
        owner = owner or {}
        return FileExistsError(f"{self.path.parent} is in use by another run (pid {owner.get('pid', '?')} on "
                               f"{owner.get('host', '?')}); wait for it to finish or choose another --output-dir")

    def _owner_record(self) -> bytes:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        return json.dumps(me).encode("utf-8")

    def _take_flock(self) -> int:
        """Open the lock file and hold ``flock`` on it; the file must still be the one at ``self.path``
        once locked (a releasing run unlinks it while holding the lock)."""
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._in_use(self._owner()) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            stale = self._owner()
            if stale is not None:
                log.warning("taking over the stale lock %s of pid %s", self.path, stale.get("pid"))
            os.ftruncate(fd, 0)
            os.write(fd, self._owner_record())
            return fd
        raise FileExistsError(f"could not take the lock {self.path}; another run is starting in the same folder")

    def _take_exclusive(self) -> None:
        """Without ``fcntl``: create the file exclusively; a stale one is renamed away atomically, so only
        one of several runs taking it over at once deletes it."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and self._running(owner):
                    raise self._in_use(owner) from None
                aside = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                log.warning("taking over the stale lock %s of pid %s", self.path, (owner or {}).get("pid"))
                aside.unlink(missing_ok=True)
                continue
            os.write(fd, self._owner_record())
            os.close(fd)
            return None
        raise FileExistsError(f"could not take the lock {self.path}; another run is starting in the same folder")

    def _owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None

    @staticmethod
    def _running(owner: dict[str, Any]) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot check a process on another machine: assume it runs
        return _pid_alive(int(owner["pid"]))

    def release(self) -> None:
        """Remove the lock file (while still locked), then let go of the lock."""
        if not self.held:
            return
        self.held = False
        try:
            self.path.unlink(missing_ok=True)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            with _HELD_GUARD:
                _HELD.discard(self.key)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_run_folder(folder: Path, package_name: str, resume: bool | str | Path, overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder that holds an earlier run, unless ``overwrite``.

    Resuming from this folder's own checkpoint is allowed; a run resumed from a checkpoint elsewhere
    is a fresh run here."""
    if overwrite:
        return
    checkpoint, package = folder / CHECKPOINT_NAME, folder / package_name
    held = [p.name for p in (checkpoint, package) if p.exists()]
    if not held:
        return
    resuming_here = resume is True or (isinstance(resume, str) and resume.lower() in ("true", "auto", "latest"))
    if not resuming_here and resume not in (None, False):
        target = Path(resume)
        resuming_here = (target if target.is_dir() else target.parent).resolve() == folder.resolve()
    if resuming_here and checkpoint.is_file():
        return
    raise FileExistsError(f"{folder} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --output-dir")


def open_run_folder(folder: str | Path, package_name: str, *, resume: bool | str | Path, overwrite: bool,
                    inputs: Sequence[Any] = ()) -> RunLock:
    """Check and lock a training output folder before anything is written into it: not an input, writable,
    not in use by another run (`RunLock`), not holding an earlier run unless resuming or ``overwrite``.
    Returns the held lock (release it when the run ends)."""
    folder = Path(folder)
    check_output_not_input(folder, inputs, option="--output-dir")
    prepare_output_dir(folder)
    lock = RunLock(folder).acquire()
    try:
        check_run_folder(folder, package_name, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


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


# ----------------------------------------------------------------------------------------------- the loop

class TrainingJobConfig(Protocol):
    """The fields of a job's config dataclass that the loop reads (`PretrainConfig`, `FinetuneConfig`)."""

    batch_size: int  # global batch, split across torchrun processes
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    seed: int
    device: str
    precision: str
    grad_accum: int
    grad_clip: float | None
    output_dir: str | Path
    checkpoint_every: int
    log_every: int
    resume: bool | str | Path
    overwrite: bool

    def to_dict(self) -> dict[str, Any]: ...


class TrainingTask(abc.ABC):
    """What one training job supplies to `TrainingLoop`; the loop calls the hooks in the order below.

    Set up: `total_steps`, `build_model`, `check_resume` (a checkpoint is being resumed), `prepare`
    (statistics and samplers, drawing from the run's generators), `restore` (the checkpoint's
    ``extra``), `provenance`, `begin` (main process only: files that go next to the package, before any
    package is written), `start_message`. Every micro-batch: `batch`, `forward` (under
    autocast), `loss`, `observe`. Every logged step: `step_extra`. Outputs: `checkpoint_extra` and
    `package` (main process only), `on_cancel`, `finish` (after the last step), `result`. The abstract
    hooks must be given by every job; the others default to doing nothing."""

    job: str = ""  # ProgressEvent.job and provenance, e.g. "pretrain"
    verb: str = ""  # in messages, e.g. "pretraining"
    package_name: str = ""  # file name of the package in the output folder
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    layer_decay: float = 1.0  # layer-wise lr decay of `param_groups`
    save_last_step: bool = True  # write checkpoint + package when the last step ends (else `finish` does)

    @abc.abstractmethod
    def total_steps(self) -> int:
        """Steps of a fresh run (a resumed run keeps its checkpoint's total)."""
        raise NotImplementedError

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def check_resume(self, checkpoint: Checkpoint) -> None:
        """Raise a ValueError when ``checkpoint`` does not belong to this run."""

    def prepare(self, rngs: RngStates) -> None:
        """Statistics and samplers, drawing from ``rngs`` (saved in checkpoints)."""

    def restore(self, extra: dict[str, Any]) -> None:
        """Job state saved by `checkpoint_extra`."""

    @abc.abstractmethod
    def provenance(self, run: TrainingLoop) -> dict[str, Any]:
        raise NotImplementedError

    def begin(self, run: TrainingLoop) -> None:
        """Main process, output folder locked, before the first step: write what belongs next to the package."""

    @abc.abstractmethod
    def start_message(self, run: TrainingLoop) -> str:
        raise NotImplementedError

    @abc.abstractmethod
    def batch(self, shard: slice, device: torch.device) -> Any:
        """This process's part (``shard`` of the global batch) of the next micro-batch, on ``device``."""
        raise NotImplementedError

    @abc.abstractmethod
    def forward(self, model: nn.Module, batch: Any) -> Any:
        raise NotImplementedError

    @abc.abstractmethod
    def loss(self, out: Any, batch: Any) -> torch.Tensor:
        """Scalar float32 loss of one micro-batch (the loop divides it by ``grad_accum``)."""
        raise NotImplementedError

    def observe(self, out: Any, batch: Any) -> dict[str, float]:
        """After the backward pass: values summed over the step's micro-batches into the progress extras."""
        return {}

    def step_extra(self, out: Any) -> dict[str, float]:
        """Progress extras from the step's last micro-batch output."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any]:
        """JSON-able job state for the checkpoint (the loop adds ``losses``)."""
        return {}

    @abc.abstractmethod
    def package(self, run: TrainingLoop, done: int) -> ModelPackage:
        raise NotImplementedError

    def on_cancel(self, run: TrainingLoop) -> None:
        """Before the outputs of a cancelled run are written."""

    def finish(self, run: TrainingLoop) -> None:
        """After the last step (every process); with ``save_last_step`` False it writes the outputs."""

    @abc.abstractmethod
    def result(self, run: TrainingLoop, cancelled: bool) -> Any:
        raise NotImplementedError


def run_training(task: TrainingTask, config: TrainingJobConfig, progress: ProgressCallback | None,
                 cancel: CancelToken | None, *, sources: Sequence[Any], started: float) -> Any:
    """Resolve the device, join torchrun's process group, lock the output folder (main process; it must
    not be one of ``sources``) and run ``task`` through a `TrainingLoop`. Returns ``task.result``."""
    device = resolve_device(config.device)
    dtype = resolve_precision(device, config.precision)
    context = setup_distributed(device)
    lock = None
    try:
        if context.is_main:
            lock = open_run_folder(config.output_dir, task.package_name, resume=config.resume,
                                   overwrite=config.overwrite, inputs=sources)
        return TrainingLoop(task, config, device, dtype, context, progress, cancel, started).run()
    finally:
        if lock is not None:
            lock.release()
        teardown_distributed(context)


class TrainingLoop:
    """One training run of a `TrainingTask`: AdamW + `WarmupCosine`, GradScaler, gradient accumulation,
    DDP, checkpoints, exact resume, cancellation and progress (see the module docstring).

    Attributes the task may read: ``config``, ``device``, ``dtype``, ``context``, ``model`` (unwrapped),
    ``checkpoint`` (resumed from, or None), ``step``, ``total``, ``losses`` (one per step, from step 1),
    ``checkpoint_path``, ``package_path``, ``started`` (``time.perf_counter()`` at the job's start)."""

    def __init__(self, task: TrainingTask, config: TrainingJobConfig, device: torch.device, dtype: torch.dtype,
                 context: DistContext, progress: ProgressCallback | None, cancel: CancelToken | None,
                 started: float) -> None:
        self.task, self.config = task, config
        self.device, self.dtype, self.context = device, dtype, context
        self.progress = progress if context.is_main else None
        self.cancel, self.started = cancel, started
        output_dir = Path(config.output_dir)
        self.checkpoint_path = output_dir / CHECKPOINT_NAME
        self.package_path = output_dir / task.package_name
        self.step, self.total, self.losses = 0, 0, []
        self.checkpoint: Checkpoint | None = None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def run(self) -> Any:
        """Train to ``total`` steps (resuming when asked); returns ``task.result``."""
        self._set_up()
        self.emit(ProgressEvent(self.task.job, self.step, self.total, message=self.task.start_message(self)))
        meter = StepMeter(self.total)
        while self.step < self.total:
            if self.context.any(cancelled(self.cancel), self.device):
                self._stop()
            self._train_step(meter)
        self.task.finish(self)
        self.context.barrier()
        return self.task.result(self, False)

    def _set_up(self) -> None:
        """Model, optimiser, scheduler and scaler, the task's data, then the checkpoint's state if resuming."""
        task, config = self.task, self.config
        self.context.barrier()
        resume_from = resume_location(config.resume, Path(config.output_dir))
        checkpoint = self.checkpoint = load_checkpoint(resume_from) if resume_from is not None else None
        self.total = task.total_steps()
        if checkpoint is not None:
            self.total = int(checkpoint.meta["scheduler"]["total_steps"])
        self.shard = self.context.shard(config.batch_size)
        self.rngs = RngStates.seeded(config.seed)
        self.model = model = task.build_model()
        if checkpoint is not None:
            task.check_resume(checkpoint)
        model.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, task.layer_decay), lr=config.lr,
                                           betas=task.betas)
        self.scheduler = WarmupCosine(self.optimizer, self.total, config.warmup_steps, config.lr, config.min_lr_ratio)
        self.scaler = make_grad_scaler(self.device, self.dtype)
        task.prepare(self.rngs)
        if checkpoint is not None:
            self.step = restore_checkpoint(checkpoint, model=model, optimizer=self.optimizer, scheduler=self.scheduler,
                                           scaler=self.scaler, rng=self.rngs)
            self.losses = list(checkpoint.extra.get("losses", []))
            task.restore(checkpoint.extra)
            log.info("resumed %s from %s at step %d of %d", task.verb, checkpoint.path, self.step, self.total)
        self.ddp_model = wrap_model(model, self.context, self.device)
        self.ddp_model.train()
        self.provenance = task.provenance(self)
        if self.context.is_main:
            task.begin(self)

    def _train_step(self, meter: StepMeter) -> None:
        """One optimiser step over ``grad_accum`` micro-batches; checkpoint and progress as due."""
        task, config, context = self.task, self.config, self.context
        lr = self.scheduler.apply(self.step)
        step_loss, observed, out = 0.0, {}, None
        for micro in range(config.grad_accum):
            batch = task.batch(self.shard, self.device)
            sync = micro == config.grad_accum - 1 or not context.enabled
            with (self.ddp_model.no_sync() if not sync else nullcontext()):
                with autocast(self.device, self.dtype):
                    out = task.forward(self.ddp_model, batch)
                loss = task.loss(out, batch) / config.grad_accum
                self.scaler.scale(loss).backward()
            step_loss += float(loss.detach())
            for key, value in task.observe(out, batch).items():
                observed[key] = observed.get(key, 0.0) + value
        optimizer_step(self.model, self.optimizer, self.scaler, config.grad_clip)
        self.step += 1
        step = self.step
        step_loss = context.mean(step_loss, self.device)
        finite_or_raise(step_loss, step)
        self.losses.append(step_loss)
        seconds = meter.tick()
        if (step % config.checkpoint_every == 0 and step < self.total) or (step == self.total and task.save_last_step):
            self.write_outputs(step)
        if step % config.log_every == 0 or step in (1, self.total):
            self.emit(ProgressEvent(
                task.job, step, self.total, loss=step_loss, lr=lr,
                images_per_s=config.batch_size * config.grad_accum / max(seconds, 1e-9), eta_s=meter.eta(step),
                extra={**task.step_extra(out), **observed}))

    def _stop(self) -> None:
        """Write the outputs of a cancelled run and raise `JobCancelled` carrying the task's result."""
        self.task.on_cancel(self)
        self.write_outputs(self.step)
        self.context.barrier()
        result = self.task.result(self, True)
        err = JobCancelled(f"{self.task.verb} cancelled at step {self.step}/{self.total}; checkpoint saved at "
                           f"{self.checkpoint_path}")
        err.result = result
        raise err

    def emit(self, event: ProgressEvent) -> None:
        """Report ``event`` (main process only)."""
        emit(self.progress, event)

    def write_outputs(self, done: int) -> None:
        """Checkpoint (model, optimiser, scheduler, scaler, RNG, losses + the task's state) and package at
        step ``done``; main process only, both written atomically."""
        if not self.context.is_main:
            return
        save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        scaler=self.scaler, step=done, rng=self.rngs, job_config=self.config.to_dict(),
                        extra={"losses": self.losses, **self.task.checkpoint_extra()})
        self.write_package(done)

    def write_package(self, done: int) -> None:
        """The task's package at step ``done`` (main process only)."""
        if self.context.is_main:
            save_package(self.task.package(self, done), self.package_path)
