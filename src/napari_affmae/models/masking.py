"""Mask generators on the patch lattice, and `MaskSpec`: what a pretraining step hides. True = masked
(see `models.common`).

Masking is an argument of pretraining, not of a model (as in Hiera): the MAE models take a `MaskSpec` in
``random_mask(batch, h, w, spec)``; each family declares the masks it can draw (`MaskedAutoencoder`).

Every sample of a batch gets exactly ``n_visible = round(h * w * (1 - ratio))`` visible
patches (at least one), so visible tokens stack into one dense ``[B, n_visible, C]`` tensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

#: blob: Perlin-style blobs (AFFMAE); random: i.i.d. (MAE); unit: whole 2**(stages-1)-patch units shared by
#: the batch (GreenMIM); uniform: one visible patch per 2x2 block (UM-MAE, hides 0.75 exactly).
MASK_KINDS = ("blob", "random", "unit", "uniform")
LATTICE_MASK_KINDS = ("blob", "random")  # per-sample masks: what AFFMAE and ViT-MAE draw
UNIFORM_RATIO = 0.75
#: Blob scales, in lattice cells per noise cell (8/16/32/64 pixels with 8-pixel patches).
BLOB_CELLS = (1, 2, 4, 8)
#: Model-config keys of packages written when masking was a model setting; dropped when they are read.
LEGACY_MASK_FIELDS = ("mask_ratio", "mask_type")


@dataclass(frozen=True)
class MaskSpec:
    """Hide ``ratio`` (0 < ratio < 1) of the 8x8 patches of every crop, drawn as ``kind`` masks (`MASK_KINDS`)."""

    ratio: float
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask_type must be one of {MASK_KINDS}; got {self.kind!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"mask_ratio must be between 0 and 1 (the fraction of 8x8 patches hidden, e.g. 0.5); "
                             f"got {self.ratio!r}")
        object.__setattr__(self, "ratio", float(self.ratio))
        if self.kind == "uniform" and self.ratio != UNIFORM_RATIO:
            raise ValueError(f"uniform masks (UM-MAE) keep one patch of every 2x2 block, so they hide exactly "
                             f"{UNIFORM_RATIO}; got mask_ratio {self.ratio} (leave the ratio unset)")

    @property
    def fixed_ratio(self) -> bool:
        """True for kinds whose ratio is part of their structure (uniform: 0.75)."""
        return self.kind == "uniform"

    def replace(self, ratio: float | None = None, kind: str | None = None) -> MaskSpec:
        """This spec with the given (not None) ratio and kind."""
        changes = {k: v for k, v in (("ratio", ratio), ("kind", kind)) if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "kind": self.kind}


def check_no_mask_fields(options: dict[str, Any]) -> None:
    """Raise if model options carry masking (a pretraining setting since masks left the model configs)."""
    misplaced = [k for k in LEGACY_MASK_FIELDS if k in options]
    if misplaced:
        flags = " / ".join("--" + k.replace("_", "-") for k in misplaced)
        raise ValueError(f"{', '.join(misplaced)} is a pretraining setting, not a model option: give it as {flags} "
                         f"(PretrainConfig.{misplaced[0]}) instead of --model-option / model_options")


def without_mask_fields(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stored model config split into (config without `LEGACY_MASK_FIELDS`, the masking it held)."""
    dropped = {k: config[k] for k in LEGACY_MASK_FIELDS if k in config}
    return {k: v for k, v in config.items() if k not in dropped}, dropped


class MaskedAutoencoder:
    """Mixin of the MAE pretraining models: the family's default masking (``default_mask``), the kinds it can
    draw (``mask_kinds``) and `random_mask`. ``mask_geometry`` gives the family's extra drawing arguments
    (blob ``cells``, GreenMIM ``unit``)."""

    default_mask: ClassVar[MaskSpec]
    mask_kinds: ClassVar[tuple[str, ...]]

    @classmethod
    def mask_spec(cls, ratio: float | None = None, kind: str | None = None) -> MaskSpec:
        """The family default with ``ratio`` / ``kind`` replaced where given; raises a ValueError for a kind
        this family cannot draw or a bad ratio."""
        spec = cls.default_mask.replace(ratio, kind)
        cls.check_mask(spec)
        return spec

    @classmethod
    def check_mask(cls, spec: MaskSpec) -> None:
        if not isinstance(spec, MaskSpec):
            raise TypeError(f"expected a MaskSpec, e.g. MaskSpec(0.5, 'blob'); got {type(spec).__name__}")
        if spec.kind not in cls.mask_kinds:
            raise ValueError(f"{cls.__name__} draws {' or '.join(cls.mask_kinds)} masks; got mask_type "
                             f"{spec.kind!r} (default: {cls.default_mask.kind})")

    def mask_geometry(self) -> dict[str, Any]:
        return {}

    def random_mask(self, batch: int, h: int, w: int, spec: MaskSpec | None = None, device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """A mask ``[B, h, w]`` (True = masked) drawn as ``spec`` says (default: ``default_mask``)."""
        spec = self.default_mask if spec is None else spec
        self.check_mask(spec)
        return make_mask(spec.kind, batch, h, w, spec.ratio, generator, device, **self.mask_geometry())


def visible_count(h: int, w: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1); got {ratio}")
    return max(1, min(h * w, round(h * w * (1.0 - ratio))))


def mask_from_scores(scores: torch.Tensor, n_visible: int) -> torch.Tensor:
    """Keep the ``n_visible`` lowest scores per sample visible. scores ``[B, h, w]`` -> bool mask."""
    b, h, w = scores.shape
    order = torch.argsort(scores.reshape(b, -1), dim=1)
    mask = torch.ones(b, h * w, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :n_visible], False)
    return mask.reshape(b, h, w)


