"""One source for every job setting: config dataclass fields that also describe their command-line option.

A job config (`FinetuneConfig`, `SegmentConfig`, ...) declares each setting a user can choose with
`setting(default, help, ...)`. From those fields

* the ``affmae`` command builds its options (`add_options`: flag, type, choices, help text and the
  ``(default: ...)`` it prints) and reads them back (`values_from`);
* the widgets take their start values (`default_of`).

So a default is written once, next to its validation, and a test compares the three.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

_MISSING = dataclasses.MISSING


def parse_size(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '96x160' or '96,160' -> (96, 160) (pixels, height x width)."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected N or HxW, e.g. 128 or 96x160; got {text!r}") from err
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW, e.g. 128 or 96x160; got {text!r}")
    return values  # type: ignore[return-value]


def parse_int_list(text: str) -> list[int]:
    """'3,4,10' -> [3, 4, 10]."""
    try:
        return [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,4,10; got {text!r}") from err


def parse_optional_probability(text: str) -> float | None:
    """'0.8' -> 0.8; 'off' or 'none' -> None."""
    if str(text).strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a probability like 0.8, or 'off'; got {text!r}") from err


def parse_name_list(text: str) -> list[str]:
    """'a, b' -> ['a', 'b']."""
    return [v.strip() for v in str(text).split(",") if v.strip()]


def setting(default: Any = _MISSING, help: str = "", *, default_factory: Callable[[], Any] | Any = _MISSING,
            flag: str | None = None, parse: Callable[[str], Any] | None = None, choices: tuple | None = None,
            metavar: str | None = None) -> Any:
    """A dataclass field with its command-line description.

    ``flag``: the option (default ``--field-name``; for a boolean that defaults to True, ``--no-field-name``
    switches it off); ``parse``: str -> value (default: the type of ``default``); ``choices``: allowed values.
    """
    meta = {"help": help, "flag": flag, "parse": parse, "choices": choices, "metavar": metavar}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field(config_cls: type, name: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if name not in fields:
        raise KeyError(f"{config_cls.__name__} has no setting {name!r}")
    return fields[name]


def default_of(config_cls: type, name: str) -> Any:
    """The default of setting ``name`` of a config dataclass (what a widget shows at first)."""
    f = _field(config_cls, name)
    return f.default_factory() if f.default is _MISSING else f.default  # type: ignore[misc]


def flag_of(config_cls: type, name: str) -> str:
    """The command-line flag of setting ``name``."""
    f = _field(config_cls, name)
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    dashed = name.replace("_", "-")
    return f"--no-{dashed}" if default_of(config_cls, name) is True else f"--{dashed}"


def _show(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
        return str(value[0])
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return "none" if value is None else str(value)


def add_options(parser: argparse.ArgumentParser | Any, config_cls: type, names: list[str]) -> None:
    """Add one option per setting in ``names`` to ``parser`` (or an argument group)."""
    for name in names:
        f = _field(config_cls, name)
        meta, default = f.metadata, default_of(config_cls, name)
        if not meta.get("help"):
            raise ValueError(f"{config_cls.__name__}.{name} is not described as a setting (no help text)")
        flag = flag_of(config_cls, name)
        if isinstance(default, bool):  # a switch: store the opposite of the default
            parser.add_argument(flag, dest=name, action="store_false" if default else "store_true",
                                help=meta["help"])
            continue
        parse = meta.get("parse") or (type(default) if default is not None else str)
        extra = {"choices": meta["choices"]} if meta.get("choices") else {}
        if meta.get("metavar"):
            extra["metavar"] = meta["metavar"]
        parser.add_argument(flag, dest=name, type=parse, default=default,
                            help=f"{meta['help']} (default: {_show(default)})", **extra)


def values_from(args: argparse.Namespace, config_cls: type, names: list[str]) -> dict[str, Any]:
    """The parsed values of the options `add_options` made, as config keyword arguments."""
    for name in names:
        _field(config_cls, name)  # a typo in ``names`` fails here, not silently
    return {name: getattr(args, name) for name in names}


# ----------------------------------------------------------------------------------------------- shared settings

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass
class DeviceSettings:
    """Where and in which precision a job runs (every job has these)."""

    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: str = setting("auto", "auto = bf16 autocast on CUDA GPUs that support it, else fp16 with loss "
                             "scaling; fp32 on CPU/MPS", choices=PRECISIONS)


@dataclasses.dataclass
class TrainingSettings(DeviceSettings):
    """What pretraining and fine-tuning runs share: seeds, gradient handling, checkpoints, resume."""

    seed: int = setting(0, "random seed of crops, masks and init")
    grad_accum: int = setting(1, "accumulate gradients over this many batches per step")
    grad_clip: float | None = setting(1.0, "clip the gradient norm to this value; 0 disables")
    checkpoint_every: int = setting(100, "write a checkpoint (and package) every N steps")
    log_every: int = 1  # progress events every N steps (the first and last step always report)
    resume: bool | str | Path = False  # True: continue from output_dir's checkpoint if there is one
    overwrite: bool = setting(False, "replace an earlier run in --output-dir (without it, a folder that holds a "
                              "run is refused unless --resume is given)")


def check_training_settings(config: Any) -> None:
    """Checks every training config shares: crop size (``crop_size`` multiples of 8, at least 32 x 32) and the
    counts that must be >= 1. Raises ValueError naming what is wrong."""
    h, w = config.crop_size
    if h % 8 or w % 8 or h < 32 or w < 32:
        raise ValueError(f"crop_size must be multiples of 8 and at least 32 x 32; got {h} x {w}")
    positive = {"batch_size": config.batch_size, "steps": config.steps, "grad_accum": config.grad_accum,
                "checkpoint_every": config.checkpoint_every, "log_every": config.log_every}
    bad = {k: v for k, v in positive.items() if int(v) < 1}
    if bad:
        raise ValueError(f"these options must be >= 1: {bad}")


TRAINING_OPTIONS = ["seed", "grad_accum", "grad_clip", "checkpoint_every", "overwrite"]  # resume: see the CLI


__all__ = ["DeviceSettings", "TrainingSettings", "add_options", "check_training_settings", "default_of", "flag_of", "parse_int_list", "parse_name_list", "parse_size", "setting",
           "values_from"]
