"""Backend choice of the dispatching ops (``affmae_kernels.neighborhood_attention`` etc.)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from kernel_checks import make_problem

import affmae_kernels
from affmae_kernels import KernelSettings, dispatch, kernel_settings, reference, settings


def _run_python(code: str, **env_overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AFFMAE_KERNELS", "TRITON_INTERPRET"))}
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBLEM_CODE = """
    import json, sys, torch
    import affmae_kernels
    from affmae_kernels import KernelSettings, dispatch, kernel_settings, reference, settings
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    idx = torch.randint(0, 16, (1, 16, 8), generator=g)
    valid = torch.rand(1, 16, 8, generator=g) > 0.2
    out = affmae_kernels.neighborhood_attention(q, k, v, idx, valid=valid)
    ref = reference.neighborhood_attention(q.double(), k.double(), v.double(), idx, valid=valid)
    print(json.dumps({"err": float((out.double() - ref).abs().max()),
                      "triton_imported": "triton" in sys.modules,
                      "kernels_imported": "affmae_kernels.triton_ops" in sys.modules}))
"""


def test_cpu_tensors_use_the_reference_without_importing_the_kernels():
    # (torch itself may import triton: it wraps every custom op's kernel in torch._dynamo.disable)
    result = _run_python(PROBLEM_CODE)
    assert result["err"] < 1e-5
    assert not result["kernels_imported"]


def test_environment_forces_triton_under_the_interpreter():
    """A fresh process: TRITON_INTERPRET=1 before import + AFFMAE_KERNELS=triton runs the kernels."""
    result = _run_python(PROBLEM_CODE, AFFMAE_KERNELS="triton", TRITON_INTERPRET="1")
    assert result["kernels_imported"]
    assert result["err"] < 1e-5


def test_forcing_triton_on_cpu_without_the_interpreter_says_what_to_do():
    result = _run_python("""
        import json, torch, affmae_kernels
        q = torch.randn(1, 1, 8, 16)
        try:
            affmae_kernels.neighborhood_attention(q, q, q, torch.zeros(1, 8, 8, dtype=torch.long))
            print(json.dumps({"error": None}))
        except ValueError as err:
            print(json.dumps({"error": str(err)}))
    """, AFFMAE_KERNELS="triton")
    assert result["error"] is not None and "TRITON_INTERPRET=1" in result["error"]


def test_backend_argument_forces_triton(tops, device):
    problem = make_problem(device=device, seed=31)
    t = problem.tensors
    args = (t["q"], t["k"], t["v"], problem.idx)
    kwargs = dict(bias=t["bias"], valid=problem.valid, blank_k=t["blank_k"], blank_v=t["blank_v"])
    got = affmae_kernels.neighborhood_attention(*args, **kwargs, backend="triton")
    want = reference.neighborhood_attention(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    merged = affmae_kernels.weighted_merge(torch.rand(2, 3, 8, 4, device=device), t["k"][:, 0], problem.idx[:, :3, :8],
                                           backend="triton")
    assert merged.shape == (2, 3, 4, t["k"].shape[-1])


def test_unknown_backend_is_rejected():
    problem = make_problem()
    t = problem.tensors
    with pytest.raises(ValueError, match="unknown kernel backend"):
        affmae_kernels.neighborhood_attention(t["q"], t["k"], t["v"], problem.idx, backend="cuda")


def test_reference_backend_checks_indices_in_debug_mode():
    problem = make_problem(nk=20)
    problem.idx[0, 0, 0] = 20
    t = problem.tensors
    with kernel_settings(debug=True):
        with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
            affmae_kernels.neighborhood_attention(t["q"], t["k"], t["v"], problem.idx, backend="reference")


# ------------------------------------------------------------------------------ settings

@pytest.fixture
def environment(monkeypatch):
    """Set AFFMAE_KERNELS* variables for one test; the settings are read again before and after."""
    for name in [n for n in os.environ if n.startswith("AFFMAE_KERNELS") and n != "AFFMAE_KERNELS_TEST_DEVICE"]:
        monkeypatch.delenv(name)
    yield monkeypatch
    monkeypatch.undo()
    settings.reload_environment()


def test_environment_is_read_once(environment):
    environment.setenv("AFFMAE_KERNELS_DEBUG", "1")
    environment.setenv("AFFMAE_KERNELS", "reference")
    assert settings.reload_environment() == KernelSettings(backend="reference", debug=True)
    environment.setenv("AFFMAE_KERNELS_DEBUG", "0")
    assert affmae_kernels.current_settings().debug, "the environment is read once, not on every call"
    assert not settings.reload_environment().debug


def test_bad_environment_values_are_rejected():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        KernelSettings.from_env({"AFFMAE_KERNELS": "cuda"})
    with pytest.raises(ValueError, match="unknown dk/dv mode"):
        KernelSettings.from_env({"AFFMAE_KERNELS_DKDV": "sorted"})
    with pytest.raises(ValueError, match="AFFMAE_KERNELS_DEBUG"):
        KernelSettings.from_env({"AFFMAE_KERNELS_DEBUG": "maybe"})


def test_context_overrides_nest_and_restore():
    before = affmae_kernels.current_settings()
    with kernel_settings(backend="reference", debug=True) as outer:
        assert affmae_kernels.current_settings() == outer
        with kernel_settings(dkdv="reverse") as inner:
            assert inner == KernelSettings(backend="reference", debug=True, dkdv="reverse")
        assert affmae_kernels.current_settings() == outer
    assert affmae_kernels.current_settings() == before


def test_explicit_argument_beats_context_and_environment(tops, device, environment):
    environment.setenv("AFFMAE_KERNELS", "reference")
    settings.reload_environment()
    calls = []
    original = tops.attention_forward
    environment.setattr(tops, "attention_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    problem = make_problem(device=device, seed=32)
    t = problem.tensors
    args = (t["q"], t["k"], t["v"], problem.idx)
    affmae_kernels.neighborhood_attention(*args)
    assert calls == [], "the environment chose the reference"
    with kernel_settings(backend="triton"):
        affmae_kernels.neighborhood_attention(*args)
        assert calls == [1], "the context beats the environment"
        affmae_kernels.neighborhood_attention(*args, backend="reference")
        assert calls == [1], "the argument beats the context"
    affmae_kernels.neighborhood_attention(*args, backend="triton")
    assert calls == [1, 1], "the argument beats the environment"


def test_refused_triton_request_logs_its_reason(tops, caplog, monkeypatch):
    monkeypatch.setattr(settings, "_LOGGED", set())
    monkeypatch.setattr(tops, "interpreted", lambda: False)  # as on a CPU without TRITON_INTERPRET=1
    problem = make_problem()
    t = problem.tensors
    with caplog.at_level(logging.WARNING, logger="affmae_kernels"):
        for _ in range(2):
            with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
                affmae_kernels.neighborhood_attention(t["q"], t["k"], t["v"], problem.idx, backend="triton")
    refusals = [r for r in caplog.records if "refused for neighborhood_attention" in r.getMessage()]
    assert len(refusals) == 1, "the reason is logged once"
    assert "need CUDA tensors" in refusals[0].getMessage() and refusals[0].levelno == logging.WARNING


def test_auto_falls_back_to_the_reference_with_a_logged_reason(caplog, monkeypatch):
    monkeypatch.setattr(settings, "_LOGGED", set())
    cuda_like = SimpleNamespace(is_cuda=True)
    with caplog.at_level(logging.WARNING, logger="affmae_kernels"):
        assert dispatch.choose_backend("weighted_merge", "auto", cuda_like, lambda tops: "float64 input") == "reference"
        assert dispatch.choose_backend("weighted_merge", "auto", cuda_like, lambda tops: None) == (
            "triton" if dispatch.triton_available() else "reference")
    messages = [r.getMessage() for r in caplog.records]
    assert any("falling back to the reference for weighted_merge: float64 input" in m for m in messages)
