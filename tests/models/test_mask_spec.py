"""Masking is an argument of pretraining (`MaskSpec`), not a model-config field: every MAE family draws the
masks it is given, keeps its own default, and refuses what it cannot draw with a clear error."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_affmae.models import MaskSpec, create_model, list_models, masking_of
from napari_affmae.models.masking import LEGACY_MASK_FIELDS, MASK_KINDS, check_no_mask_fields

FAMILY_DEFAULTS = {"affmae_tiny": MaskSpec(0.5, "blob"), "vit_mae_tiny": MaskSpec(0.75, "random"),
                   "greenmim_tiny": MaskSpec(0.75, "unit"), "um_mae_tiny": MaskSpec(0.75, "uniform")}


@pytest.mark.parametrize("ratio, kind, message", [
    (0.0, "blob", "mask_ratio must be between 0 and 1"),
    (1.0, "random", "mask_ratio must be between 0 and 1"),
    (1.5, "random", "got 1.5"),
    ("0.5", "random", "mask_ratio must be between 0 and 1"),
    (True, "random", "mask_ratio must be between 0 and 1"),
    (0.5, "blobs", "mask_type must be one of"),
    (0.5, "uniform", "uniform masks .* hide exactly 0.75"),
])
def test_a_bad_mask_spec_is_a_clear_value_error(ratio, kind, message):
    with pytest.raises(ValueError, match=message):
        MaskSpec(ratio, kind)


def test_mask_spec_is_frozen_and_replace_keeps_what_is_not_given():
    spec = MaskSpec(0.5, "blob")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ratio = 0.7  # type: ignore[misc]
    assert spec.replace(ratio=0.7) == MaskSpec(0.7, "blob") and spec.replace(kind="random") == MaskSpec(0.5, "random")
    assert spec.replace() == spec and MaskSpec(0.75, "uniform").fixed_ratio and not spec.fixed_ratio


@pytest.mark.parametrize("name", sorted(FAMILY_DEFAULTS))
def test_family_configs_have_no_mask_fields_and_keep_their_own_default(name):
    model = create_model(name)
    fields = {f.name for f in dataclasses.fields(model.config)}
    assert not fields & set(LEGACY_MASK_FIELDS), name
    assert masking_of(name).default_mask == model.default_mask == FAMILY_DEFAULTS[name]
    assert set(model.mask_kinds) <= set(MASK_KINDS) and model.default_mask.kind in model.mask_kinds
    with pytest.raises(ValueError, match="mask_ratio"):  # an old-style override is not a config field any more
        create_model(name, mask_ratio=0.5)


def test_every_pretrainable_model_registers_its_masking():
    for name in list_models(task="mae"):
        assert isinstance(masking_of(name).default_mask, MaskSpec), name
    with pytest.raises(ValueError, match="cannot be pretrained"):
        masking_of("unet_tiny")
    with pytest.raises(ValueError, match="unknown model"):
        masking_of("affmae_giant")


@pytest.mark.parametrize("name, spec", [
    ("affmae_tiny", MaskSpec(0.3, "blob")), ("affmae_tiny", MaskSpec(0.7, "random")),
    ("vit_mae_tiny", MaskSpec(0.6, "random")), ("vit_mae_tiny", MaskSpec(0.25, "blob")),
    ("greenmim_tiny", MaskSpec(0.5, "unit")), ("um_mae_tiny", MaskSpec(0.75, "uniform")),
])
def test_random_mask_draws_what_the_spec_says_and_the_model_trains_on_it(name, spec):
    model = create_model(name)
    mask = model.random_mask(2, 16, 16, spec, generator=torch.Generator().manual_seed(0))  # [2, 16, 16]
    assert mask.shape == (2, 16, 16) and mask.dtype == torch.bool
    hidden = mask.flatten(1).float().mean(1)  # per sample
    assert torch.allclose(hidden, torch.full((2,), spec.ratio), atol=0.5 / 256), (name, spec, hidden)
    out = model(torch.randn(2, 1, 128, 128), mask=mask)
    assert torch.isfinite(out["loss"]) and torch.equal(out["mask"], mask)


def test_a_family_refuses_a_kind_it_cannot_draw():
    with pytest.raises(ValueError, match="GreenMIM draws unit masks; got mask_type 'blob'"):
        create_model("greenmim_tiny").random_mask(1, 16, 16, MaskSpec(0.5, "blob"))
    with pytest.raises(ValueError, match="UMMAE draws uniform masks"):
        masking_of("um_mae_tiny").mask_spec(kind="random")
    with pytest.raises(TypeError, match="expected a MaskSpec"):
        create_model("affmae_tiny").random_mask(1, 8, 8, 0.5)  # type: ignore[arg-type]


def test_masking_in_model_options_points_to_the_pretraining_option():
    check_no_mask_fields({"target_pool": 2})
    with pytest.raises(ValueError, match="mask_type is a pretraining setting.*--mask-type"):
        check_no_mask_fields({"mask_type": "random"})
