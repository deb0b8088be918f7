"""Shared helpers of the kernel tests: random problems and the float64 oracle."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from affmae_kernels import reference

#: Allowed error relative to the largest magnitude of the float64 reference tensor.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

GRAD_NAMES = ("q", "k", "v", "bias", "blank_k", "blank_v")


@dataclass
class AttentionProblem:
    """Inputs of one neighbourhood-attention call (differentiable ones in `tensors`)."""

    tensors: dict[str, torch.Tensor | None]  # q, k, v, bias, blank_k, blank_v
    idx: torch.Tensor
    valid: torch.Tensor | None

    def leaves(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | None]:
        """Fresh leaf copies (optionally cast, e.g. to float64 for the oracle)."""
        out = {}
        for name, t in self.tensors.items():
            if t is None:
                out[name] = None
                continue
            t = t.detach()
            out[name] = (t.to(dtype) if dtype is not None else t.clone()).requires_grad_(True)
        return out


def make_problem(*, b=2, h=2, nq=24, nk=20, m=16, d=16, cluster=1, dtype=torch.float32,
                 with_bias=True, with_valid=True, with_blank=True, device="cpu",
                 seed=0) -> AttentionProblem:
    """Random problem; ``cluster > 1`` gives idx ``[B, Nq / cluster, M]`` (cluster mode).

    With `with_valid`, about 30 % of the neighbours are padding and the second idx row (query
    or cluster) of every batch element is fully padded.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    groups = nq // cluster
    idx = torch.randint(0, nk, (b, groups, m), generator=gen)
    valid = None
    if with_valid:
        valid = torch.rand(b, groups, m, generator=gen) > 0.3
        valid[:, 1] = False  # a fully padded row (cluster) in every batch element
        valid = valid.to(device)
    tensors = {
        "q": rand(b, h, nq, d),
        "k": rand(b, h, nk, d),
        "v": rand(b, h, nk, d),
        "bias": rand(b, h, nq, m) if with_bias else None,
        "blank_k": rand(h, d) if with_blank else None,
        "blank_v": rand(h, d) if with_blank else None,
    }
    return AttentionProblem(tensors, idx.to(device), valid)


def run_attention(fn, problem: AttentionProblem, leaves, grad_out: torch.Tensor, **kwargs):
    """Forward + backward; returns the output and the gradient of every present leaf."""
    out = fn(leaves["q"], leaves["k"], leaves["v"], problem.idx, bias=leaves["bias"], valid=problem.valid,
             blank_k=leaves["blank_k"], blank_v=leaves["blank_v"], **kwargs)
    out.backward(grad_out.to(out.dtype))
    grads = {name: leaves[name].grad for name in GRAD_NAMES if leaves[name] is not None}
    return out, grads


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Max |actual - expected| <= tol * max |expected| (+ a tiny floor for all-zero tensors)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten or NaN-poisoned elements)"
    bound = TOLERANCE[dtype] * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-3)
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"


def check_against_reference(fn, problem: AttentionProblem, dtype: torch.dtype, seed: int = 1, **kwargs) -> None:
    """Kernel output and every gradient vs the float64 reference on the same (rounded) inputs."""
    gen = torch.Generator().manual_seed(seed)
    q = problem.tensors["q"]
    grad_out = torch.randn(q.shape, generator=gen).to(q.device)
    out, grads = run_attention(fn, problem, problem.leaves(), grad_out, **kwargs)
    ref_out, ref_grads = run_attention(reference.neighborhood_attention, problem,
                                       problem.leaves(torch.float64), grad_out.double())
    assert out.dtype == q.dtype
    assert_close_to_reference(out, ref_out, dtype, "output")
    for name, ref_grad in ref_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == problem.tensors[name].dtype, f"d{name} has dtype {grads[name].dtype}"
        assert_close_to_reference(grads[name], ref_grad, dtype, f"d{name}")
