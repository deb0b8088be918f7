"""Fine-tuning: label checks with exact messages, loss only on painted pixels, validation metrics,
dense mode, cancel and resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_affmae.engine import CancelToken, FinetuneConfig, JobCancelled, SegmentConfig, finetune, load_package, \
    segment
from napari_affmae.engine.finetune import IGNORE, check_labels, confusion, scores_from_confusion, segmentation_loss

TWO_CLASSES = "at least two classes must be painted"


def _config(tmp_path, **kw):
    base = dict(crop_size=(64, 64), batch_size=2, steps=3, warmup_steps=1, device="cpu", output_dir=tmp_path / "ft",
                checkpoint_every=100)
    base.update(kw)
    return FinetuneConfig(**base)


def test_label_checks_say_what_is_wrong(em_stack, tmp_path):
    image, truth = em_stack
    empty = np.zeros_like(truth)
    with pytest.raises(ValueError, match="no painted pixels"):
        finetune(image, empty, _config(tmp_path))
    one = empty.copy()
    one[0, 10:20, 10:20] = 2
    with pytest.raises(ValueError, match=f"only one class \\(2\\) is painted: {TWO_CLASSES}"):
        finetune(image, one, _config(tmp_path))
    with pytest.raises(ValueError, match="does not match the image shape"):
        finetune(image, truth[:, :64], _config(tmp_path))
    with pytest.raises(ValueError, match="class_names has 2 names but the labels need 3"):
        finetune(image, truth, _config(tmp_path, class_names=["a", "b"]))
    assert check_labels(truth, "dense") == (3, [1, 2, 3])  # one class per value present (mapped)
    assert check_labels(truth, "sparse") == (3, [1, 2, 3])


def test_loss_ignores_unpainted_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE)
    target[0, :2, :3] = 0
    target[1, 5:, 4:] = 2
    loss = segmentation_loss(logits, target, dice_weight=0.0)
    # reference: mean cross-entropy over the labelled pixels only
    painted = target != IGNORE
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[painted], target[painted])
    torch.testing.assert_close(loss, manual)
    loss_with_dice = segmentation_loss(logits, target, dice_weight=1.0)
    loss_with_dice.backward()
    assert (logits.grad.abs().sum(1)[~painted] == 0).all(), "unpainted pixels must not get gradient"
    assert (logits.grad.abs().sum(1)[painted] > 0).all()


def test_scores_match_hand_computed_iou():
    truth = np.array([0, 0, 1, 1, 2, 2, IGNORE])
    pred = np.array([0, 1, 1, 1, 2, 0, 2])
    scores = scores_from_confusion(confusion(pred, truth, 3), ["a", "b", "c"])
    assert scores["iou"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2})
    assert scores["dice"]["b"] == pytest.approx(0.8) and scores["pixels"] == 6
    assert scores["accuracy"] == pytest.approx(4 / 6)


def test_finetune_with_validation_slices_then_segment(trained, em_stack, tmp_path):
    from napari_affmae.data import sparse_strokes

    image, truth = em_stack
    strokes = sparse_strokes(truth, fraction=0.05, seed=1, slices=[0, 1, 3])
    events = []
    result = finetune(image, strokes, _config(tmp_path, pretrained=trained["pretrained"], val_slices=[3],
                                              class_names=["membrane", "mito", "cyto"]), progress=events.append)
    assert result.step == 3 and not result.cancelled
    val = result.metrics["val"]
    assert val["val_slices"] == [3] and set(val["iou"]) == {"membrane", "mito", "cyto"}
    assert val["pixels"] == int((strokes[3] > 0).sum())
    package = load_package(result.package_path, expect_task="segmentation")
    assert package.class_names == ["membrane", "mito", "cyto"] and package.num_classes == 3
    assert package.provenance["pretrained"] == str(trained["pretrained"])
    assert package.provenance["val_slices"] == [3]
    assert [e.step for e in events if e.loss is not None] == [1, 2, 3]


def test_dense_mode_from_scratch_predicts_background(em_stack, tmp_path):
    image, truth = em_stack
    dense = (truth == 2).astype(np.uint8)  # 0 = background, 1 = mitochondrion, every pixel labelled
    result = finetune(image[:2], dense[:2], _config(tmp_path, label_mode="dense", class_names=["bg", "mito"]))
    package = load_package(result.package_path)
    assert package.label_mode == "dense" and package.num_classes == 2 and package.label_offset == 0
    assert package.provenance["pretrained"] is None
    assert result.metrics["train"]["pixels"] == 3 * 2 * 64 * 64  # every pixel of every crop counts


def test_cancel_then_resume_finishes(trained, em_stack, tmp_path):
    _, truth = em_stack
    from napari_affmae.data import sparse_strokes

    image = em_stack[0]
    strokes = sparse_strokes(truth, fraction=0.05, seed=2, slices=[1])
    token = CancelToken()
    config = _config(tmp_path, pretrained=trained["pretrained"], steps=4)
    with pytest.raises(JobCancelled) as info:
        finetune(image, strokes, config, progress=lambda e: token.cancel() if e.step == 1 else None, cancel=token)
    assert info.value.result.step == 1 and info.value.result.cancelled
    assert load_package(info.value.result.package_path).provenance["steps"] == 1
    config.resume = True
    result = finetune(image, strokes, config)
    assert result.step == 4 and len(result.losses) == 4


def test_layer_decay_applies_to_a_pretrained_encoder_only(trained, tmp_path):
    """Off by default; asked for, it slows the layers of a pretrained encoder only. From scratch there are no
    pretrained features to protect (with 0.75 the stem would learn at 0.75^7 = 13 % of the rate)."""
    from napari_affmae.engine.finetune import FinetuneTask, PaintedLabels
    from napari_affmae.engine.training import param_groups

    labels = PaintedLabels(np.ones((8, 8), np.uint16), None, {}, [1, 2], [1, 2])
    scratch = FinetuneTask(_config(tmp_path, model="affmae_tiny", layer_decay=0.75), None, labels)
    tuned = FinetuneTask(_config(tmp_path, pretrained=trained["pretrained"], layer_decay=0.75), None, labels)
    default = FinetuneTask(_config(tmp_path, pretrained=trained["pretrained"]), None, labels)
    assert scratch.layer_decay == 1.0 and tuned.layer_decay == 0.75 and default.layer_decay == 1.0
    model = scratch.build_model()
    assert {g["lr_scale"] for g in param_groups(model, 0.05, scratch.layer_decay)} == {1.0}
    assert min(g["lr_scale"] for g in param_groups(model, 0.05, tuned.layer_decay)) < 0.2


def test_model_options_override_the_package_config_and_keep_the_pretrained_encoder(trained, em_stack, tmp_path):
    from napari_affmae.engine.finetune import _starting_model

    pre = load_package(trained["pretrained"])
    assert pre.config["refine"] is True and pre.config["keep_rate"] == 0.4
    config = _config(tmp_path, pretrained=trained["pretrained"], model_options={"seg_head": "patch", "refine": False})
    model, info = _starting_model(config, num_classes=3)
    assert model.refine is None and model.config.refine is False and model.fusion is None
    mae = pre.build_model("cpu")
    for name, value in mae.encoder.state_dict().items():  # the encoder still starts from the package
        assert torch.equal(model.encoder.state_dict()[name], value), name
    assert info["pretrained"] == str(trained["pretrained"])
    scratch, _ = _starting_model(_config(tmp_path, model="affmae_tiny", model_options={"keep_rate": 0.7}), 3)
    assert scratch.config.keep_rate == 0.7 and scratch.fusion is not None
    with pytest.raises(ValueError, match=r"unknown AFFMAE option\(s\) \['refin'\]"):
        _starting_model(_config(tmp_path, model="affmae_tiny", model_options={"refin": False}), 3)


def test_pretrain_config_refuses_masking_options_hidden_in_model_options():
    from napari_affmae.engine import PretrainConfig

    with pytest.raises(ValueError, match="mask_ratio is a pretraining setting, not a model option: give it as "
                                         "--mask-ratio"):
        PretrainConfig(model_options={"mask_ratio": 0.9})
    with pytest.raises(ValueError, match="set keep_rate as the PretrainConfig option"):
        PretrainConfig(model_options={"keep_rate": 0.5})


def test_training_continues_from_a_segmentation_package_with_the_same_classes(trained, em_stack, tmp_path):
    """The paint-look-correct loop: corrections painted on the result, training goes on from the trained
    model (its weights, every layer at the full rate); other classes or options are refused before any work."""
    from napari_affmae.data import sparse_strokes
    from napari_affmae.engine.finetune import FinetuneTask, PaintedLabels

    image, truth = em_stack
    seg = load_package(trained["segmentation"])
    config = _config(tmp_path, pretrained=trained["segmentation"], steps=2, class_names=["membrane", "mito", "cyto"])
    task = FinetuneTask(config, None, PaintedLabels(np.ones((8, 8), np.uint16), None, {}, [1, 2, 3], [1, 2, 3]))
    model = task.build_model()
    assert task.layer_decay == 1.0 and task.start_info["continued_from"] == str(trained["segmentation"])
    for name, value in seg.build_model("cpu").state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    strokes = sparse_strokes(truth, fraction=0.05, seed=5, slices=[0, 2])
    result = finetune(image, strokes, config)
    package = load_package(result.package_path, expect_task="segmentation")
    assert package.provenance["continued_from"] == str(trained["segmentation"]) and package.num_classes == 3
    assert package.provenance["continued_provenance"]["steps"] == seg.provenance["steps"]
    # the painted slices are those it was trained on: it keeps what it was taught there (next test)
    assert package.provenance["pseudo_labels"]["teacher"] == "the labels the continued model was taught"
    assert package.provenance["pseudo_labels"]["taught_slices"] == [0, 2]
    two = np.where(strokes == 3, 0, strokes)  # membrane and mito only, no class names for a third
    with pytest.raises(ValueError, match=r"predicts label values \[1, 2, 3\] \(sparse\); these labels have \[1, 2\]"):
        finetune(image, two, _config(tmp_path / "two", pretrained=trained["segmentation"]))
    with pytest.raises(ValueError, match=r"model options \['refine'\] cannot change the trained segmentation"):
        finetune(image, strokes, _config(tmp_path / "opt", pretrained=trained["segmentation"],
                                         model_options={"refine": False}))
    assert not (tmp_path / "two").exists() and not (tmp_path / "opt").exists()  # refused before any work


def test_a_continued_model_keeps_the_labels_it_was_taught_and_asks_itself_on_new_slices(trained, em_stack,
                                                                                          tmp_path):
    """Round 2 of paint-look-correct: the first run's teacher labels (kept next to its package) stay labels
    where nothing is painted now, every stroke wins; a slice painted for the first time is labelled by the
    model's own confident pixels; the new package keeps what it was taught in turn."""
    from napari_affmae.data import sparse_strokes
    from napari_affmae.engine.pseudo_labels import add_model_pseudo_labels
    from napari_affmae.engine.taught_labels import taught_labels_path

    image, truth = em_stack
    with np.load(taught_labels_path(trained["segmentation"])) as kept:
        assert kept["slices"].tolist() == [0, 2]  # the fixture painted slices 0 and 2
        first = dict(zip(kept["slices"].tolist(), kept["planes"]))
    assert all((first[z] > 0).mean() > 0.3 for z in (0, 2))  # the forest's confident pixels: most of the slice
    strokes = sparse_strokes(truth, fraction=0.05, seed=7, slices=[0, 1]).astype(np.uint16)
    config = _config(tmp_path, pretrained=trained["segmentation"], steps=1, pseudo_label_confidence=0.8,
                     class_names=["membrane", "mito", "cyto"])
    result = finetune(image, strokes, config)
    provenance = load_package(result.package_path).provenance
    info = provenance["pseudo_labels"]
    assert info["taught_slices"] == [0] and info["model_slices"] == [1]
    assert info["teacher"] == "the labels the continued model was taught, and the model itself on new slices"
    assert info["taught_pixels"] == int((np.where(strokes[0] > 0, 0, first[0]) > 0).sum())
    by_model, _ = add_model_pseudo_labels(load_package(trained["segmentation"]), image, strokes, 0.8,
                                          tile_size=config.tile_size, device="cpu", slices=[1])
    with np.load(taught_labels_path(result.package_path)) as kept:
        second = dict(zip(kept["slices"].tolist(), kept["planes"]))
    np.testing.assert_array_equal(second[0], np.where(strokes[0] > 0, 0, first[0]))
    np.testing.assert_array_equal(second[1], np.where(strokes[1] > 0, 0, by_model[1]))
    # it trained on every stroke plus those labels: the strokes win where they overlap the first teacher's
    assert provenance["labelled_pixels"] == int((strokes > 0).sum() + (second[0] > 0).sum() + (second[1] > 0).sum())
    # another image (the same stack, brighter): nothing it was taught is about these pixels
    other = finetune(np.clip(image.astype(np.int16) + 9, 0, 255).astype(np.uint8), strokes,
                     _config(tmp_path / "other", pretrained=trained["segmentation"], steps=1))
    info = load_package(other.package_path).provenance["pseudo_labels"]
    assert info["model_slices"] == [0, 1] and info["teacher"] == "the model training continued from"
    # strokes only into the same folder: the earlier run's taught labels do not stay beside the new package
    assert taught_labels_path(other.package_path).is_file()
    again = finetune(image, strokes, _config(tmp_path / "other", pretrained=trained["segmentation"], steps=1,
                                             pseudo_label_confidence=None, resume=False, overwrite=True))
    assert again.package_path == other.package_path and not taught_labels_path(other.package_path).exists()


