"""The ``affmae::`` custom ops: FLOP formulas seen by FlopCounterMode, opcheck, torch.compile,
and the deterministic backward."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import check_against_reference, make_problem
from torch.utils.flop_counter import FlopCounterMode

import affmae_kernels
from affmae_kernels import kernel_settings, ops, reference
from affmae_kernels.flops import knn_flops, neighborhood_attention_flops, weighted_merge_flops

ATTENTION_OPS = (torch.ops.affmae.na_forward, torch.ops.affmae.na_backward)
MERGE_OPS = (torch.ops.affmae.weighted_merge, torch.ops.affmae.weighted_merge_backward)


def _merge_inputs(b=2, n_out=5, m=8, g=4, n=11, c=6, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(b, n_out, m, g, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    feat = torch.randn(b, n, c, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    idx = torch.randint(0, n, (b, n_out, m), generator=gen).to(device)
    return weights, feat, idx


# ------------------------------------------------------------------------------ FLOP formulas

@pytest.mark.parametrize("cluster", [1, 4], ids=["per_token", "cluster"])
@pytest.mark.parametrize("with_blank", [True, False], ids=["blank", "no_blank"])
def test_flop_counter_counts_attention_by_its_formula(cluster, with_blank):
    problem = make_problem(cluster=cluster, with_blank=with_blank, seed=40)
    leaves = problem.leaves()
    b, h, nq, d = leaves["q"].shape
    m = problem.idx.shape[-1]
    with FlopCounterMode(display=False) as counter:
        out = affmae_kernels.neighborhood_attention(leaves["q"], leaves["k"], leaves["v"], problem.idx,
                                                    bias=leaves["bias"], valid=problem.valid,
                                                    blank_k=leaves["blank_k"], blank_v=leaves["blank_v"])
        out.square().sum().backward()
    fwd, bwd, _ = neighborhood_attention_flops(b, h, nq, m, d, blank=with_blank)
    counts = counter.get_flop_counts()["Global"]
    assert counts[ATTENTION_OPS[0]] == fwd == 2 * b * h * nq * d * (m + with_blank) + 2 * b * h * nq * m * d
    assert counts[ATTENTION_OPS[1]] == bwd == 2 * fwd + 2 * b * h * nq * d * (m + with_blank)
    assert counter.get_total_flops() == fwd + bwd


def test_flop_counter_counts_merge_and_knn_by_their_formulas():
    weights, feat, idx = _merge_inputs()
    query, centroids = torch.rand(2, 7, 2), torch.rand(2, 5, 2)
    with FlopCounterMode(display=False) as counter:
        affmae_kernels.weighted_merge(weights, feat, idx).sum().backward()
        affmae_kernels.knn_centroids(query, centroids, 3)
    counts = counter.get_flop_counts()["Global"]
    fwd, bwd = weighted_merge_flops(2, 5, 8, 4, 6)
    assert counts[MERGE_OPS[0]] == fwd == 2 * 2 * 5 * 8 * 4 * 6 and counts[MERGE_OPS[1]] == bwd == 2 * fwd
    assert counts[torch.ops.affmae.knn_centroids] == knn_flops(2, 7, 5) == 2 * 7 * 5 * 5


def test_counter_built_before_the_registration_still_counts():
    counter = FlopCounterMode(display=False)
    for packet in ops.FLOP_FORMULAS:  # as if the counter copied the registry before the formulas existed
        counter.flop_registry.pop(packet, None)
    with counter:
        affmae_kernels.knn_centroids(torch.rand(1, 4, 2), torch.rand(1, 6, 2), 2)
    assert counter.get_total_flops() == knn_flops(1, 4, 6)


# ------------------------------------------------------------------------------ opcheck

def _attention_args(cluster: int, optional: bool, backend: str = "reference", device="cpu"):
    problem = make_problem(cluster=cluster, with_bias=optional, with_valid=optional, with_blank=optional,
                           device=device, seed=41)
    t = problem.leaves()
    return (t["q"], t["k"], t["v"], problem.idx, t["bias"], problem.valid, t["blank_k"], t["blank_v"], 0.25,
            backend, "atomic", False, "", "")


@pytest.mark.parametrize(("cluster", "optional"), [(1, True), (4, True), (1, False)])
def test_opcheck_attention(cluster, optional):
    args = _attention_args(cluster, optional)
    torch.library.opcheck(torch.ops.affmae.na_forward.default, args)
    out, lse = torch.ops.affmae.na_forward(*args)
    q, k, v, idx, bias, valid, blank_k, blank_v = args[:8]
    detached = [None if t is None else t.detach() for t in (q, k, v, idx, bias, valid, blank_k, blank_v)]
    need = [True, True, True, optional, optional, optional]
    torch.library.opcheck(torch.ops.affmae.na_backward.default,
                          (torch.randn_like(out), *detached, out.detach(), lse, *args[8:], need))


def test_opcheck_merge_and_knn():
    weights, feat, idx = _merge_inputs()
    torch.library.opcheck(torch.ops.affmae.weighted_merge.default, (weights, feat, idx, "reference", False))
    grad = torch.randn(2, 5, 4, 6)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.affmae.weighted_merge_backward.default,
                              (grad, weights.detach(), feat.detach(), idx, "reference", False, *need))
    valid = torch.rand(2, 5) > 0.3
    valid[:, :3] = True
    torch.library.opcheck(torch.ops.affmae.knn_centroids.default,
                          (torch.rand(2, 7, 2), torch.rand(2, 5, 2), 3, valid, "reference", False))


def test_opcheck_attention_on_the_triton_kernels(tops, device):
    args = _attention_args(1, True, backend="triton", device=device)
    torch.library.opcheck(torch.ops.affmae.na_forward.default, args, test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------ torch.compile

def test_torch_compile_keeps_the_ops_whole():
    problem = make_problem(seed=42)
    seen: list[object] = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def attention(q, k, v):
        return affmae_kernels.neighborhood_attention(q, k, v, problem.idx, valid=problem.valid).sum()

    t = problem.tensors
    torch._dynamo.reset()
    with kernel_settings(backend="reference"):
        compiled = torch.compile(attention, backend=backend)(t["q"], t["k"], t["v"])
        eager = attention(t["q"], t["k"], t["v"])
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    op = torch.ops.affmae.na_forward
    assert op in seen or op.default in seen, "the graph holds the custom op as one node"
    assert not any("index_select" in str(target) for target in seen), "the op is not traced into"


# ------------------------------------------------------------------------------ determinism

@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_mode_takes_the_atomic_free_attention_backward(tops, device, deterministic, monkeypatch):
    calls = []
    original = tops.build_reverse_index
    monkeypatch.setattr(tops, "build_reverse_index", lambda *a: calls.append(1) or original(*a))
    problem = make_problem(device=device, seed=43)

    def attention(*args, **kwargs):
        return tops.neighborhood_attention(*args, dkdv="atomic", debug=True, **kwargs)

    check_against_reference(attention, problem, torch.float32)
    assert calls, "deterministic algorithms must not take the atomic dk/dv path"


def test_deterministic_mode_takes_the_reference_merge_dfeat(tops, device, deterministic, monkeypatch):
    calls = []
    original = reference.merge_backward
    monkeypatch.setattr(reference, "merge_backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    weights, feat, idx = _merge_inputs(device=device)
    tops.weighted_merge(weights, feat, idx, debug=True).square().sum().backward()
    assert calls == [1]
    w64, f64 = weights.detach().double().requires_grad_(True), feat.detach().double().requires_grad_(True)
    reference.weighted_merge(w64, f64, idx).square().sum().backward()
    torch.testing.assert_close(feat.grad.double(), f64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
