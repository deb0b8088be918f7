"""The chunked, recomputing reference attention against the whole-tensor oracle, and its memory."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from affmae_kernels import reference


def _problem(b=2, h=3, nq=24, nk=13, d=5, m=7, cluster=1, bias=True, valid=True, blank=True,
             empty_rows=True, seed=0, dtype=torch.float64):
    """Random float64 inputs (leaves with requires_grad) of one attention call."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(True)

    groups = nq // cluster
    args = dict(
        q=leaf(b, h, nq, d), k=leaf(b, h, nk, d), v=leaf(b, h, nk, d),
        idx=torch.randint(0, nk, (b, groups, m), generator=gen, dtype=torch.int32),
        bias=leaf(b, h, nq, m) if bias else None,
        valid=(torch.rand(b, groups, m, generator=gen) > 0.4) if valid else None,
        blank_k=leaf(h, d) if blank else None,
        blank_v=leaf(h, d) if blank else None,
    )
    if valid and empty_rows:
        args["valid"][:, 1] = False  # a row (cluster) with no valid neighbour
        args["valid"][0, -1] = False
    return args


def _out_and_grads(fn, args, **kwargs):
    out = fn(**args, **kwargs)
    leaves = [t for t in args.values() if t is not None and t.requires_grad]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 24, 100])
@pytest.mark.parametrize("cluster", [1, 4])
@pytest.mark.parametrize("blank", [True, False])
@pytest.mark.parametrize("valid", [True, False])
def test_chunked_equals_unchunked_forward_and_gradients(chunk_size, cluster, blank, valid):
    args = _problem(cluster=cluster, blank=blank, valid=valid)
    out, grads = _out_and_grads(reference.neighborhood_attention, args, chunk_size=chunk_size)
    want, want_grads = _out_and_grads(reference._unchunked_neighborhood_attention, args)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(want_grads)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def test_chunked_without_bias_and_default_chunk_size():
    args = _problem(bias=False, nq=40, cluster=8)
    out, grads = _out_and_grads(reference.neighborhood_attention, args)
    want, want_grads = _out_and_grads(reference._unchunked_neighborhood_attention, args)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def test_empty_rows_are_zero_with_zero_gradients():
    args = _problem(blank=False)
    out, grads = _out_and_grads(reference.neighborhood_attention, args, chunk_size=5)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    dq, dbias = grads[0], grads[3]
    assert torch.equal(dq[:, :, 1], torch.zeros_like(dq[:, :, 1]))
    assert torch.equal(dbias[:, :, 1], torch.zeros_like(dbias[:, :, 1]))
    # invalid neighbours get probability 0, hence no bias gradient
    invalid = ~args["valid"][:, None].expand_as(dbias)
    assert torch.equal(dbias[invalid], torch.zeros_like(dbias[invalid]))


def test_partial_gradients_and_float32():
    args = _problem(dtype=torch.float32)
    args["k"].requires_grad_(False)
    args["blank_k"].requires_grad_(False)
    out, grads = _out_and_grads(reference.neighborhood_attention, args, chunk_size=3)
    want, want_grads = _out_and_grads(reference._unchunked_neighborhood_attention, args)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out, want)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp)


def test_no_grad_path_equals_autograd_path():
    args = _problem()
    with torch.no_grad():
        plain = reference.neighborhood_attention(**args, chunk_size=5)
    assert torch.equal(plain, reference.neighborhood_attention(**args, chunk_size=5).detach())


def test_gradcheck_float64():
    args = _problem(b=1, h=2, nq=8, nk=6, d=3, m=4, cluster=2)
    names = [n for n, t in args.items() if t is not None and t.requires_grad]

    def fn(*leaves):
        return reference.neighborhood_attention(**{**args, **dict(zip(names, leaves))}, chunk_size=3)

    assert torch.autograd.gradcheck(fn, [args[n] for n in names])


def test_bad_chunk_size_raises():
    with pytest.raises(ValueError, match="chunk_size"):
        reference.neighborhood_attention(**_problem(), chunk_size=0)


def test_default_chunk_size_bounds_bytes_and_keeps_whole_clusters():
    q = torch.zeros(2, 4, 10_000, 32)
    size = reference.default_chunk_size(q, 64, cluster=8)
    assert size % 8 == 0
    assert size * 2 * 4 * 64 * 32 * 4 <= reference.DEFAULT_CHUNK_BYTES
    assert reference.default_chunk_size(q, 64, cluster=8, chunk_bytes=1) == 8


# ------------------------------------------------------------------------------------- memory