def test_continuing_refuses_a_forest_package_and_an_output_folder_holding_the_start(trained, em_stack, tmp_path):
    from napari_affmae.data import sparse_strokes
    from napari_affmae.engine.live import LiveConfig, LivePreview

    image, truth = em_stack
    strokes = sparse_strokes(truth, fraction=0.05, seed=5, slices=[0])
    preview = LivePreview(image, LiveConfig(trees=5))
    preview.fit(strokes)
    forest = preview.save(tmp_path / "live" / "forest.affmae")
    with pytest.raises(ValueError, match="fitted by the Live preview; it is not trained by fine-tuning"):
        finetune(image, strokes, _config(tmp_path / "a", pretrained=forest))
    seg = trained["segmentation"]
    before = seg.read_bytes()
    with pytest.raises(ValueError, match="is the input .* or overlaps it; writing there would destroy the input"):
        finetune(image, strokes, _config(tmp_path, output_dir=seg.parent, overwrite=True, pretrained=seg,
                                         class_names=["membrane", "mito", "cyto"]))
    assert seg.read_bytes() == before


def test_a_continued_model_keeps_its_intensity_statistics(trained, em_stack, tmp_path):
    """The model goes on seeing its inputs as it was trained to; new statistics would shift them."""
    image, truth = em_stack
    from napari_affmae.data import sparse_strokes

    seg = load_package(trained["segmentation"])
    strokes = sparse_strokes(truth, fraction=0.05, seed=5, slices=[0, 2])
    result = finetune(image * 0.5 + 40, strokes, _config(tmp_path, pretrained=trained["segmentation"], steps=1))
    again = load_package(result.package_path)
    assert again.normalization == seg.normalization and again.class_names == seg.class_names
    assert again.provenance["layer_decay_used"] == 1.0


def test_a_continued_model_labels_its_own_confident_pixels_and_the_strokes_win(trained, em_stack):
    from napari_affmae.data import sparse_strokes
    from napari_affmae.engine.pseudo_labels import add_model_pseudo_labels

    image, truth = em_stack
    seg = load_package(trained["segmentation"])
    strokes = sparse_strokes(truth, fraction=0.05, seed=5, slices=[1]).astype(np.uint16)  # classes 1..3 = internal
    out, info = add_model_pseudo_labels(seg, image, strokes, 0.6, tile_size=(64, 64), device="cpu")
    probs = np.asarray(segment(seg, image[1], SegmentConfig(tile_size=(64, 64), device="cpu",
                                                            output="probabilities")))  # [K, Y, X]
    sure = (probs.max(0) >= 0.6) & (strokes[1] == 0)
    want = np.where(sure, probs.argmax(0) + 1, strokes[1])
    np.testing.assert_array_equal(out[1], want)
    assert not out[[0, 2, 3]].any()  # unpainted slices stay unlabelled
    assert sum(info["added_pixels"].values()) == int(sure.sum()) > 0
