"""Triton kernel of the k-nearest-centroid search (k <= 16, no gradient).

Every program keeps a running top-K list (distance, index) for BLOCK_Q queries and merges one
chunk of BLOCK_N centroids at a time by K rounds of "take the smallest (distance, index)
pair" — so ties break towards the lower centroid index, as in the reference's stable sort.
Invalid centroids get distance +inf (they are still returned, after all valid ones, when k
exceeds the number of valid centroids — again like the reference).
"""
from __future__ import annotations

import triton
import triton.language as tl

#: Index sentinel for empty/used slots: larger than any real centroid index.
BIG_INDEX = tl.constexpr(2**31 - 1)
INF = tl.constexpr(float("inf"))


@triton.jit
def knn_kernel(
    qpos_ptr, cpos_ptr, cvalid_ptr, out_ptr,
    Nq, Nc,
    P: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr,
):
    """qpos fp32 ``[B, Nq, P]``, cpos fp32 ``[B, Nc, P]``, cvalid uint8 ``[B, Nc]`` (all
    contiguous) -> out int64 ``[B, Nq, K]``, nearest first."""
    pid_q = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < Nq
    slots = tl.arange(0, BLOCK_K)
    top_d = tl.full((BLOCK_Q, BLOCK_K), INF, tl.float32)
    top_i = tl.full((BLOCK_Q, BLOCK_K), BIG_INDEX, tl.int32)

    for c0 in range(0, Nc, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        c_ok = cols < Nc
        d2 = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
        for p in tl.static_range(P):
            qp = tl.load(qpos_ptr + (b * Nq + rows) * P + p, mask=row_ok, other=0.0)
            cp = tl.load(cpos_ptr + (b * Nc + cols) * P + p, mask=c_ok, other=0.0)
            diff = qp[:, None] - cp[None, :]
            d2 += diff * diff
        if HAS_VALID:
            ok = tl.load(cvalid_ptr + b * Nc + cols, mask=c_ok, other=0) != 0
            d2 = tl.where(ok[None, :], d2, INF)
        cand_d = tl.where(c_ok[None, :], d2, INF)
        cand_i = tl.where(c_ok[None, :], cols[None, :], BIG_INDEX) + tl.zeros((BLOCK_Q, BLOCK_N), tl.int32)
        # skip the merge when no row can improve: every row full and its chunk minimum worse
        kth = tl.max(tl.where(slots[None, :] < K, top_d, -INF), 1)
        full = tl.max(tl.where(slots[None, :] < K, top_i, 0), 1) < BIG_INDEX
        improves = (tl.min(cand_d, 1) < kth) | (~full)
        if tl.max(improves.to(tl.int32), 0) > 0:
            new_d = tl.full((BLOCK_Q, BLOCK_K), INF, tl.float32)
            new_i = tl.full((BLOCK_Q, BLOCK_K), BIG_INDEX, tl.int32)
            for r in tl.static_range(K):
                best_d = tl.minimum(tl.min(top_d, 1), tl.min(cand_d, 1))  # [BQ]
                i_top = tl.min(tl.where(top_d == best_d[:, None], top_i, BIG_INDEX), 1)
                i_cand = tl.min(tl.where(cand_d == best_d[:, None], cand_i, BIG_INDEX), 1)
                best_i = tl.minimum(i_top, i_cand)
                new_d = tl.where(slots[None, :] == r, best_d[:, None], new_d)
                new_i = tl.where(slots[None, :] == r, best_i[:, None], new_i)
                taken_top = top_i == best_i[:, None]
                top_d = tl.where(taken_top, INF, top_d)
                top_i = tl.where(taken_top, BIG_INDEX, top_i)
                taken_cand = cand_i == best_i[:, None]
                cand_d = tl.where(taken_cand, INF, cand_d)
                cand_i = tl.where(taken_cand, BIG_INDEX, cand_i)
            top_d = new_d
            top_i = new_i

    out_off = (b * Nq + rows[:, None]) * K + slots[None, :]
    tl.store(out_ptr + out_off, top_i.to(tl.int64), mask=row_ok[:, None] & (slots[None, :] < K))
