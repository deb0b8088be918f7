"""The pure-PyTorch reference ops (the oracle of the Triton kernels) against dense attention."""
from __future__ import annotations

import math

import pytest
import torch

from affmae_kernels import reference


def _dense_attention(q, k, v, bias=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Nq, Nk]
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, -1) @ v


def _inputs(b=2, h=3, nq=10, nk=16, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for n in (nq, nk, nk))
    return q, k, v, gen


def test_equals_dense_softmax_when_neighbourhood_is_all_keys():
    q, k, v, gen = _inputs()
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    # every query sees all keys, in a different random order per query
    idx = torch.stack([torch.stack([torch.randperm(nk, generator=gen) for _ in range(nq)]) for _ in range(b)])
    bias_dense = torch.randn(b, h, nq, nk, generator=gen, dtype=torch.float64)
    bias_nb = torch.gather(bias_dense, 3, idx[:, None].expand(b, h, nq, nk))
    out = reference.neighborhood_attention(q, k, v, idx.int(), bias=bias_nb)
    torch.testing.assert_close(out, _dense_attention(q, k, v, bias_dense), rtol=1e-12, atol=1e-12)


def test_padded_neighbours_are_ignored_and_blank_token_joins_the_softmax():
    q, k, v, gen = _inputs(nq=6, nk=12)
    b, h = q.shape[:2]
    idx = torch.randint(0, 12, (b, 6, 8), generator=gen)
    valid = torch.rand(b, 6, 8, generator=gen) > 0.4
    valid[:, :, 0] = True
    blank_k = torch.randn(h, q.shape[-1], generator=gen, dtype=torch.float64)
    blank_v = torch.randn(h, q.shape[-1], generator=gen, dtype=torch.float64)
    out = reference.neighborhood_attention(q, k, v, idx, valid=valid, blank_k=blank_k, blank_v=blank_v)
    # explicit loop over queries: softmax over valid neighbours + blank
    for bi in range(b):
        for hi in range(h):
            for qi in range(6):
                keys = idx[bi, qi][valid[bi, qi]]
                kk = torch.cat([k[bi, hi, keys], blank_k[hi][None]])
                vv = torch.cat([v[bi, hi, keys], blank_v[hi][None]])
                p = torch.softmax(kk @ q[bi, hi, qi] / math.sqrt(q.shape[-1]), 0)
                torch.testing.assert_close(out[bi, hi, qi], p @ vv, rtol=1e-12, atol=1e-12)


def test_fully_padded_rows_are_zero_without_blank_and_blank_value_with_it():
    q, k, v, _ = _inputs(nq=4, nk=8)
    idx = torch.zeros(2, 4, 8, dtype=torch.int32)
    valid = torch.zeros(2, 4, 8, dtype=torch.bool)
    out = reference.neighborhood_attention(q, k, v, idx, valid=valid)
    assert torch.equal(out, torch.zeros_like(out))
    blank_k = torch.randn(3, 8, dtype=torch.float64)
    blank_v = torch.randn(3, 8, dtype=torch.float64)
    out = reference.neighborhood_attention(q, k, v, idx, valid=valid, blank_k=blank_k, blank_v=blank_v)
    torch.testing.assert_close(out, blank_v[None, :, None, :].expand_as(out))
    assert torch.isfinite(out).all()


def test_cluster_mode_equals_per_token_index_repeated():
    q, k, v, gen = _inputs(nq=16, nk=16)
    idx_c = torch.randint(0, 16, (2, 2, 8), generator=gen)  # 2 clusters of 8 queries
    bias = torch.randn(2, 3, 16, 8, generator=gen, dtype=torch.float64)
    out_c = reference.neighborhood_attention(q, k, v, idx_c, bias=bias)
    out_t = reference.neighborhood_attention(q, k, v, idx_c.repeat_interleave(8, 1), bias=bias)
    torch.testing.assert_close(out_c, out_t, rtol=0, atol=0)


def test_gradients_are_finite_with_padding():
    q, k, v, gen = _inputs(nq=4, nk=8)
    for t in (q, k, v):
        t.requires_grad_(True)
    valid = torch.zeros(2, 4, 8, dtype=torch.bool)
    valid[:, :2, :3] = True
    out = reference.neighborhood_attention(q, k, v, torch.randint(0, 8, (2, 4, 8), generator=gen), valid=valid)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :, 2:], torch.zeros_like(q.grad[:, :, 2:]))


def test_weighted_merge_matches_loop():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    feat = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64)
    idx = torch.randint(0, 7, (2, 3, 5), generator=gen)
    out = reference.weighted_merge(w, feat, idx)
    expected = torch.zeros(2, 3, 4, 6, dtype=torch.float64)
    for b in range(2):
        for n in range(3):
            for m in range(5):
                expected[b, n] += w[b, n, m][:, None] * feat[b, idx[b, n, m]][None]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=torch.randn(2, 3, 4)), "must be \\[B, H, N, D\\]"),
        (dict(k=torch.randn(2, 3, 8, 4)), "k and v must be"),
        (dict(idx=torch.zeros(2, 3, 8)), "idx must be an int32/int64"),
        (dict(idx=torch.zeros(2, 3, 8, dtype=torch.int64)), "neither Nq"),
        (dict(bias=torch.zeros(2, 3, 4, 7)), "bias must be"),
        (dict(valid=torch.ones(2, 4, 8)), "valid must be a bool"),
        (dict(blank_k=torch.zeros(3, 8)), "given together"),
    ],
)
def test_bad_shapes_raise_clear_errors(kwargs, message):
    args = dict(q=torch.randn(2, 3, 4, 8), k=torch.randn(2, 3, 8, 8), v=torch.randn(2, 3, 8, 8),
                idx=torch.zeros(2, 4, 8, dtype=torch.int32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        reference.neighborhood_attention(**args)
