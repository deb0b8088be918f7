"""A setting's default is written once: the CLI, the widgets and the engine configs agree."""
from __future__ import annotations

import dataclasses

import pytest

from napari_affmae.cli import BATCH_OPTIONS, FINETUNE_OPTIONS, PRETRAIN_OPTIONS, SEGMENT_OPTIONS, build_parser
from napari_affmae.engine import BatchConfig, FinetuneConfig, PretrainConfig, SegmentConfig
from napari_affmae.engine.settings import TRAINING_OPTIONS, add_options, default_of, flag_of, setting, values_from

COMMANDS = {  # command line with only what is required -> (config class, settings the command offers)
    "pretrain": (["pretrain", "img.tif", "-o", "out"], PretrainConfig,
                 [*PRETRAIN_OPTIONS, "device", "precision", *TRAINING_OPTIONS]),
    "finetune": (["finetune", "img.tif", "labels.tif", "-o", "out", "--scratch"], FinetuneConfig,
                 [*FINETUNE_OPTIONS, "device", "precision", *TRAINING_OPTIONS]),
    "segment": (["segment", "pkg.affmae", "img.tif", "-o", "out.tif"], SegmentConfig,
                [*SEGMENT_OPTIONS, "slices", "device", "precision"]),
    "batch": (["batch", "pkg.affmae", "a.zarr"], SegmentConfig, [*SEGMENT_OPTIONS, "device", "precision"]),
}


def _cli_value(name: str, value):
    return tuple(value) if isinstance(value, list) and name.endswith("_size") else value


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_defaults_are_the_engine_defaults(command: str) -> None:
    argv, config_class, names = COMMANDS[command]
    args = build_parser().parse_args(argv)
    for name in names:
        assert _cli_value(name, getattr(args, name)) == default_of(config_class, name), f"{command} --{name}"
    if command == "batch":
        assert values_from(args, BatchConfig, BATCH_OPTIONS) == {n: default_of(BatchConfig, n) for n in BATCH_OPTIONS}


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_config_built_from_the_cli_defaults_equals_the_default_config(command: str) -> None:
    argv, config_class, names = COMMANDS[command]
    built = config_class(**values_from(build_parser().parse_args(argv), config_class, names))
    assert dataclasses.asdict(built) == dataclasses.asdict(config_class())


def test_help_shows_the_default_from_the_config() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()  # noqa: SLF001
    assert f"(default: {default_of(FinetuneConfig, 'steps')})" in text
    assert flag_of(FinetuneConfig, "augment") == "--no-augment" and "--no-augment" in text


def test_pretrain_help_shows_each_family_default_mask() -> None:
    from napari_affmae.models import list_models, masking_of

    text = " ".join(build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help().split())  # noqa: SLF001
    for name in list_models(task="mae"):
        spec = masking_of(name).default_mask
        assert f"{name.rsplit('_', 1)[0]} {spec.ratio:g} {spec.kind}" in text, name


def test_settings_without_help_or_with_a_typo_are_refused() -> None:
    import argparse

    @dataclasses.dataclass
    class Job:
        steps: int = setting(3, "steps")
        hidden: int = 1

    parser = argparse.ArgumentParser()
    with pytest.raises(ValueError, match="not described as a setting"):
        add_options(parser, Job, ["hidden"])
    with pytest.raises(KeyError, match="no setting 'stpes'"):
        add_options(parser, Job, ["stpes"])
    add_options(parser, Job, ["steps"])
    assert parser.parse_args([]).steps == 3 and parser.parse_args(["--steps", "5"]).steps == 5


@pytest.mark.gui
def test_widgets_start_from_the_engine_defaults(make_napari_viewer) -> None:
    from napari_affmae.widgets.batch import BatchWidget
    from napari_affmae.widgets.finetune import FROM_SCRATCH, FinetuneWidget
    from napari_affmae.widgets.pretrain import PretrainWidget
    from napari_affmae.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    for widget, config_class in ((PretrainWidget(viewer), PretrainConfig), (FinetuneWidget(viewer), FinetuneConfig)):
        assert widget.steps.value() == default_of(config_class, "steps")
        assert widget.batch_size.value() == default_of(config_class, "batch_size")
        assert (widget.crop_h.value(), widget.crop_w.value()) == default_of(config_class, "crop_size")
    finetune = FinetuneWidget(viewer)
    # the winning few-strokes recipe (docs/few-strokes.md): from scratch, taught by the live preview
    assert finetune.start_from.currentText() == FROM_SCRATCH and finetune.config(2).pretrained is None
    assert finetune.scratch_model.isEnabled() and not finetune.pretrained.isEnabled()
    assert finetune.teacher.isChecked() and finetune.config(2).pseudo_label_confidence == default_of(
        FinetuneConfig, "pseudo_label_confidence")
    finetune.teacher.setChecked(False)
    assert finetune.config(2).pseudo_label_confidence is None
    pretrain = PretrainWidget(viewer)
    assert pretrain.model.currentText() == default_of(PretrainConfig, "model")
    # the mask ratio shown is the one PretrainConfig's defaults draw for the chosen model, whichever it is
    for name in ("affmae_tiny", "vit_mae_tiny", "um_mae_tiny"):
        pretrain.model.setCurrentText(name)
        assert pretrain.mask_ratio.value() == pytest.approx(PretrainConfig(model=name).mask_spec().ratio)
        assert pretrain.config().mask_spec() == PretrainConfig(model=name).mask_spec()
    for widget in (SegmentWidget(viewer), BatchWidget(viewer)):
        tiling = widget.tiling if hasattr(widget, "tiling") else widget
        assert (tiling.tile_h.value(), tiling.tile_w.value()) == default_of(SegmentConfig, "tile_size")
        assert tiling.overlap.value() == pytest.approx(default_of(SegmentConfig, "overlap"))
        assert tiling.batch_size.value() == default_of(SegmentConfig, "batch_size")
