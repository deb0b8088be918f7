"""Triton weighted merge and k-nearest-centroid search vs the PyTorch reference."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close_to_reference

from affmae_kernels import reference


def _merge_inputs(b, n, n_out, m, g, c, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(b, n_out, m, g, generator=gen).to(dtype).to(device)
    feat = torch.randn(b, n, c, generator=gen).to(dtype).to(device)
    idx = torch.randint(0, n, (b, n_out, m), generator=gen).to(device)
    grad_out = torch.randn(b, n_out, g, c, generator=gen).to(device)
    return weights, feat, idx, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize(("m", "g", "c"), [(12, 4, 40), (64, 3, 96)])
def test_weighted_merge_matches_reference(tops, device, dtype, m, g, c):
    weights, feat, idx, grad_out = _merge_inputs(2, 30, 7, m, g, c, dtype, device, seed=m + c)
    w, f = weights.clone().requires_grad_(), feat.clone().requires_grad_()
    out = tops.weighted_merge(w, f, idx, debug=True)
    out.backward(grad_out.to(dtype))
    w64, f64 = weights.double().requires_grad_(), feat.double().requires_grad_()
    ref = reference.weighted_merge(w64, f64, idx)
    ref.backward(grad_out.double())
    assert out.dtype == dtype and w.grad.dtype == dtype and f.grad.dtype == dtype
    assert_close_to_reference(out, ref, dtype, "merge output")
    assert_close_to_reference(w.grad, w64.grad, dtype, "dweights")
    assert_close_to_reference(f.grad, f64.grad, dtype, "dfeat")


def test_weighted_merge_non_contiguous_and_partial_grad(tops, device):
    weights, feat, idx, grad_out = _merge_inputs(2, 16, 5, 8, 4, 24, torch.float32, device, seed=3)
    w_src = weights.permute(0, 1, 3, 2).contiguous().requires_grad_()  # [B, N', G, M]
    w_view = w_src.permute(0, 1, 3, 2)  # non-contiguous [B, N', M, G]
    f_big = torch.randn(2, 16, 48).to(device)
    f_view = f_big[..., ::2]  # non-contiguous feat, no grad
    out = tops.weighted_merge(w_view, f_view, idx.to(torch.int32), debug=True)
    out.backward(grad_out)
    w64 = w_src.detach().double().requires_grad_()
    ref = reference.weighted_merge(w64.permute(0, 1, 3, 2), f_view.double(), idx)
    ref.backward(grad_out.double())
    assert_close_to_reference(out, ref, torch.float32, "merge output")
    assert_close_to_reference(w_src.grad, w64.grad, torch.float32, "dweights")


def test_weighted_merge_index_out_of_range_in_debug(tops, device):
    weights, feat, idx, _ = _merge_inputs(1, 10, 3, 8, 4, 16, torch.float32, device, seed=4)
    idx[0, 1, 2] = 10
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        tops.weighted_merge(weights, feat, idx, debug=True)


@pytest.mark.parametrize("k", [1, 5, 8, 16])
def test_knn_matches_reference_with_ties_and_invalid_centroids(tops, device, k):
    gen = torch.Generator().manual_seed(k)
    # integer lattice positions: many exactly tied distances, broken towards the lower index
    query_pos = torch.randint(0, 12, (2, 45, 2), generator=gen).float().to(device)
    centroid_pos = torch.randint(0, 12, (2, 83, 2), generator=gen).float().to(device)
    centroid_valid = (torch.rand(2, 83, generator=gen) > 0.25).to(device)
    got = tops.knn_centroids(query_pos, centroid_pos, k, centroid_valid, debug=True)
    want = reference.knn_centroids(query_pos, centroid_pos, k, centroid_valid)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    got_all = tops.knn_centroids(query_pos, centroid_pos, k, debug=True)
    assert torch.equal(got_all, reference.knn_centroids(query_pos, centroid_pos, k))


def test_knn_more_neighbours_than_valid_centroids(tops, device):
    """k exceeds the valid count: the invalid centroids follow, in index order (like the reference)."""
    query_pos = torch.rand(1, 9, 3).to(device) * 10  # any coordinate count, float positions
    centroid_pos = torch.rand(1, 20, 3).to(device) * 10
    centroid_valid = torch.zeros(1, 20, dtype=torch.bool, device=device)
    centroid_valid[0, [3, 17, 8]] = True
    got = tops.knn_centroids(query_pos, centroid_pos, 6, centroid_valid, debug=True)
    assert torch.equal(got, reference.knn_centroids(query_pos, centroid_pos, 6, centroid_valid))
    assert set(got[0, :, :3].flatten().tolist()) <= {3, 8, 17}
    assert got[0, :, 3:].tolist() == [[0, 1, 2]] * 9


def test_knn_rejects_bad_k(tops, device):
    pos = torch.rand(1, 40, 2).to(device)
    with pytest.raises(ValueError, match="k <= 16"):
        tops.knn_centroids(pos, pos, 17)
    with pytest.raises(ValueError, match="between 1 and the number of centroids"):
        tops.knn_centroids(pos, pos[:, :4], 5)
    with pytest.raises(ValueError, match="centroid_valid must be bool"):
        tops.knn_centroids(pos, pos, 3, torch.ones(1, 40, dtype=torch.uint8))
