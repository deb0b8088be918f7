"""Triton neighbourhood attention vs the float64 PyTorch reference (forward and all gradients).

On CPU this runs the kernels through the Triton interpreter (see conftest.py). Every call
uses debug mode: indices are range-checked and every kernel-written buffer starts as NaN, so
an element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close_to_reference, check_against_reference, make_problem

from affmae_kernels import KernelSettings, Tile, kernel_settings, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _attention(tops, **fixed):
    def call(*args, **kwargs):
        return tops.neighborhood_attention(*args, debug=True, **fixed, **kwargs)
    return call


@pytest.mark.parametrize("dkdv", ["atomic", "reverse"])
@pytest.mark.parametrize("cluster", [1, 4], ids=["per_token", "cluster"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_matches_reference_with_padding_bias_and_blank(tops, device, dtype, cluster, dkdv):
    problem = make_problem(dtype=dtype, cluster=cluster, device=device, seed=3)
    check_against_reference(_attention(tops, dkdv=dkdv), problem, dtype)


@pytest.mark.parametrize("cluster", [1, 4], ids=["per_token", "cluster"])
def test_fully_padded_rows_without_blank_are_zero(tops, device, cluster):
    problem = make_problem(cluster=cluster, with_blank=False, device=device, seed=5)
    check_against_reference(_attention(tops), problem, torch.float32)
    leaves = problem.leaves()
    out = tops.neighborhood_attention(leaves["q"], leaves["k"], leaves["v"], problem.idx, bias=leaves["bias"],
                                      valid=problem.valid, debug=True)
    padded_rows = slice(cluster, 2 * cluster)  # idx row 1 is fully padded (see make_problem)
    assert torch.equal(out[:, :, padded_rows], torch.zeros_like(out[:, :, padded_rows]))
    out.sum().backward()
    assert torch.equal(leaves["q"].grad[:, :, padded_rows], torch.zeros_like(leaves["q"].grad[:, :, padded_rows]))
    assert torch.equal(leaves["bias"].grad[:, :, padded_rows], torch.zeros_like(leaves["bias"].grad[:, :, padded_rows]))


def test_fully_padded_rows_with_blank_return_blank_value(tops, device):
    problem = make_problem(device=device, seed=6)
    leaves = problem.leaves()
    out = tops.neighborhood_attention(leaves["q"], leaves["k"], leaves["v"], problem.idx, bias=leaves["bias"],
                                      valid=problem.valid, blank_k=leaves["blank_k"], blank_v=leaves["blank_v"],
                                      debug=True)
    expected = leaves["blank_v"].detach()[None, :, None, :].expand(out.shape[0], -1, 1, -1)
    torch.testing.assert_close(out[:, :, 1:2], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("d", "m", "cluster", "nq"),
    [
        (32, 24, 1, 37),   # M not a multiple of 16, Nq not a multiple of the query block
        (64, 8, 1, 19),    # smallest M, largest head dim of the model
        (32, 24, 5, 35),   # cluster size not a power of two, M padded inside the tile
        (16, 64, 8, 32),   # the model's configuration: c = 8, M = 64
        (64, 16, 20, 40),  # cluster larger than the minimum tile
        (16, 16, 80, 160),  # cluster split over two programs
        (128, 16, 8, 24),  # largest supported head dim
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_head_dims_and_odd_sizes(tops, device, d, m, cluster, nq, dtype):
    problem = make_problem(b=1, h=2, nq=nq, nk=29, m=m, d=d, cluster=cluster, dtype=dtype, device=device, seed=d + m)
    check_against_reference(_attention(tops), problem, dtype)


@pytest.mark.parametrize("cluster", [1, 8], ids=["per_token", "cluster"])
@pytest.mark.parametrize("dkdv", ["atomic", "reverse"])
def test_without_optional_inputs(tops, device, cluster, dkdv):
    problem = make_problem(nq=32, cluster=cluster, with_bias=False, with_valid=False, with_blank=False,
                           device=device, seed=7)
    check_against_reference(_attention(tops, dkdv=dkdv), problem, torch.float32)


def test_many_duplicate_keys_per_block(tops, device):
    """80 queries x 64 neighbours over only 12 keys: every key is hit by hundreds of slots."""
    problem = make_problem(b=1, h=1, nq=80, nk=12, m=64, d=32, device=device, seed=8)
    check_against_reference(_attention(tops, dkdv="atomic"), problem, torch.float32)
    check_against_reference(_attention(tops, dkdv="reverse"), problem, torch.float32)


@pytest.mark.parametrize("cluster", [1, 4], ids=["per_token", "cluster"])
def test_non_contiguous_inputs_and_grad(tops, device, cluster):
    b, h, nq, nk, m, d = 2, 2, 24, 20, 16, 16
    gen = torch.Generator().manual_seed(11)
    q_src = torch.randn(b, nq, h, d, generator=gen).to(device)
    kv_src = torch.randn(b, nk, 2, h, d, generator=gen).to(device)
    bias_src = torch.randn(b, nq, m, h, generator=gen).to(device)
    idx_src = torch.randint(0, nk, (b, nq // cluster, 2 * m), generator=gen, dtype=torch.int32).to(device)
    valid_src = (torch.rand(b, nq // cluster, 2 * m, generator=gen) > 0.3).to(device)
    idx, valid = idx_src[..., ::2], valid_src[..., ::2]  # strided views
    grad_out = torch.randn(b, nq, h, d, generator=gen).to(device).transpose(1, 2)  # non-contiguous

    def inputs(dtype):
        q = q_src.to(dtype, copy=True).requires_grad_()
        kv = kv_src.to(dtype, copy=True).requires_grad_()
        bias = bias_src.to(dtype, copy=True).requires_grad_()
        return (q, kv, bias), (q.transpose(1, 2), kv.permute(2, 0, 3, 1, 4)[0], kv.permute(2, 0, 3, 1, 4)[1],
                               bias.permute(0, 3, 1, 2))

    (q, kv, bias), (qv, kvk, kvv, biasv) = inputs(torch.float32)
    assert not (qv.is_contiguous() or kvk.is_contiguous() or biasv.is_contiguous() or idx.is_contiguous())
    out = tops.neighborhood_attention(qv, kvk, kvv, idx, bias=biasv, valid=valid, debug=True)
    out.backward(grad_out)
    (q64, kv64, bias64), (qv64, kvk64, kvv64, biasv64) = inputs(torch.float64)
    ref = reference.neighborhood_attention(qv64, kvk64, kvv64, idx, bias=biasv64, valid=valid)
    ref.backward(grad_out.double())
    assert_close_to_reference(out, ref, torch.float32, "output")
    for name, got, want in (("q", q, q64), ("kv", kv, kv64), ("bias", bias, bias64)):
        assert_close_to_reference(got.grad, want.grad, torch.float32, f"d{name}")

    # a broadcast (zero-stride) output gradient, as produced by out.sum().backward()
    q.grad = None
    tops.neighborhood_attention(qv, kvk, kvv, idx, bias=biasv, valid=valid, debug=True).sum().backward()
    q64.grad = None
    reference.neighborhood_attention(qv64, kvk64, kvv64, idx, bias=biasv64, valid=valid).sum().backward()
    assert_close_to_reference(q.grad, q64.grad, torch.float32, "dq (broadcast grad)")


def test_only_some_inputs_need_grad(tops, device):
    problem = make_problem(device=device, seed=12)
    q = problem.tensors["q"].clone().requires_grad_()
    k, v, bias = (problem.tensors[n] for n in ("k", "v", "bias"))
    out = tops.neighborhood_attention(q, k, v, problem.idx, bias=bias, valid=problem.valid, debug=True)
    out.backward(torch.ones_like(out))
    q64 = q.detach().double().requires_grad_()
    ref = reference.neighborhood_attention(q64, k.double(), v.double(), problem.idx, bias=bias.double(),
                                           valid=problem.valid)
    ref.backward(torch.ones_like(ref))
    assert_close_to_reference(q.grad, q64.grad, torch.float32, "dq")


def test_unwritten_output_is_caught_by_poisoning(tops, device, monkeypatch):
    """Debug buffers start as NaN: a kernel that writes nothing must fail the checks."""
    problem = make_problem(device=device, seed=13)

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tops._att, "na_fwd_token_kernel", _NoLaunch())
    leaves = problem.leaves()
    out = tops.neighborhood_attention(leaves["q"], leaves["k"], leaves["v"], problem.idx, debug=True)
    assert torch.isnan(out).all()
    ref = reference.neighborhood_attention(leaves["q"], leaves["k"], leaves["v"], problem.idx)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_reference(out, ref, torch.float32, "output")


def test_dkdv_mode_switch(tops, device, monkeypatch):
    problem = make_problem(device=device, seed=14)
    calls = []
    original = tops.build_reverse_index
    monkeypatch.setattr(tops, "build_reverse_index", lambda *a: calls.append(1) or original(*a))

    def backward_once():
        leaves = problem.leaves()
        tops.neighborhood_attention(leaves["q"], leaves["k"], leaves["v"], problem.idx.clone(),
                                    valid=problem.valid, debug=True).sum().backward()

    with kernel_settings(KernelSettings()):
        backward_once()
    assert calls == [], "the default dk/dv path is atomics"
    with kernel_settings(dkdv="reverse"):
        backward_once()
    assert calls == [1]
    with pytest.raises(ValueError, match="dk/dv mode"):
        with kernel_settings(dkdv="sorted"):
            backward_once()


def test_reverse_index_lists_every_valid_slot(tops):
    idx = torch.tensor([[[2, 0, 2], [1, 2, 0]], [[0, 0, 1], [2, 1, 1]]])  # [B=2, Nq=2, M=3]
    valid = torch.tensor([[[True, True, False], [True, True, True]], [[True, False, True], [True, True, True]]])
    offsets, entries = tops.build_reverse_index(idx, valid, num_queries=2, num_keys=3)
    b, nq, m = idx.shape
    for bi in range(b):
        for key in range(3):
            bucket = bi * 4 + key
            got = entries[offsets[bucket]:offsets[bucket + 1]].tolist()
            want = [i * m + s for i in range(nq) for s in range(m) if valid[bi, i, s] and idx[bi, i, s] == key]
            assert got == want, (bi, key)


def test_reverse_index_cache_follows_in_place_edits(tops, device):
    problem = make_problem(device=device, seed=15)
    check_against_reference(_attention(tops, dkdv="reverse"), problem, torch.float32)
    problem.idx.copy_(torch.flip(problem.idx, dims=[1]))  # same tensor object, new content
    check_against_reference(_attention(tops, dkdv="reverse"), problem, torch.float32)


@pytest.mark.parametrize(("field", "tile", "cluster"), [
    ("token_tile", "8,16,4", 1),
    ("cluster_tile", "32,32,2", 4),
])
def test_tile_overrides_keep_results(tops, device, field, tile, cluster):
    problem = make_problem(cluster=cluster, device=device, seed=16)
    with kernel_settings(**{field: Tile.parse(tile)}):
        check_against_reference(_attention(tops, dkdv="reverse"), problem, torch.float32)


def test_tile_overrides_from_the_environment():
    settings = KernelSettings.from_env({"AFFMAE_KERNELS_TOKEN_TILE": "8,16,4",
                                        "AFFMAE_KERNELS_CLUSTER_TILE": "32,32,2"})
    assert settings.token_tile == Tile(8, 16, 4) and settings.cluster_tile == Tile(32, 32, 2)


def test_bad_tile_overrides_are_rejected(tops, device):
    problem = make_problem(device=device, seed=17)
    with pytest.raises(ValueError, match="power of two"):
        KernelSettings.from_env({"AFFMAE_KERNELS_TOKEN_TILE": "16,12,4"})
    with pytest.raises(ValueError, match="at least 16 rows"):
        KernelSettings(cluster_tile=Tile(8, 16, 4))
    with kernel_settings(token_tile=Tile(16, 32, 4)):  # 32 does not divide M = 16
        with pytest.raises(ValueError, match="must divide M=16"):
            check_against_reference(_attention(tops), problem, torch.float32)
