"""Pretraining: a run from a TIFF file, cancel -> checkpoint, exact resume after kill -9 of a real
process, and DDP with two gloo processes matching one process on the combined batch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_affmae.engine import CancelToken, JobCancelled, PretrainConfig, load_checkpoint, load_package, pretrain

PYTHON = sys.executable


@pytest.fixture(scope="module")
def stack_tif(tmp_path_factory, em_stack) -> Path:
    path = tmp_path_factory.mktemp("pretrain_data") / "stack.tif"
    tifffile.imwrite(path, em_stack[0][:3], imagej=True, metadata={"axes": "ZYX"})
    return path


def test_pretrain_from_tiff_and_cancel_writes_a_checkpoint(stack_tif, tmp_path):
    events = []
    token = CancelToken()

    def progress(event):
        events.append(event)
        if event.step == 2:
            token.cancel()  # ask to stop after the second step

    config = PretrainConfig(crop_size=(64, 64), batch_size=2, steps=6, warmup_steps=1, device="cpu",
                            output_dir=tmp_path / "run", checkpoint_every=100)
    with pytest.raises(JobCancelled, match="checkpoint saved at") as info:
        pretrain([stack_tif], config, progress=progress, cancel=token)
    result = info.value.result
    assert result.cancelled and result.step == 2 and len(result.losses) == 2
    assert all(np.isfinite(result.losses))
    assert load_checkpoint(result.checkpoint_path).step == 2
    package = load_package(result.package_path, expect_task="mae")
    assert package.provenance["steps"] == 2 and package.stats is not None
    assert package.provenance["sources"] == ["stack.tif"]
    assert [e.step for e in events if e.loss is not None] == [1, 2]
    assert events[1].lr > 0 and events[1].images_per_s > 0 and events[1].total == 6
    # resuming finishes the remaining steps
    result = pretrain([stack_tif], PretrainConfig(**{**config.__dict__, "resume": True}))
    assert result.step == 6 and len(result.losses) == 6 and not result.cancelled


def _cli(*args: str) -> list[str]:
    return [PYTHON, "-m", "napari_affmae.cli", *args]


def _pretrain_args(image: Path, out: Path, log: Path, steps: int) -> list[str]:
    return ["pretrain", str(image), "-o", str(out), "--steps", str(steps), "--crop-size", "64", "--batch-size", "2",
            "--warmup-steps", "2", "--checkpoint-every", "2", "--device", "cpu", "--quiet", "--log-file", str(log)]


def _steps_logged(log: Path) -> list[int]:
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("event") == "progress" and record.get("loss") is not None:
            steps.append(record["step"])
    return steps


def test_resume_after_kill_minus_9_is_exact(stack_tif, tmp_path, cli_env):
    steps = 14
    env = cli_env
    reference = subprocess.run(_cli(*_pretrain_args(stack_tif, tmp_path / "ref", tmp_path / "ref.jsonl", steps)),
                               env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    log = tmp_path / "run.jsonl"
    proc = subprocess.Popen(_cli(*_pretrain_args(stack_tif, tmp_path / "run", log, steps)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(s >= 3 for s in _steps_logged(log)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_steps_logged(log))
    assert killed_at < steps
    saved = load_checkpoint(tmp_path / "run").step
    assert 2 <= saved <= killed_at and saved % 2 == 0

    resumed = subprocess.run(_cli(*_pretrain_args(stack_tif, tmp_path / "run", log, steps), "--resume"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    logged = _steps_logged(log)
    assert logged[len(logged) - (steps - saved):] == list(range(saved + 1, steps + 1))  # continued, not restarted
    final = load_checkpoint(tmp_path / "run")
    ref = load_checkpoint(tmp_path / "ref")
    assert final.step == ref.step == steps
    # restored RNG, optimiser and schedule: the same weights as the uninterrupted run, bit for bit
    for key, value in ref.model_state.items():
        assert torch.equal(final.model_state[key], value), key
    assert final.extra["losses"] == ref.extra["losses"]


def test_ddp_two_gloo_processes_match_one_process(stack_tif, tmp_path, cli_env):
    env = cli_env
    common = ["--steps", "3", "--crop-size", "64", "--batch-size", "4", "--warmup-steps", "1", "--device", "cpu",
              "--quiet", "--checkpoint-every", "3"]
    single = subprocess.run(_cli("pretrain", str(stack_tif), "-o", str(tmp_path / "one"), *common, "--log-file",
                                 str(tmp_path / "one.jsonl")), env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "napari_affmae.cli", "pretrain", str(stack_tif), "-o", str(tmp_path / "two"), *common,
                          "--log-file", str(tmp_path / "two.jsonl")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert two.meta["job_config"]["batch_size"] == 4
    assert json.loads(json.dumps(load_package(tmp_path / "two" / "pretrained.affmae").provenance))["world_size"] == 2
    np.testing.assert_allclose(two.extra["losses"], one.extra["losses"], rtol=2e-4)
    for key, value in one.model_state.items():
        torch.testing.assert_close(two.model_state[key], value, rtol=1e-3, atol=1e-5)
