"""Backend choice of the dispatching ops (``affmae_kernels.neighborhood_attention`` etc.)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_checks import make_problem

import affmae_kernels
from affmae_kernels import reference


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
    from affmae_kernels import reference
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


def test_cpu_tensors_use_the_reference_without_importing_triton():
    result = _run_python(PROBLEM_CODE)
    assert result["err"] < 1e-5
    assert not result["triton_imported"] and not result["kernels_imported"]


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


def test_reference_backend_checks_indices_in_debug_mode(monkeypatch):
    problem = make_problem(nk=20)
    problem.idx[0, 0, 0] = 20
    t = problem.tensors
    monkeypatch.setenv("AFFMAE_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
        affmae_kernels.neighborhood_attention(t["q"], t["k"], t["v"], problem.idx, backend="reference")
