"""Pretraining and fine-tuning share one training loop (`engine.training.TrainingLoop`): both go
through it, and in both a run cancelled part-way and resumed ends with the same weights, losses
and RNG-dependent state as an uninterrupted run, bit for bit."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_affmae.engine import CancelToken, FinetuneConfig, JobCancelled, PretrainConfig, finetune, \
    load_checkpoint, pretrain

STEPS = 4
CANCEL_AT = 2


def _cancel_after(step: int):
    """A progress callback and its token: the token is set once ``step`` is reported."""
    token = CancelToken()

    def progress(event) -> None:
        if event.loss is not None and event.step == step:
            token.cancel()

    return progress, token


def _assert_same_run(resumed, reference) -> None:
    final, ref = load_checkpoint(resumed.checkpoint_path), load_checkpoint(reference.checkpoint_path)
    assert final.step == ref.step == STEPS
    assert final.extra["losses"] == ref.extra["losses"] == reference.losses
    assert resumed.losses == reference.losses
    for key, value in ref.model_state.items():
        assert torch.equal(final.model_state[key], value), key
    for key, value in ref.optim_tensors.items():
        assert torch.equal(final.optim_tensors[key], value), key


def _cancel_and_resume(job, config, *args):
    progress, token = _cancel_after(CANCEL_AT)
    with pytest.raises(JobCancelled, match=f"cancelled at step {CANCEL_AT}/{STEPS}") as info:
        job(*args, config, progress=progress, cancel=token)
    assert info.value.result.cancelled and info.value.result.step == CANCEL_AT
    assert load_checkpoint(info.value.result.checkpoint_path).step == CANCEL_AT
    return job(*args, dataclasses.replace(config, resume=True))


@pytest.fixture
def loop_jobs(monkeypatch):
    """The job name of every run that goes through `TrainingLoop.run`."""
    from napari_affmae.engine.training import TrainingLoop

    seen: list[str] = []
    original = TrainingLoop.run

    def run(self):
        seen.append(self.task.job)
        return original(self)

    monkeypatch.setattr(TrainingLoop, "run", run)
    return seen


def test_pretraining_resumed_after_cancel_matches_an_uninterrupted_run(em_stack, tmp_path, loop_jobs):
    image = em_stack[0][:2]
    config = PretrainConfig(crop_size=(64, 64), batch_size=2, steps=STEPS, warmup_steps=1, device="cpu",
                            checkpoint_every=100, output_dir=tmp_path / "ref")
    reference = pretrain(image, config)
    resumed = _cancel_and_resume(pretrain, dataclasses.replace(config, output_dir=tmp_path / "run"), image)
    _assert_same_run(resumed, reference)
    assert loop_jobs == ["pretrain"] * 3


def test_finetuning_resumed_after_cancel_matches_an_uninterrupted_run(trained, em_stack, tmp_path, loop_jobs):
    from napari_affmae.data import sparse_strokes

    image, truth = em_stack
    strokes = sparse_strokes(truth, fraction=0.05, seed=4, slices=[0, 1])
    config = FinetuneConfig(pretrained=trained["pretrained"], crop_size=(64, 64), batch_size=2, steps=STEPS,
                            warmup_steps=1, device="cpu", checkpoint_every=100, output_dir=tmp_path / "ref")
    reference = finetune(image, strokes, config)
    resumed = _cancel_and_resume(finetune, dataclasses.replace(config, output_dir=tmp_path / "run"), image, strokes)
    _assert_same_run(resumed, reference)
    assert resumed.metrics["train"] == reference.metrics["train"]  # the confusion counts survive the resume
    assert loop_jobs == ["finetune"] * 3
