"""Bad input to the Triton ops gives clear errors, never silent garbage."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import make_problem

from affmae_kernels import KernelSettings, kernel_settings


def _call(tops, problem, **overrides):
    t = dict(problem.tensors)
    args = dict(q=t["q"], k=t["k"], v=t["v"], idx=problem.idx, bias=t["bias"], valid=problem.valid,
                blank_k=t["blank_k"], blank_v=t["blank_v"])
    args.update(overrides)
    return tops.neighborhood_attention(**args, debug=True)


@pytest.fixture(scope="module")
def problem(device):
    return make_problem(device=device, seed=21)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: {"v": p.tensors["v"][:, :, :-1]}, "k and v must be"),
        (lambda p: {"k": p.tensors["k"][:1], "v": p.tensors["v"][:1]}, "k and v must be"),
        (lambda p: {"q": p.tensors["q"][0]}, r"q, k, v must be \[B, H, N, D\]"),
        (lambda p: {"bias": p.tensors["bias"][..., :-1]}, "bias must be"),
        (lambda p: {"valid": p.valid[:, :-1]}, "valid must be a bool tensor"),
        (lambda p: {"valid": p.valid.to(torch.uint8)}, "valid must be a bool tensor"),
        (lambda p: {"idx": p.idx[:, :-1]}, "neither Nq"),
        (lambda p: {"idx": p.idx.float()}, "idx must be an int32/int64"),
        (lambda p: {"blank_v": None}, "blank_k and blank_v must be given together"),
        (lambda p: {"blank_k": p.tensors["blank_k"][:1]}, r"blank_k and blank_v must be \[H, D\]"),
        (lambda p: {"k": p.tensors["k"].half()}, "share one floating dtype"),
    ],
    ids=["v_shorter_than_k", "batch_mismatch", "q_not_4d", "bias_shape", "valid_shape", "valid_dtype",
         "idx_rows", "idx_float", "blank_alone", "blank_shape", "mixed_dtypes"],
)
def test_attention_shape_and_dtype_errors(tops, problem, change, message):
    with pytest.raises(ValueError, match=message):
        _call(tops, problem, **change(problem))


def test_attention_rejects_float64_with_a_pointer_to_the_reference(tops, problem):
    t = problem.tensors
    with pytest.raises(ValueError, match="use the reference backend"):
        _call(tops, problem, q=t["q"].double(), k=t["k"].double(), v=t["v"].double())


def test_attention_rejects_unsupported_head_dim_and_m(tops, device):
    with pytest.raises(ValueError, match="head dim 24"):
        _call(tops, make_problem(d=24, device=device))
    with pytest.raises(ValueError, match="multiple of 8"):
        _call(tops, make_problem(m=12, device=device))


@pytest.mark.parametrize("bad_value", [-1, 20])
def test_attention_index_out_of_range_in_debug_mode(tops, device, bad_value):
    problem = make_problem(nk=20, device=device)
    problem.idx[1, 3, 5] = bad_value
    with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
        _call(tops, problem)


def test_debug_mode_follows_settings(tops, device):
    problem = make_problem(nk=20, device=device)
    problem.idx[0, 0, 0] = 99
    t = problem.tensors
    with kernel_settings(debug=True):
        with pytest.raises(ValueError, match="outside"):
            tops.neighborhood_attention(t["q"], t["k"], t["v"], problem.idx)
    assert KernelSettings.from_env({"AFFMAE_KERNELS_DEBUG": "1"}).debug


def test_weighted_merge_shape_errors(tops, device):
    weights = torch.randn(2, 5, 8, 4, device=device)
    feat = torch.randn(2, 12, 16, device=device)
    idx = torch.randint(0, 12, (2, 5, 8), device=device)
    with pytest.raises(ValueError, match="idx must be"):
        tops.weighted_merge(weights, feat, idx[:, :4])
    with pytest.raises(ValueError, match="expects weights"):
        tops.weighted_merge(weights[0], feat, idx)
    with pytest.raises(ValueError, match="int32 or int64"):
        tops.weighted_merge(weights, feat, idx.float())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        tops.weighted_merge(weights, feat.double(), idx)