def random_mask(batch: int, h: int, w: int, ratio: float = 0.5, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """i.i.d. uniform masking (argsort of noise, as in MAE): ``[B, h, w]`` bool."""
    noise = torch.rand(batch, h, w, generator=generator, device=_gen_device(generator, device))
    return mask_from_scores(noise, visible_count(h, w, ratio)).to(device)


def blob_mask(batch: int, h: int, w: int, ratio: float = 0.5, generator: torch.Generator | None = None,
              device=None, cells: tuple[int, ...] = BLOB_CELLS) -> torch.Tensor:
    """Blob-shaped masks from smooth (Perlin-style value) noise, one scale per sample.

    Sample i uses a random grid of noise values with ``cells[i % len(cells)]`` lattice cells per
    grid step, bicubically upsampled to ``h x w``; the lowest ``n_visible`` values stay visible,
    so visible and masked regions form blobs of that scale.
    """
    gdev = _gen_device(generator, device)
    scores = torch.empty(batch, h, w, device=gdev)
    for i in range(batch):
        cell = cells[i % len(cells)]
        gh, gw = -(-h // cell) + 1, -(-w // cell) + 1
        grid = torch.rand(1, 1, gh, gw, generator=generator, device=gdev)
        up = F.interpolate(grid, size=(gh * cell, gw * cell), mode="bicubic", align_corners=True)
        # tiny i.i.d. jitter breaks ties on flat regions
        jitter = 1.0e-4 * torch.rand(h, w, generator=generator, device=gdev)
        scores[i] = up[0, 0, :h, :w] + jitter
    return mask_from_scores(scores, visible_count(h, w, ratio)).to(device)


def unit_mask(batch: int, h: int, w: int, unit: int, ratio: float, generator: torch.Generator | None = None,
              device=None) -> torch.Tensor:
    """``[B, h, w]`` bool mask, identical for all samples, constant on ``unit x unit`` blocks
    (border blocks cropped); ``ratio`` of the ``ceil(h/u) x ceil(w/u)`` units are masked (GreenMIM)."""
    hu, wu = -(-h // unit), -(-w // unit)
    units = random_mask(1, hu, wu, ratio, generator, device)  # [1, hu, wu]
    cells = units.repeat_interleave(unit, 1).repeat_interleave(unit, 2)[:, :h, :w]
    return cells.expand(batch, h, w).clone()


def uniform_sampling_mask(batch: int, h: int, w: int, generator: torch.Generator | None = None,
                          device=None) -> torch.Tensor:
    """``[B, h, w]`` bool mask (True = masked) with exactly one visible cell per 2x2 block,
    chosen uniformly at random per block and sample (UM-MAE). ``h`` and ``w`` must be even."""
    if h % 2 or w % 2:
        raise ValueError(f"uniform sampling needs an even lattice (H, W multiples of 16 px); got {h} x {w}")
    pick = torch.randint(0, 4, (batch, h // 2, w // 2), generator=generator,
                         device=_gen_device(generator, device)).to(device)
    visible = F.one_hot(pick, 4).bool().reshape(batch, h // 2, w // 2, 2, 2)  # [B, h/2, w/2, dy, dx]
    return ~visible.permute(0, 1, 3, 2, 4).reshape(batch, h, w)


def make_mask(kind: str, batch: int, h: int, w: int, ratio: float = 0.5,
              generator: torch.Generator | None = None, device=None,
              cells: tuple[int, ...] = BLOB_CELLS, unit: int | None = None) -> torch.Tensor:
    """``[B, h, w]`` mask of ``kind`` in `MASK_KINDS`; ``cells``: the blob scales (see `blob_mask`), ``unit``:
    the unit side of ``"unit"`` masks (`unit_mask`). ``"uniform"`` ignores ``ratio`` (always 0.75)."""
    if kind == "blob":
        return blob_mask(batch, h, w, ratio, generator, device, cells=tuple(cells))
    if kind == "random":
        return random_mask(batch, h, w, ratio, generator, device)
    if kind == "unit":
        if unit is None:
            raise ValueError("unit masks need the unit side in patches (unit=2**(stages-1), e.g. 8)")
        return unit_mask(batch, h, w, unit, ratio, generator, device)
    if kind == "uniform":
        return uniform_sampling_mask(batch, h, w, generator, device)
    raise ValueError(f"unknown mask type {kind!r}; use one of {MASK_KINDS}")


def _gen_device(generator, device):
    return generator.device if generator is not None else device
