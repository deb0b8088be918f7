"""Build models by name, list them by pattern (in the spirit of timm's registry).

This module imports no model code. Each family module registers its builders when it is imported,
with one call per name, ``register_model(name, builder, tasks=..., trainable=...)``, and the
``napari_affmae.models`` package imports every family, so importing the package (or anything in it)
fills the registry. A pretrainable model also registers its MAE class as ``masking``: its ``default_mask``
(a `MaskSpec`) and ``mask_kinds`` say how pretraining masks it unless told otherwise (`masking_of`). A builder is called as ``builder(task="mae" | "segmentation", num_classes=None,
**overrides)``; ``overrides`` replace fields of the model's config dataclass (unknown fields raise
a ValueError).
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch.nn as nn

TASKS = ("mae", "segmentation")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, tuple[str, ...]] = {}
_NOT_TRAINABLE: set[str] = set()  # models fitted another way (e.g. the Live preview's forest), not by fine-tuning
_MASKING: dict[str, Any] = {}


def register_model(name: str, builder: Callable[..., nn.Module], tasks: tuple[str, ...] = TASKS,
                   trainable: bool = True, masking: Any = None) -> None:
    """Register ``builder`` under ``name`` (must be unique) for the given tasks; ``trainable=False`` for a
    model that gradient fine-tuning cannot train (it is fitted another way); ``masking``: the MAE class (a
    `masking.MaskedAutoencoder`) of a model with the ``"mae"`` task."""
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is registered twice")
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"{name}: unknown task(s) {sorted(unknown)}; use {TASKS}")
    _REGISTRY[name] = builder
    _TASKS[name] = tuple(tasks)
    if not trainable:
        _NOT_TRAINABLE.add(name)
    if masking is not None:
        _MASKING[name] = masking


def masking_of(name: str) -> Any:
    """The MAE class of model ``name`` (``default_mask``, ``mask_kinds``, ``mask_spec(ratio, kind)``), without
    building the model. Raises a ValueError for an unknown name or a model that cannot be pretrained."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    if name not in _MASKING:
        raise ValueError(f"{name} cannot be pretrained as a masked autoencoder; choose one of "
                         f"{', '.join(list_models(task='mae'))}")
    return _MASKING[name]


def list_models(pattern: str = "*", task: str | None = None, trainable: bool | None = None) -> list[str]:
    """Sorted model names matching a shell-style pattern, e.g. ``"affmae_*"``; ``task`` keeps only
    the models that support it (``"mae"`` lists the pretrainable ones); ``trainable=True`` only those that
    fine-tuning can train."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern) and (task is None or task in _TASKS[n])
                  and (trainable is None or (n not in _NOT_TRAINABLE) == trainable))


def create_model(name: str, task: str = "mae", num_classes: int | None = None, **overrides) -> nn.Module:
    """Instantiate a registered model for ``task``.

    ``num_classes`` (number of output classes K, background included) is required for
    segmentation and must be left out for MAE pretraining.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if task == "segmentation" and (num_classes is None or num_classes < 2):
        raise ValueError(f"segmentation needs num_classes >= 2 (background + at least one class); got {num_classes}")
    if task == "mae" and num_classes is not None:
        raise ValueError("num_classes only applies to task='segmentation'")
    model = _REGISTRY[name](task=task, num_classes=num_classes, **overrides)
    model.model_name = name
    return model