def _saved_bytes(fn, args, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves for the backward (inputs excluded)."""
    inputs = {t.untyped_storage().data_ptr() for t in args.values() if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(**args, **kwargs)
    return sum(seen.values())


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates while active (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_chunked_backward_keeps_far_less_memory():
    b, h, nq, nk, m, d = 1, 4, 1024, 1024, 64, 32
    args = _problem(b=b, h=h, nq=nq, nk=nk, d=d, m=m, cluster=8, dtype=torch.float32)
    whole = b * h * nq * m * d * 4  # one [B, H, Nq, M, D] neighbour tensor
    chunk = 64
    saved_chunked = _saved_bytes(reference.neighborhood_attention, args, chunk_size=chunk)
    saved_whole = _saved_bytes(reference._unchunked_neighborhood_attention, args)
    assert saved_whole >= 2 * whole  # gathered K and V
    # the chunked op saves the per-row log-sum-exp only, besides its inputs
    assert saved_chunked <= b * h * nq * 4
    assert saved_chunked * 50 < saved_whole

    def peak(fn, **kwargs) -> int:
        mode = _LargestTensor()
        with mode:
            out = fn(**args, **kwargs)
            out.backward(torch.ones_like(out))
        for t in args.values():
            if t is not None:
                t.grad = None
        return mode.largest

    largest_chunked = peak(reference.neighborhood_attention, chunk_size=chunk)
    largest_whole = peak(reference._unchunked_neighborhood_attention)
    assert largest_whole >= whole
    # no tensor larger than one chunk's neighbour tensor (or the inputs/gradients) ever exists
    assert largest_chunked <= max(whole * chunk // nq, b * h * nq * m * 4)
    assert largest_chunked * 8 <= largest_whole


# ------------------------------------------------------------------------------ weighted merge

@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
def test_chunked_merge_equals_unchunked_forward_and_gradients(chunk_size):
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 7, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    feat = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64).transpose(1, 2).contiguous()
    feat = feat.transpose(1, 2).requires_grad_(True)  # non-contiguous [B, N, C]
    idx = torch.randint(0, 9, (2, 7, 5), generator=gen, dtype=torch.int32)
    grad_out = torch.randn(2, 7, 4, 6, generator=gen, dtype=torch.float64)
    out = reference.weighted_merge(weights, feat, idx, chunk_size=chunk_size)
    want = reference._unchunked_weighted_merge(weights, feat, idx)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out, [weights, feat], grad_out)
    exp = torch.autograd.grad(want, [weights, feat], grad_out)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(reference.weighted_merge(weights, feat, idx, chunk_size=chunk_size), want)


def test_chunked_merge_saves_no_gathered_features():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(1, 512, 64, 4, generator=gen, requires_grad=True)
    feat = torch.randn(1, 1024, 48, generator=gen, requires_grad=True)
    idx = torch.randint(0, 1024, (1, 512, 64), generator=gen)
    args = dict(weights=weights, feat=feat, idx=idx)
    gathered = 512 * 64 * 48 * 4  # [B, N', M, C]
    assert _saved_bytes(reference._unchunked_weighted_merge, args) >= gathered
    assert _saved_bytes(reference.weighted_merge, args, chunk_size=32) == 0  # inputs only


def test_knn_chunks_do_not_change_the_result():
    gen = torch.Generator().manual_seed(0)
    query_pos = torch.randint(0, 12, (2, 50, 2), generator=gen).float()  # many ties
    centroid_pos = torch.randint(0, 12, (2, 30, 2), generator=gen).float()
    valid = torch.rand(2, 30, generator=gen) > 0.2
    want = reference.knn_centroids(query_pos, centroid_pos, 6, valid, chunk=50)
    for chunk in (1, 7, None):
        assert torch.equal(reference.knn_centroids(query_pos, centroid_pos, 6, valid, chunk=chunk), want)


def test_knn_keeps_no_chunk_sort_result_alive():
    """Each chunk keeps its k columns only: before, the slice of a chunk's ``[B, n, Nc]`` int64 sort result held
    the whole storage until the final cat (256 MiB at a 1024^2 tile's first stage)."""
    from napari_affmae.bench.tensor_profile import profile_live_tensors

    gen = torch.Generator().manual_seed(0)
    query_pos = torch.rand(1, 4096, 2, generator=gen) * 64
    centroid_pos = torch.rand(1, 512, 2, generator=gen) * 64
    sorted_chunk = 256 * 512 * 8  # one chunk's int64 sort indices
    profile = profile_live_tensors(lambda: reference.knn_centroids(query_pos, centroid_pos, 8, chunk=256))
    assert profile.peak_bytes < 4 * sorted_chunk  # 16 chunks: 16 x before
